//! Turns (config, neighbour table) into map contents and applies only the
//! difference. The [`Reconciler`] is the single writer of the maps: every
//! change the control plane makes goes through [`Reconciler::apply`].
//!
//! Table swaps are whole: a VIP's new table is written to the half its entry
//! does not point at, and only then is the VIP entry rewritten (one atomic map
//! update) to name that half.

use std::{collections::BTreeMap, net::Ipv4Addr};

use lb_common::{
    BACKEND_F_RESOLVED, BackendEntry, FAMILY_V4, FORWARD_L2, GlobalConfig, TABLE_HALVES, Traffic,
    VipEntry, VipKey,
};

use crate::{
    config::{Config, Forwarding, Vip},
    dataplane::{Counters, Dataplane, DataplaneError},
    maglev::{self, Weighted},
};

/// How a backend is reached, as learned from the kernel's neighbour table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    /// The backend's MAC.
    pub mac: [u8; 6],
    /// The MAC of the interface `ifindex`.
    pub src_mac: [u8; 6],
}

pub type Neighbours = BTreeMap<Ipv4Addr, Neighbour>;

pub fn vip_key(vip: &Vip) -> VipKey {
    VipKey {
        addr: [u32::from_ne_bytes(vip.address.octets()), 0, 0, 0],
        port: vip.port.to_be(),
        proto: vip.protocol.number(),
        family: FAMILY_V4,
    }
}

fn backend_entry(address: Ipv4Addr, neighbour: Option<&Neighbour>) -> BackendEntry {
    let mut entry = BackendEntry {
        addr: [u32::from_ne_bytes(address.octets()), 0, 0, 0],
        dst_mac: [0; 6],
        src_mac: [0; 6],
        ifindex: 0,
        flags: 0,
    };
    if let Some(n) = neighbour {
        entry.dst_mac = n.mac;
        entry.src_mac = n.src_mac;
        entry.ifindex = n.ifindex;
        entry.flags = BACKEND_F_RESOLVED;
    }
    entry
}

/// The Maglev table each VIP of `config` gets (for `check-config` and logs).
pub fn plan(config: &Config) -> Vec<(&Vip, maglev::Table)> {
    config
        .vips
        .iter()
        .map(|v| {
            (
                v,
                maglev::build(&weighted(v), config.table_size, config.seed),
            )
        })
        .collect()
}

fn weighted(vip: &Vip) -> Vec<Weighted> {
    let mut w: Vec<Weighted> = vip
        .backends
        .iter()
        .map(|b| Weighted {
            address: b.address,
            weight: b.weight,
        })
        .collect();
    w.sort_by_key(|b| b.address);
    w
}

#[derive(Debug)]
struct AppliedVip {
    entry: VipEntry,
    name: String,
    /// Half the VIP entry points at.
    half: u32,
    /// The sorted weighted backend list the active table was built from.
    input: Vec<Weighted>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(
        "maglev.table_size {new} differs from the loaded program's {loaded}; restart to change it"
    )]
    TableSizeChanged { loaded: u32, new: u32 },
    #[error("no free {what} id (capacity {capacity})")]
    Exhausted { what: &'static str, capacity: u32 },
}

/// Per-VIP and per-backend traffic, labelled for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipTraffic {
    pub name: String,
    pub total: Traffic,
    pub backends: Vec<(Ipv4Addr, Traffic)>,
}

pub struct Reconciler<D> {
    dp: D,
    table_size: u32,
    max_vips: u32,
    global: Option<GlobalConfig>,
    vips: BTreeMap<VipKey, AppliedVip>,
    backend_ids: BTreeMap<(VipKey, Ipv4Addr), u32>,
    backends: BTreeMap<u32, BackendEntry>,
}

impl<D: Dataplane> Reconciler<D> {
    /// `table_size` and `max_vips` are fixed by the loaded maps.
    pub fn new(dp: D, table_size: u32, max_vips: u32) -> Self {
        Self {
            dp,
            table_size,
            max_vips,
            global: None,
            vips: BTreeMap::new(),
            backend_ids: BTreeMap::new(),
            backends: BTreeMap::new(),
        }
    }

    pub fn dataplane(&self) -> &D {
        &self.dp
    }

