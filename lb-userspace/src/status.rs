//! A point-in-time view of the running instance: every VIP, its backends with
//! state, health, weight, table share and counters, and the program's global
//! counters. Built by the daemon loop (the only owner of that state) on
//! request; served as JSON by `/status`, rendered by `/metrics` and printed by
//! `lb status`.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{Stat, Traffic, VipKey};
use serde::{Deserialize, Serialize};

use crate::{
    bgp::{Decider, Phase, VipBgp},
    config::{BackendState, Bgp, Config, Forwarding, OnAllDown, Protocol, XdpMode},
    dataplane::Counters,
    model::{Health, is_up},
    reconcile::{Applied, AppliedVip, plan_vip},
    reload::ConfigStatus,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub interface: String,
    pub xdp_mode: XdpMode,
    pub attached: bool,
    pub ready: bool,
    /// The config the maps express, a pending one, and the last error.
    pub config: ConfigStatus,
    /// Every global counter by name (`action_*`, `pass_*`, `drop_*`, `flow_*`,
    /// `evict_*`, `untracked`, `icmp_*`).
    pub counters: BTreeMap<String, u64>,
    /// The `bgp` settings and the shutdown phase; `None` without a `bgp`
    /// section.
    pub bgp: Option<BgpStatus>,
    /// Flow-table entries in use, by family (`ipv4`, `ipv6`).
    #[serde(default)]
    pub flow_table_entries: BTreeMap<String, u64>,
    pub vips: Vec<VipStatus>,
}

/// What `lb bgp-feed` needs besides the per-VIP decisions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BgpStatus {
    pub phase: Phase,
    #[serde(flatten)]
    pub settings: Bgp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VipStatus {
    pub name: String,
    /// `address:port`, the metrics' `vip` label.
    pub vip: String,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub on_all_down: OnAllDown,
    pub healthy_backends: usize,
    pub all_down: bool,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// The largest ratio of a backend's share of new flows since the
    /// previous scrape to its share of the table; `None` when no flow started.
    pub skew: Option<f64>,
    /// Whether this instance announces the VIP over BGP, and why.
    pub bgp: VipBgp,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: IpAddr,
    pub state: BackendState,
    pub up: bool,
    pub weight: u32,
    /// Fraction of the VIP's table slots.
    pub table_share: f64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Asks the admin listener at `admin` for its `/status` (`lb status`, `lb
/// bgp-feed`).
pub fn fetch(admin: std::net::SocketAddr, timeout: std::time::Duration) -> anyhow::Result<Status> {
    let agent = ureq::AgentBuilder::new().timeout(timeout).build();
    Ok(agent
        .get(&format!("http://{admin}/status"))
        .call()?
        .into_json()?)
}

/// A VIP's counters and its backends', by address.
pub type VipCounters = (Traffic, BTreeMap<IpAddr, Traffic>);

/// The inputs the daemon holds; `applied` is what the reconciler wrote
/// (VIP and backend ids, table shares).
pub struct Inputs<'a> {
    pub config: &'a Config,
    pub health: &'a Health,
    pub counters: &'a Counters,
    pub applied: &'a Applied,
    pub attached: bool,
    pub ready: bool,
    pub config_status: &'a ConfigStatus,
    pub bgp: &'a Decider,
    /// New-flow counts at the previous scrape, for the skew window.
    pub previous_new_flows: &'a BTreeMap<(VipKey, IpAddr), u64>,
}

