//! What the file says, as serde reads it: every setting with its default,
//! numbers wide enough that an out-of-range value reaches validation (which
//! names the field) instead of failing to parse.
//!
//! Each struct's `Default` impl is the one place its defaults are declared;
//! `#[serde(default)]` on the struct fills any field the file leaves out
//! from it.

use std::path::PathBuf;

use serde::Deserialize;

use super::model::{BackendState, Forwarding, HealthKind, OnAllDown, Protocol, XdpMode};

pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
pub const DEFAULT_MAX_VIPS: u32 = 16;
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 262_144;
/// Where pinned maps and the XDP link live, unless `pin_path` says otherwise
/// (under a directory named for the interface).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/lb";
/// Each admin connection holds a file descriptor and some memory; a few
/// dozen cover every scraper and operator.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: u32 = 64;

/// Loopback by default: the admin listener is unauthenticated.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9742";

/// The whole file. `interface` and `vips` are required, so this struct takes
/// its defaults field by field.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) interface: String,
    #[serde(default)]
    pub(super) xdp_mode: XdpMode,
    #[serde(default)]
    pub(super) maglev: RawMaglev,
    #[serde(default = "default_max_vips")]
    pub(super) max_vips: i64,
    #[serde(default)]
    pub(super) flow_table: RawFlowTable,
    /// Defaults to [`DEFAULT_PIN_ROOT`]`/<interface>`.
    pub(super) pin_path: Option<PathBuf>,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    /// Absent: no VIP is announced over BGP and a shutdown has no BGP steps.
    pub(super) bgp: Option<RawBgp>,
    pub(super) vips: Vec<RawVip>,
}

fn default_max_vips() -> i64 {
    DEFAULT_MAX_VIPS.into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawMaglev {
    pub(super) table_size: i64,
    pub(super) seed: i64,
}

impl Default for RawMaglev {
    fn default() -> Self {
        Self {
            table_size: DEFAULT_TABLE_SIZE.into(),
            seed: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawFlowTable {
    pub(super) max_flows: i64,
    /// IPv6 flows the flow table is sized for; defaults to `max_flows`.
    pub(super) max_flows_v6: Option<i64>,
    pub(super) udp_idle_timeout: String,
    /// An established flow idle for longer than this may lose its entry to
    /// a new flow whose bucket is full.
    pub(super) idle_evict: String,
}

impl Default for RawFlowTable {
    fn default() -> Self {
        Self {
            max_flows: DEFAULT_FLOW_TABLE_SIZE.into(),
            max_flows_v6: None,
            udp_idle_timeout: "30s".into(),
            idle_evict: "60s".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAdmin {
    pub(super) listen: String,
    pub(super) shutdown_grace: String,
    pub(super) max_connections: i64,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: DEFAULT_ADMIN_LISTEN.into(),
            shutdown_grace: "0s".into(),
            max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawBgp {
    pub(super) min_healthy: i64,
    pub(super) announce_after: String,
    pub(super) shutdown_delay: String,
    pub(super) feed_grace: String,
    pub(super) med: i64,
    pub(super) communities: Vec<String>,
    pub(super) next_hop: String,
}

impl Default for RawBgp {
    fn default() -> Self {
        Self {
            min_healthy: 1,
            announce_after: "2s".into(),
            shutdown_delay: "5s".into(),
            feed_grace: "30s".into(),
            med: 100,
            communities: Vec::new(),
            next_hop: "self".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVip {
    pub(super) name: String,
    pub(super) address: String,
    pub(super) port: i64,
    pub(super) protocol: Protocol,
    pub(super) forwarding: Forwarding,
    pub(super) encap_source: Option<String>,
    /// Defaults to true for `ipip`; an error for `l2`.
    pub(super) icmp_too_big: Option<bool>,
    #[serde(default)]
    pub(super) health_check: RawHealthCheck,
    #[serde(default)]
    pub(super) on_all_down: OnAllDown,
    /// Whether `bgp` may announce the VIP from this instance.
    #[serde(default = "announce_by_default")]
    pub(super) announce: bool,
    pub(super) backends: Vec<RawBackend>,
}

fn announce_by_default() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawHealthCheck {
    pub(super) kind: HealthKind,
    /// Defaults to the VIP's port.
    pub(super) port: Option<i64>,
    /// `http` only; defaults to `/`.
    pub(super) path: Option<String>,
    pub(super) interval: String,
    pub(super) timeout: String,
    pub(super) rise: i64,
    pub(super) fall: i64,
}

impl Default for RawHealthCheck {
    fn default() -> Self {
        Self {
            kind: HealthKind::default(),
            port: None,
            path: None,
            interval: "2s".into(),
            timeout: "1s".into(),
            rise: 2,
            fall: 3,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) address: String,
    pub(super) weight: i64,
    #[serde(default)]
    pub(super) state: BackendState,
}