    /// Makes the maps express `config` with the MACs in `neighbours`.
    pub fn apply(
        &mut self,
        config: &Config,
        neighbours: &Neighbours,
    ) -> Result<(), ReconcileError> {
        if config.table_size != self.table_size {
            return Err(ReconcileError::TableSizeChanged {
                loaded: self.table_size,
                new: config.table_size,
            });
        }
        let global = GlobalConfig {
            hash_seed: config.seed,
            _pad: 0,
        };
        if self.global != Some(global) {
            self.dp.set_global(global)?;
            self.global = Some(global);
        }

        // VIPs that are gone stop matching before their ids are reused.
        let wanted: std::collections::BTreeSet<VipKey> = config.vips.iter().map(vip_key).collect();
        let gone: Vec<VipKey> = self
            .vips
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for key in gone {
            self.dp.remove_vip(key)?;
            self.vips.remove(&key);
            self.backend_ids.retain(|(vip, _), _| *vip != key);
        }

        for vip in &config.vips {
            self.apply_vip(vip_key(vip), vip, neighbours)?;
        }
        let live: std::collections::BTreeSet<u32> = self.backend_ids.values().copied().collect();
        self.backends.retain(|id, _| live.contains(id));
        Ok(())
    }

    fn apply_vip(
        &mut self,
        key: VipKey,
        vip: &Vip,
        neighbours: &Neighbours,
    ) -> Result<(), ReconcileError> {
        // Backend entries first: a table may only name ids whose entry exists.
        let mut ids = BTreeMap::new();
        for b in &vip.backends {
            let id = match self.backend_ids.get(&(key, b.address)) {
                Some(&id) => id,
                None => {
                    let id = lowest_free(
                        self.backend_ids.values().copied(),
                        lb_common::MAX_BACKENDS,
                        "backend",
                    )?;
                    self.backend_ids.insert((key, b.address), id);
                    id
                }
            };
            let entry = backend_entry(b.address, neighbours.get(&b.address));
            if self.backends.get(&id) != Some(&entry) {
                self.dp.set_backend(id, entry)?;
                self.backends.insert(id, entry);
            }
            ids.insert(b.address, id);
        }

        let input = weighted(vip);
        let forwarding = match vip.forwarding {
            Forwarding::L2 => FORWARD_L2,
        };
        let applied = self.vips.get(&key);
        let rebuild = applied.is_none_or(|a| a.input != input);
        let (id, half) = match applied {
            Some(a) if !rebuild => (a.entry.id, a.half),
            Some(a) => (a.entry.id, (a.half + 1) % TABLE_HALVES),
            None => (
                lowest_free(self.vips.values().map(|a| a.entry.id), self.max_vips, "VIP")?,
                0,
            ),
        };
        let table_base = (id * TABLE_HALVES + half) * self.table_size;
        if rebuild {
            let table = maglev::build(
                &input,
                self.table_size,
                self.global.map_or(0, |g| g.hash_seed),
            );
            let slots: Vec<u32> = table
                .slots
                .iter()
                .map(|&s| match table.backends.get(s as usize) {
                    Some(b) => ids[&b.address],
                    None => lb_common::NO_BACKEND,
                })
                .collect();
            self.dp.write_table(table_base, &slots)?;
        }
        let entry = VipEntry {
            id,
            table_base,
            table_size: self.table_size,
            forwarding,
        };
        if applied.is_none_or(|a| a.entry != entry) {
            self.dp.set_vip(key, entry)?;
        }
        // Backends the VIP no longer has: their ids are free once the new
        // table (which no longer names them) is active.
        self.backend_ids
            .retain(|(k, addr), _| *k != key || ids.contains_key(addr));
        self.vips.insert(
            key,
            AppliedVip {
                entry,
                name: vip.name.clone(),
                half,
                input,
            },
        );
        Ok(())
    }

    /// Labels raw counters with VIP names and backend addresses.
    pub fn traffic(&self, counters: &Counters) -> Vec<VipTraffic> {
        self.vips
            .iter()
            .map(|(key, a)| VipTraffic {
                name: a.name.clone(),
                total: counters
                    .vips
                    .get(a.entry.id as usize)
                    .copied()
                    .unwrap_or_default(),
                backends: self
                    .backend_ids
                    .iter()
                    .filter(|((k, _), _)| k == key)
                    .map(|(&(_, addr), &id)| {
                        (
                            addr,
                            counters
                                .backends
                                .get(id as usize)
                                .copied()
                                .unwrap_or_default(),
                        )
                    })
                    .collect(),
            })
            .collect()
    }
}