pub fn build(i: &Inputs) -> Status {
    let counters = Stat::ALL
        .iter()
        .map(|&s| (s.name().to_string(), i.counters.stat(s)))
        .collect();
    let vips = i
        .config
        .vips
        .iter()
        .map(|v| {
            let key = v.key;
            let up = |a: IpAddr| is_up(i.health, key, a);
            let plan = plan_vip(v, up);
            let (total, per_backend) = vip_traffic(i.applied, i.counters, &key);
            let shares = i.applied.vip(&key).map(AppliedVip::shares);
            let backends: Vec<BackendStatus> = v
                .backends
                .iter()
                .map(|b| {
                    let t = per_backend.get(&b.address).copied().unwrap_or_default();
                    BackendStatus {
                        address: b.address,
                        state: b.state,
                        up: up(b.address),
                        weight: b.weight,
                        table_share: shares
                            .and_then(|s| s.get(&b.address))
                            .copied()
                            .unwrap_or(0.0),
                        packets: t.packets,
                        bytes: t.bytes,
                        new_flows: t.new_flows,
                    }
                })
                .collect();
            let deltas: Vec<(f64, f64)> = backends
                .iter()
                .map(|b| {
                    let before = i
                        .previous_new_flows
                        .get(&(key, b.address))
                        .copied()
                        .unwrap_or(0);
                    (b.new_flows.saturating_sub(before) as f64, b.table_share)
                })
                .collect();
            VipStatus {
                name: v.name.clone(),
                vip: v.endpoint().to_string(),
                protocol: v.protocol,
                forwarding: v.forwarding,
                on_all_down: v.on_all_down,
                healthy_backends: v
                    .backends
                    .iter()
                    .filter(|b| b.state != BackendState::Disabled && up(b.address))
                    .count(),
                all_down: plan.all_down,
                packets: total.packets,
                bytes: total.bytes,
                new_flows: backends.iter().map(|b| b.new_flows).sum(),
                skew: skew(&deltas),
                bgp: i.bgp.get(&key),
                backends,
            }
        })
        .collect();
    Status {
        version: env!("CARGO_PKG_VERSION").into(),
        interface: i.config.interface.clone(),
        xdp_mode: i.config.xdp_mode,
        attached: i.attached,
        ready: i.ready,
        config: i.config_status.clone(),
        counters,
        bgp: i.config.bgp.clone().map(|settings| BgpStatus {
            phase: i.bgp.phase(),
            settings,
        }),
        flow_table_entries: ["ipv4", "ipv6"]
            .into_iter()
            .zip(i.counters.flow_entries)
            .map(|(family, n)| (family.to_string(), n))
            .collect(),
        vips,
    }
}

/// A VIP's and its backends' counters, by address.
pub fn vip_traffic(applied: &Applied, counters: &Counters, key: &VipKey) -> VipCounters {
    let total = applied
        .vip(key)
        .and_then(|a| counters.vips.get(a.id() as usize).copied())
        .unwrap_or_default();
    let backends = applied
        .backend_ids(key)
        .map(|(addr, id)| {
            let t = counters.backends.get(id as usize).copied();
            (addr, t.unwrap_or_default())
        })
        .collect();
    (total, backends)
}

/// Per-VIP and per-backend traffic, labelled for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipTraffic {
    pub name: String,
    pub total: Traffic,
    pub backends: Vec<(IpAddr, Traffic)>,
}

/// Labels raw counters with VIP names and backend addresses.
pub fn traffic(applied: &Applied, counters: &Counters) -> Vec<VipTraffic> {
    applied
        .vips()
        .map(|(key, a)| {
            let (total, backends) = vip_traffic(applied, counters, key);
            VipTraffic {
                name: a.name().to_string(),
                total,
                backends: backends.into_iter().collect(),
            }
        })
        .collect()
}

/// The table `lb status` prints, in the manner of `ipvsadm -Ln --stats`.
pub fn render(s: &Status) -> String {
    let mut out = format!(
        "lb {} on {} ({} XDP, {}, {})\n",
        s.version,
        s.interface,
        s.xdp_mode,
        if s.attached {
            "attached"
        } else {
            "not attached"
        },
        if s.ready { "ready" } else { "not ready" }
    );
    out += &format!("config sha256 {}\n", s.config.applied_sha256);
    if let Some(pending) = &s.config.pending_sha256 {
        out += &format!("pending config sha256 {pending} (being retried)\n");
    }
    if let Some(e) = &s.config.last_error {
        out += &format!("last reload error: {e}\n");
    }
    if let Some(b) = &s.bgp {
        out += &format!(
            "bgp {}: med {}, communities [{}], next-hop {}\n",
            b.phase,
            b.settings.med,
            b.settings.communities.join(" "),
            b.settings.next_hop
        );
    }
    for v in &s.vips {
        let enabled = v
            .backends
            .iter()
            .filter(|b| b.state != BackendState::Disabled)
            .count();
        out += &format!(
            "\nVIP {} {}/{} {}, {}/{} healthy{}, {} packets, {} bytes, {} new flows\n",
            v.name,
            v.vip,
            v.protocol,
            v.forwarding,
            v.healthy_backends,
            enabled,
            if v.all_down {
                format!(", ALL DOWN ({})", v.on_all_down)
            } else {
                String::new()
            },
            v.packets,
            v.bytes,
            v.new_flows
        );
        out += &format!(
            "  bgp: {} ({})\n",
            if v.bgp.announced {
                "announced"
            } else {
                "withdrawn"
            },
            v.bgp.reason
        );
        out += &format!(
            "  {:<16} {:<9} {:<6} {:>6} {:>7} {:>12} {:>14} {:>10}\n",
            "backend", "state", "health", "weight", "slots%", "packets", "bytes", "new flows"
        );
        for b in &v.backends {
            out += &format!(
                "  {:<16} {:<9} {:<6} {:>6} {:>7.2} {:>12} {:>14} {:>10}\n",
                b.address.to_string(),
                b.state,
                if b.up { "up" } else { "down" },
                b.weight,
                b.table_share * 100.0,
                b.packets,
                b.bytes,
                b.new_flows
            );
        }
    }
    out
}

