//! The settings outside `vips`: interface, Maglev, capacities, pinning and
//! the admin listener.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{is_prime, parse_duration};
use crate::config::{
    errors::Problems,
    model::{Bgp, Config, Vip, XdpMode},
    raw::{DEFAULT_PIN_ROOT, RawConfig},
};

/// Smallest and largest accepted Maglev table size. Below the minimum the
/// balance between backends is too coarse; above the maximum the tables of
/// `max_vips` VIPs (two halves each) no longer fit a sensible memory budget.
pub const TABLE_SIZE_MIN: u32 = 251;
pub const TABLE_SIZE_MAX: u32 = 655_373;
pub const FLOW_TABLE_SIZE_MIN: i64 = 1024;
pub const FLOW_TABLE_SIZE_MAX: i64 = 16_777_216;

/// The global settings, validated; numbers are only meaningful when no
/// problem was found.
pub(super) struct Global {
    interface: String,
    xdp_mode: XdpMode,
    table_size: u32,
    seed: u32,
    max_vips: u32,
    max_flows: u32,
    max_flows_v6: u32,
    udp_idle_timeout: Duration,
    flow_idle_evict: Duration,
    pin_path: PathBuf,
    admin_listen: SocketAddr,
    shutdown_grace: Duration,
    admin_max_connections: u32,
}

impl Global {
    pub(super) fn with(self, bgp: Option<Bgp>, vips: Vec<Vip>) -> Config {
        Config {
            interface: self.interface,
            xdp_mode: self.xdp_mode,
            table_size: self.table_size,
            seed: self.seed,
            max_vips: self.max_vips,
            max_flows: self.max_flows,
            max_flows_v6: self.max_flows_v6,
            udp_idle_timeout: self.udp_idle_timeout,
            flow_idle_evict: self.flow_idle_evict,
            pin_path: self.pin_path,
            admin_listen: self.admin_listen,
            shutdown_grace: self.shutdown_grace,
            admin_max_connections: self.admin_max_connections,
            bgp,
            vips,
        }
    }
}

/// Each admin connection holds a file descriptor; far below any sane limit.
const ADMIN_MAX_CONNECTIONS_MAX: i64 = 4096;

/// Checks everything but the VIPs themselves (their number included).
pub(super) fn validate(p: &mut Problems, raw: &RawConfig) -> Option<Global> {
    // The name also becomes a path component of the default pin_path.
    if raw.interface.contains('/') || raw.interface == "." || raw.interface == ".." {
        p.add(
            "interface",
            format!("`{}` is not an interface name", raw.interface),
        );
    } else if raw.interface.is_empty() || raw.interface.len() >= libc::IF_NAMESIZE {
        p.add(
            "interface",
            format!("must be 1 to {} characters", libc::IF_NAMESIZE - 1),
        );
    }

    let table_size = raw.maglev.table_size;
    if !(TABLE_SIZE_MIN as i64..=TABLE_SIZE_MAX as i64).contains(&table_size) {
        p.add(
            "maglev.table_size",
            format!("{table_size} is out of range {TABLE_SIZE_MIN}..={TABLE_SIZE_MAX}"),
        );
    } else if !is_prime(table_size as u32) {
        p.add(
            "maglev.table_size",
            format!("{table_size} is not prime (Maglev needs a prime table size)"),
        );
    }
    let seed = raw.maglev.seed;
    if !(0..=u32::MAX as i64).contains(&seed) {
        p.add("maglev.seed", format!("{seed} does not fit in 32 bits"));
    }

    let max_vips = raw.max_vips;
    if !(1..=lb_common::MAX_VIPS as i64).contains(&max_vips) {
        p.add(
            "max_vips",
            format!("{max_vips} is out of range 1..={}", lb_common::MAX_VIPS),
        );
    } else if (raw.vips.len() as i64) > max_vips {
        p.add(
            "vips",
            format!("{} VIPs exceed max_vips = {max_vips}", raw.vips.len()),
        );
    }

    let max_flows = raw.flow_table.max_flows;
    let max_flows_v6 = raw.flow_table.max_flows_v6.unwrap_or(max_flows);
    for (field, n) in [("max_flows", max_flows), ("max_flows_v6", max_flows_v6)] {
        if !(FLOW_TABLE_SIZE_MIN..=FLOW_TABLE_SIZE_MAX).contains(&n) {
            p.add(
                format!("flow_table.{field}"),
                format!("{n} is out of range {FLOW_TABLE_SIZE_MIN}..={FLOW_TABLE_SIZE_MAX}"),
            );
        }
    }
    let udp_idle_timeout = parse_duration(
        p,
        "flow_table.udp_idle_timeout",
        &raw.flow_table.udp_idle_timeout,
    )
    .filter(|d| {
        let ok = *d >= Duration::from_secs(1);
        if !ok {
            p.add("flow_table.udp_idle_timeout", "must be at least 1s");
        }
        ok
    });
    let flow_idle_evict = parse_duration(p, "flow_table.idle_evict", &raw.flow_table.idle_evict)
        .filter(|d| {
            let ok = *d >= Duration::from_secs(1);
            if !ok {
                p.add("flow_table.idle_evict", "must be at least 1s");
            }
            ok
        });
    let pin_path = raw
        .pin_path
        .clone()
        .unwrap_or_else(|| Path::new(DEFAULT_PIN_ROOT).join(&raw.interface));
    if !pin_path.is_absolute() {
        p.add(
            "pin_path",
            format!("{} is not an absolute path", pin_path.display()),
        );
    }
    let admin_listen = raw.admin.listen.parse::<SocketAddr>().map_err(|_| {
        p.add(
            "admin.listen",
            format!("`{}` is not an address:port", raw.admin.listen),
        );
    });
    let shutdown_grace = parse_duration(p, "admin.shutdown_grace", &raw.admin.shutdown_grace);
    let max_connections = raw.admin.max_connections;
    if !(1..=ADMIN_MAX_CONNECTIONS_MAX).contains(&max_connections) {
        p.add(
            "admin.max_connections",
            format!("{max_connections} is out of range 1..={ADMIN_MAX_CONNECTIONS_MAX}"),
        );
    }

    Some(Global {
        interface: raw.interface.clone(),
        xdp_mode: raw.xdp_mode,
        table_size: table_size as u32,
        seed: seed as u32,
        max_vips: max_vips as u32,
        max_flows: max_flows as u32,
        max_flows_v6: max_flows_v6 as u32,
        udp_idle_timeout: udp_idle_timeout?,
        flow_idle_evict: flow_idle_evict?,
        pin_path,
        admin_listen: admin_listen.ok()?,
        shutdown_grace: shutdown_grace?,
        admin_max_connections: max_connections as u32,
    })
}