fn lowest_free(
    used: impl Iterator<Item = u32>,
    capacity: u32,
    what: &'static str,
) -> Result<u32, ReconcileError> {
    let used: std::collections::BTreeSet<u32> = used.collect();
    (0..capacity)
        .find(|i| !used.contains(i))
        .ok_or(ReconcileError::Exhausted { what, capacity })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::dataplane::fake::FakeDataplane;

    const M: u32 = 251;

    fn config(extra_backend: bool, weight: u32) -> Config {
        let mut text = format!(
            "interface: eth0\nmaglev: {{ table_size: {M}, seed: 7 }}\nvips:\n\
             - name: web\n  address: 10.0.0.100\n  port: 80\n  protocol: tcp\n  forwarding: l2\n  backends:\n\
             \x20   - {{ address: 10.0.0.11, weight: {weight} }}\n\
             \x20   - {{ address: 10.0.0.12, weight: 1 }}\n"
        );
        if extra_backend {
            text.push_str("    - { address: 10.0.0.13, weight: 1 }\n");
        }
        text.push_str(
            "- name: dns\n  address: 10.0.0.100\n  port: 53\n  protocol: udp\n  forwarding: l2\n  backends:\n\
             \x20   - { address: 10.0.0.11, weight: 1 }\n",
        );
        Config::parse(&text, Path::new("t.yaml")).expect("valid")
    }

    fn neighbours() -> Neighbours {
        [11u8, 12, 13]
            .into_iter()
            .map(|i| {
                (
                    Ipv4Addr::new(10, 0, 0, i),
                    Neighbour {
                        ifindex: 2,
                        mac: [2, 0, 0, 0, 0, i],
                        src_mac: [2; 6],
                    },
                )
            })
            .collect()
    }

    fn reconciler() -> Reconciler<FakeDataplane> {
        Reconciler::new(FakeDataplane::default(), M, 4)
    }

    /// The backend address each slot of the VIP's active table leads to.
    fn active_addresses(r: &Reconciler<FakeDataplane>, vip: &Vip) -> Vec<Ipv4Addr> {
        let dp = r.dataplane();
        dp.active_table(&vip_key(vip))
            .expect("table written")
            .iter()
            .map(|id| {
                let a = dp.backends[id].addr[0];
                Ipv4Addr::from(a.to_ne_bytes())
            })
            .collect()
    }

    #[test]
    fn first_apply_writes_everything_table_before_vip() {
        let mut r = reconciler();
        let c = config(false, 1);
        r.apply(&c, &neighbours()).unwrap();
        let dp = r.dataplane();
        assert_eq!(dp.global.hash_seed, 7);
        assert_eq!(dp.vips.len(), 2);
        assert_eq!(dp.backends.len(), 3, "one entry per (VIP, backend) pair");
        // The program must never see a VIP whose table is not written yet.
        let table_at = dp
            .log
            .iter()
            .position(|l| l.starts_with("write_table 0 "))
            .unwrap();
        let vip_at = dp.log.iter().position(|l| l == "set_vip 0").unwrap();
        assert!(table_at < vip_at, "{:?}", dp.log);
        // The table in the map is the one the pure builder gives.
        let (vip, table) = &plan(&c)[0];
        let expected: Vec<Ipv4Addr> = table
            .slots
            .iter()
            .map(|&s| table.backends[s as usize].address)
            .collect();
        assert_eq!(active_addresses(&r, vip), expected);
        // Resolved MACs reach the backend entries.
        let e = dp
            .backends
            .values()
            .find(|e| e.addr[0] == u32::from_ne_bytes([10, 0, 0, 12]))
            .unwrap();
        assert_eq!(
            (e.dst_mac, e.src_mac, e.ifindex, e.flags),
            ([2, 0, 0, 0, 0, 12], [2; 6], 2, BACKEND_F_RESOLVED)
        );
    }

    #[test]
    fn reapplying_the_same_state_writes_nothing() {
        let mut r = reconciler();
        r.apply(&config(false, 1), &neighbours()).unwrap();
        let before = r.dataplane().log.len();
        r.apply(&config(false, 1), &neighbours()).unwrap();
        assert_eq!(
            r.dataplane().log.len(),
            before,
            "{:?}",
            &r.dataplane().log[before..]
        );
    }

    #[test]
    fn a_changed_backend_set_goes_to_the_other_half_and_only_that_vip_is_rebuilt() {
        let mut r = reconciler();
        r.apply(&config(false, 1), &neighbours()).unwrap();
        let base_before = r.dataplane().vips[&vip_key(&config(false, 1).vips[0])].table_base;
        let mark = r.dataplane().log.len();
        let c = config(true, 1);
        r.apply(&c, &neighbours()).unwrap();
        let new = r.dataplane().log[mark..].to_vec();
        let entry = r.dataplane().vips[&vip_key(&c.vips[0])];
        assert_eq!(entry.table_base, base_before + M, "other half of VIP 0");
        assert_eq!(
            new,
            [
                "set_backend 3".to_string(),
                format!("write_table {M} {M}"),
                "set_vip 0".into()
            ]
        );
        assert!(active_addresses(&r, &c.vips[0]).contains(&Ipv4Addr::new(10, 0, 0, 13)));
        // A weight change flips back to the first half.
        r.apply(&config(true, 3), &neighbours()).unwrap();
        assert_eq!(
            r.dataplane().vips[&vip_key(&c.vips[0])].table_base,
            base_before
        );
    }

    #[test]
    fn a_mac_change_rewrites_only_the_backend_entry() {
        let mut r = reconciler();
        r.apply(&config(false, 1), &neighbours()).unwrap();
        let mark = r.dataplane().log.len();
        let mut n = neighbours();
        n.get_mut(&Ipv4Addr::new(10, 0, 0, 12)).unwrap().mac = [2, 9, 9, 9, 9, 9];
        r.apply(&config(false, 1), &n).unwrap();
        assert_eq!(r.dataplane().log[mark..], ["set_backend 1".to_string()]);
    }

    #[test]
    fn unresolved_backends_stay_in_the_table_but_are_flagged() {
        let mut r = reconciler();
        let mut n = neighbours();
        n.remove(&Ipv4Addr::new(10, 0, 0, 12));
        r.apply(&config(false, 1), &n).unwrap();
        let e = r
            .dataplane()
            .backends
            .values()
            .find(|e| e.addr[0] == u32::from_ne_bytes([10, 0, 0, 12]))
            .unwrap();
        assert_eq!((e.flags, e.dst_mac), (0, [0; 6]));
    }

    #[test]
    fn a_removed_vip_is_removed_and_its_id_reused() {
        let mut r = reconciler();
        let c = config(false, 1);
        r.apply(&c, &neighbours()).unwrap();
        let mut only_dns = c.clone();
        only_dns.vips.remove(0);
        r.apply(&only_dns, &neighbours()).unwrap();
        assert!(!r.dataplane().vips.contains_key(&vip_key(&c.vips[0])));
        assert_eq!(r.dataplane().vips.len(), 1);
        r.apply(&c, &neighbours()).unwrap();
        assert_eq!(
            r.dataplane().vips[&vip_key(&c.vips[0])].id,
            0,
            "lowest free id"
        );
    }

    #[test]
    fn a_different_table_size_is_refused() {
        let mut r = Reconciler::new(FakeDataplane::default(), 257, 4);
        let e = r.apply(&config(false, 1), &neighbours()).unwrap_err();
        assert!(matches!(
            e,
            ReconcileError::TableSizeChanged {
                loaded: 257,
                new: M
            }
        ));
        assert!(r.dataplane().log.is_empty());
    }

    #[test]
    fn traffic_is_labelled_by_vip_and_backend() {
        let mut r = reconciler();
        r.apply(&config(false, 1), &neighbours()).unwrap();
        let mut counters = r.dataplane().counters().unwrap();
        let web = r.dataplane().vips[&vip_key(&config(false, 1).vips[0])].id as usize;
        counters.vips[web] = Traffic {
            packets: 3,
            bytes: 180,
        };
        counters.backends[1] = Traffic {
            packets: 2,
            bytes: 120,
        };
        let t = r.traffic(&counters);
        let web = t.iter().find(|v| v.name == "web").unwrap();
        assert_eq!(web.total.packets, 3);
        assert!(web.backends.contains(&(
            Ipv4Addr::new(10, 0, 0, 12),
            Traffic {
                packets: 2,
                bytes: 120
            }
        )));
    }
}