/// Fewest new flows a backend must expect in the window for skew to count.
const MIN_EXPECTED_FLOWS: f64 = 10.0;

/// `(new flows in the window, expected share)` per backend -> the largest
/// ratio of a backend's share of the window's new flows to its expected
/// share. Backends outside the table (expected share 0) are left out: flows
/// only reach them around a table swap.
pub fn skew(deltas: &[(f64, f64)]) -> Option<f64> {
    let total: f64 = deltas.iter().map(|d| d.0).sum();
    // Below about ten expected flows per backend, Poisson noise alone reads
    // as skew; report none rather than a false alarm.
    if deltas
        .iter()
        .any(|d| d.1 > 0.0 && total * d.1 < MIN_EXPECTED_FLOWS)
    {
        return None;
    }
    deltas
        .iter()
        .filter(|d| d.1 > 0.0)
        .map(|&(n, expected)| n / total / expected)
        .max_by(f64::total_cmp)
}

/// The new-flow counters of `status`, for the next skew window.
pub fn new_flows(status: &Status, config: &Config) -> BTreeMap<(VipKey, IpAddr), u64> {
    config
        .vips
        .iter()
        .zip(&status.vips)
        .flat_map(|(v, s)| {
            s.backends
                .iter()
                .map(move |b| ((v.key, b.address), b.new_flows))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        dataplane::{Dataplane as _, fake::FakeDataplane},
        model::Neighbours,
        reconcile::Reconciler,
    };

    fn ip(i: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, i])
    }

    #[test]
    fn traffic_is_labelled_by_vip_and_backend() {
        let c = Config::parse(
            "interface: eth0\nmaglev: { table_size: 251 }\nvips:\n\
             - name: web\n  address: 10.0.0.100\n  port: 80\n  protocol: tcp\n  forwarding: l2\n  backends:\n\
             \x20   - { address: 10.0.0.11, weight: 1 }\n\
             \x20   - { address: 10.0.0.12, weight: 1 }\n",
            Path::new("t.yaml"),
        )
        .expect("valid");
        let mut r = Reconciler::new(FakeDataplane::default(), 251, 4);
        r.apply(&c, &Health::new(), &Neighbours::new()).unwrap();
        let mut counters = r.dataplane().counters().unwrap();
        let web = r.dataplane().vips[&c.vips[0].key].id as usize;
        counters.vips[web] = Traffic {
            packets: 3,
            bytes: 180,
            new_flows: 1,
        };
        let id12 = r.applied().backend_id(&c.vips[0].key, ip(12)).unwrap() as usize;
        counters.backends[id12] = Traffic {
            packets: 2,
            bytes: 120,
            new_flows: 1,
        };
        let t = traffic(r.applied(), &counters);
        let web = t.iter().find(|v| v.name == "web").unwrap();
        assert_eq!(web.total.packets, 3);
        assert!(web.backends.contains(&(
            ip(12),
            Traffic {
                packets: 2,
                bytes: 120,
                new_flows: 1
            }
        )));
    }

    #[test]
    fn skew_is_the_busiest_backends_share_over_its_expected_share() {
        // Expected 1/4, 1/4, 1/2; the first took half of 100 new flows.
        assert_eq!(skew(&[(50.0, 0.25), (25.0, 0.25), (25.0, 0.5)]), Some(2.0));
        // Exactly as expected.
        assert_eq!(skew(&[(25.0, 0.25), (25.0, 0.25), (50.0, 0.5)]), Some(1.0));
        assert_eq!(skew(&[(0.0, 0.5), (0.0, 0.5)]), None, "no flows, no skew");
        // A light backend over its share counts even when a heavy one has
        // more flows in absolute terms.
        assert_eq!(skew(&[(20.0, 0.1), (80.0, 0.9)]), Some(2.0));
        // Too few flows to tell: one flow to a backend expecting a third.
        assert_eq!(
            skew(&[(1.0, 1.0 / 3.0), (0.0, 1.0 / 3.0), (0.0, 1.0 / 3.0)]),
            None
        );
    }
}
