//! Turns (config, backend health, neighbour table) into map contents and
//! applies only the difference. The [`Reconciler`] is the single writer of the
//! maps: every change the control plane makes goes through
//! [`Reconciler::apply`].
//!
//! Table swaps are whole: a VIP's new table is written to the half its entry
//! does not point at, and only then is the VIP entry rewritten (one atomic map
//! update) to name that half.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::{
    BACKEND_F_ICMP_TOO_BIG, BACKEND_F_KEEP_FLOWS, BACKEND_F_RESOLVED, BackendEntry, FORWARD_IP6,
    FORWARD_IPIP, FORWARD_L2, GlobalConfig, TABLE_HALVES, Traffic, VipEntry, VipKey, addr_key,
    key_addr,
};

use crate::{
    config::{BackendState, Config, Forwarding, OnAllDown, Vip},
    dataplane::{Counters, Dataplane, DataplaneError, VipFilter},
    maglev::{self, Weighted},
};

/// Control-plane bookkeeping kept in the backend entry so a restarted `lb`
/// adopts the health it had; the program does not read it.
pub const BACKEND_F_HEALTHY: u32 = 4;
/// `vip_id` of a backend entry whose id is free.
const NO_VIP: u32 = u32::MAX;

/// How a backend is reached, as learned from the kernel's routes and
/// neighbour table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    /// The backend's MAC (`l2`), or the next hop's towards it (`ipip`).
    pub mac: [u8; 6],
    /// The MAC of the interface `ifindex`.
    pub src_mac: [u8; 6],
    /// The route's preferred source address (the default outer source).
    pub src_addr: Option<IpAddr>,
    /// MTU of the interface `ifindex` (0 if unknown).
    pub mtu: u32,
}

pub type Neighbours = BTreeMap<IpAddr, Neighbour>;

/// Health of each (VIP, backend); a backend not listed counts as up.
pub type Health = BTreeMap<(VipKey, IpAddr), bool>;

pub fn vip_key(vip: &Vip) -> VipKey {
    VipKey {
        addr: addr_key(vip.address),
        port: vip.port.to_be(),
        proto: vip.protocol.number(),
        _pad: 0,
    }
}

/// What one VIP should look like given backend health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipPlan {
    /// Backends that take new flows (the Maglev table's input), sorted.
    pub members: Vec<Weighted>,
    /// Backends whose established flows stay.
    pub keep_flows: BTreeSet<IpAddr>,
    /// No active backend is healthy.
    pub all_down: bool,
}

/// Applies the backend states, health and the VIP's all-down policy.
pub fn plan_vip(vip: &Vip, up: impl Fn(IpAddr) -> bool) -> VipPlan {
    let active = |b: &&crate::config::Backend| b.state == BackendState::Active;
    let all_down = !vip.backends.iter().filter(active).any(|b| up(b.address));
    let fail_open = all_down && vip.on_all_down == OnAllDown::FailOpen;
    let mut members: Vec<Weighted> = vip
        .backends
        .iter()
        .filter(active)
        .filter(|b| if all_down { fail_open } else { up(b.address) })
        .map(|b| Weighted {
            address: b.address,
            weight: b.weight,
        })
        .collect();
    members.sort_by_key(|b| b.address);
    let keep_flows = vip
        .backends
        .iter()
        .filter(|b| b.state != BackendState::Disabled && (up(b.address) || fail_open))
        .map(|b| b.address)
        .collect();
    VipPlan {
        members,
        keep_flows,
        all_down,
    }
}

/// The Maglev table each VIP of `config` gets with every backend healthy
/// (for `check-config`).
pub fn plan(config: &Config) -> Vec<(&Vip, maglev::Table)> {
    config
        .vips
        .iter()
        .map(|v| {
            let members = plan_vip(v, |_| true).members;
            (v, maglev::build(&members, config.table_size, config.seed))
        })
        .collect()
}

#[derive(Debug)]
struct AppliedVip {
    entry: VipEntry,
    name: String,
    /// Half the VIP entry points at.
    half: u32,
    /// The members the active table was built from; `None` when unknown
    /// (adopted from a previous run), which forces one rebuild.
    members: Option<Vec<Weighted>>,
    /// The hash seed the active table was built with.
    seed: u32,
    /// Each member's fraction of the active table's slots.
    shares: BTreeMap<IpAddr, f64>,
    /// When the VIP entry last switched halves.
    swapped_at: Option<Instant>,
}

impl AppliedVip {
    fn adopted(entry: VipEntry, half: u32) -> Self {
        Self {
            entry,
            name: String::new(),
            half,
            members: None,
            seed: 0,
            shares: BTreeMap::new(),
            swapped_at: None,
        }
    }
}

/// How long a freed VIP or backend id stays unused.
const ID_QUARANTINE: Duration = Duration::from_secs(1);

/// Ids in `freed` that are still in quarantine (and forgets the others).
fn quarantined(
    freed: &mut Vec<(u32, Instant)>,
    quarantine: Duration,
) -> impl Iterator<Item = u32> + '_ {
    freed.retain(|(_, at)| at.elapsed() < quarantine);
    freed.iter().map(|(id, _)| *id)
}

/// How long a table half that was just retired stays untouched. XDP runs a
/// packet in well under a microsecond; a millisecond covers any packet that
/// read the VIP entry just before the swap.
const SWAP_GRACE: Duration = Duration::from_millis(1);

/// Every (VIP, backend) pair of `config`.
pub fn backend_keys(config: &Config) -> BTreeSet<(VipKey, IpAddr)> {
    config
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(move |b| (vip_key(v), b.address)))
        .collect()
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
    #[error(
        "the pinned maps were written with layout {found}, this build uses {wanted}; remove them with `lb stop` first"
    )]
    Layout { found: u32, wanted: u32 },
}

/// Per-VIP and per-backend traffic, labelled for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipTraffic {
    pub name: String,
    pub total: Traffic,
    pub backends: Vec<(IpAddr, Traffic)>,
}

/// What a table swap did, for logs, metrics and latency measurements.
#[derive(Debug, Clone)]
pub struct Swap {
    pub vip: VipKey,
    pub name: String,
    pub members: usize,
    pub all_down: bool,
    /// Time the Maglev build took.
    pub build: Duration,
}

impl PartialEq for Swap {
    /// Equal when the same change happened (build times differ run to run).
    fn eq(&self, other: &Self) -> bool {
        (self.vip, &self.name, self.members, self.all_down)
            == (other.vip, &other.name, other.members, other.all_down)
    }
}

pub struct Reconciler<D> {
    dp: D,
    table_size: u32,
    max_vips: u32,
    global: Option<GlobalConfig>,
    vips: BTreeMap<VipKey, AppliedVip>,
    backend_ids: BTreeMap<(VipKey, IpAddr), u32>,
    backends: BTreeMap<u32, BackendEntry>,
    /// Generation to give the next id allocation.
    next_generation: u32,
    /// Ids freed lately (VIP ids, backend ids) and when: a packet may still
    /// be using them, so they are not handed out again for a while.
    freed_vips: Vec<(u32, Instant)>,
    freed_backends: Vec<(u32, Instant)>,
    id_quarantine: Duration,
    vip_filter: Option<VipFilter>,
}

/// The VIP destination bitmap for a set of VIP keys.
fn vip_filter<'a>(keys: impl IntoIterator<Item = &'a VipKey>) -> VipFilter {
    let mut words = [0u64; lb_common::VIP_FILTER_WORDS as usize];
    for k in keys {
        let (w, bit) = lb_common::vip_filter_bit_of(key_addr(k.addr));
        words[w as usize] |= bit;
    }
    words
}

impl<D: Dataplane> Reconciler<D> {
    /// `table_size` and `max_vips` are fixed by the loaded maps, which are
    /// assumed empty.
    pub fn new(dp: D, table_size: u32, max_vips: u32) -> Self {
        Self {
            dp,
            table_size,
            max_vips,
            global: None,
            vips: BTreeMap::new(),
            backend_ids: BTreeMap::new(),
            backends: BTreeMap::new(),
            next_generation: 1,
            freed_vips: Vec::new(),
            freed_backends: Vec::new(),
            id_quarantine: ID_QUARANTINE,
            vip_filter: None,
        }
    }

    /// Takes over maps a previous `lb` filled: learns VIP ids, active halves,
    /// backend ids, generations and health from them, writing nothing. The
    /// first [`apply`](Self::apply) then rebuilds each VIP's table once (into
    /// its inactive half); with an unchanged config the table is identical, so
    /// no flow moves. Returns the adopted health.
    pub fn adopt(dp: D, table_size: u32, max_vips: u32) -> Result<(Self, Health), ReconcileError> {
        let mut r = Self::new(dp, table_size, max_vips);
        let snapshot = r.dp.snapshot()?;
        let found = snapshot.global.layout_version;
        let written = found != 0 || !snapshot.vips.is_empty() || !snapshot.backends.is_empty();
        if written && found != lb_common::LAYOUT_VERSION {
            return Err(ReconcileError::Layout {
                found,
                wanted: lb_common::LAYOUT_VERSION,
            });
        }
        let by_id: BTreeMap<u32, VipKey> = snapshot.vips.iter().map(|(k, e)| (e.id, *k)).collect();
        for (key, entry) in snapshot.vips {
            let half = (entry.table_base / table_size.max(1)) % TABLE_HALVES;
            r.vips.insert(key, AppliedVip::adopted(entry, half));
        }
        let mut health = Health::new();
        for (id, entry) in snapshot.backends {
            r.next_generation = r
                .next_generation
                .max(entry.generation.wrapping_add(1).max(1));
            // Ids of removed backends stay free; their generation still counts.
            let Some(&vip) = by_id.get(&entry.vip_id) else {
                continue;
            };
            let addr = key_addr(entry.addr);
            r.backend_ids.insert((vip, addr), id);
            r.backends.insert(id, entry);
            health.insert((vip, addr), entry.flags & BACKEND_F_HEALTHY != 0);
        }
        Ok((r, health))
    }

    pub fn dataplane(&self) -> &D {
        &self.dp
    }

    /// How long freed ids stay unused (default 1 s); tests of id reuse
    /// shorten it.
    pub fn with_id_quarantine(mut self, quarantine: Duration) -> Self {
        self.id_quarantine = quarantine;
        self
    }

    /// The backend id of `addr` in VIP `key`, if it has one.
    pub fn backend_id_of(&self, key: &VipKey, addr: IpAddr) -> Option<u32> {
        self.backend_ids.get(&(*key, addr)).copied()
    }

    /// Makes the maps express `config` with `health` and the MACs in
    /// `neighbours`. Returns the VIPs whose table was swapped.
    ///
    /// Order matters, since the program reads the maps throughout: the VIP
    /// filter widens first; removed VIPs stop matching and their backends
    /// stop keeping flows before any id is reused; each VIP's backend entries
    /// are written before the table naming them, and the table before the
    /// VIP entry that points at it; backends removed from a VIP lose their
    /// flows only once its new table (which no longer names them) is active.
    pub fn apply(
        &mut self,
        config: &Config,
        health: &Health,
        neighbours: &Neighbours,
    ) -> Result<Vec<Swap>, ReconcileError> {
        if config.table_size != self.table_size {
            return Err(ReconcileError::TableSizeChanged {
                loaded: self.table_size,
                new: config.table_size,
            });
        }
        let global = GlobalConfig {
            hash_seed: config.seed,
            layout_version: lb_common::LAYOUT_VERSION,
            udp_idle_timeout_ns: config.udp_idle_timeout.as_nanos() as u64,
        };
        if self.global != Some(global) {
            self.dp.set_global(global)?;
            self.global = Some(global);
        }

        let wanted: BTreeSet<VipKey> = config.vips.iter().map(vip_key).collect();
        self.write_vip_filter(vip_filter(wanted.iter().chain(self.vips.keys())))?;
        let gone: Vec<VipKey> = self
            .vips
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for key in &gone {
            self.dp.remove_vip(*key)?;
            if let Some(a) = self.vips.remove(key) {
                self.freed_vips.push((a.entry.id, Instant::now()));
            }
        }
        self.release_backends(|(vip, _)| gone.contains(vip))?;

        let mut swaps = Vec::new();
        for vip in &config.vips {
            let key = vip_key(vip);
            let plan = plan_vip(vip, |a| health.get(&(key, a)).copied().unwrap_or(true));
            if let Some(swap) = self.apply_vip(key, vip, &plan, health, neighbours)? {
                swaps.push(swap);
            }
        }

        let live = backend_keys(config);
        self.release_backends(|k| !live.contains(k))?;
        self.write_vip_filter(vip_filter(&wanted))?;
        Ok(swaps)
    }

    /// Makes backends matching `gone` lose their flows (a flow that still
    /// names one is re-placed) and frees their ids.
    fn release_backends(
        &mut self,
        gone: impl Fn(&(VipKey, IpAddr)) -> bool,
    ) -> Result<(), ReconcileError> {
        let stale: Vec<((VipKey, IpAddr), u32)> = self
            .backend_ids
            .iter()
            .filter(|(k, _)| gone(k))
            .map(|(k, &id)| (*k, id))
            .collect();
        for (k, id) in stale {
            if let Some(mut entry) = self.backends.remove(&id) {
                entry.flags = 0;
                entry.vip_id = NO_VIP;
                self.dp.set_backend(id, entry)?;
            }
            self.backend_ids.remove(&k);
            self.freed_backends.push((id, Instant::now()));
        }
        Ok(())
    }

    fn write_vip_filter(&mut self, words: VipFilter) -> Result<(), ReconcileError> {
        if self.vip_filter != Some(words) {
            self.dp.set_vip_filter(&words)?;
            self.vip_filter = Some(words);
        }
        Ok(())
    }

    /// The id (and its generation) of `addr` in VIP `key`, allocating one
    /// with a new generation and zeroed counters if it has none. A reused id
    /// is first written with the new generation and no flags: the program
    /// copies entries without locks, so a packet could otherwise combine the
    /// old generation with the new flags and keep a dead backend's flow.
    fn backend_id(&mut self, key: VipKey, addr: IpAddr) -> Result<(u32, u32), ReconcileError> {
        if let Some(&id) = self.backend_ids.get(&(key, addr)) {
            let generation = self.backends.get(&id).map_or(0, |e| e.generation);
            return Ok((id, generation));
        }
        let used: Vec<u32> = self
            .backend_ids
            .values()
            .copied()
            .chain(quarantined(&mut self.freed_backends, self.id_quarantine))
            .collect();
        let id = lowest_free(used.into_iter(), lb_common::MAX_BACKENDS, "backend")?;
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let placeholder = BackendEntry {
            addr: [0; 16],
            dst_mac: [0; 6],
            src_mac: [0; 6],
            ifindex: 0,
            flags: 0,
            vip_id: NO_VIP,
            forwarding: 0,
            encap_src: [0; 16],
            mtu: 0,
            generation,
        };
        self.dp.set_backend(id, placeholder)?;
        self.dp.zero_traffic(None, Some(id))?;
        self.backends.insert(id, placeholder);
        self.backend_ids.insert((key, addr), id);
        Ok((id, generation))
    }

    fn apply_vip(
        &mut self,
        key: VipKey,
        vip: &Vip,
        plan: &VipPlan,
        health: &Health,
        neighbours: &Neighbours,
    ) -> Result<Option<Swap>, ReconcileError> {
        let vip_id = match self.vips.get(&key) {
            Some(a) => a.entry.id,
            None => {
                let used: Vec<u32> = self
                    .vips
                    .values()
                    .map(|a| a.entry.id)
                    .chain(quarantined(&mut self.freed_vips, self.id_quarantine))
                    .collect();
                let id = lowest_free(used.into_iter(), self.max_vips, "VIP")?;
                self.dp.zero_traffic(Some(id), None)?;
                id
            }
        };
        // Backend entries first: a table may only name ids whose entry exists.
        let mut ids = BTreeMap::new();
        for b in &vip.backends {
            let (id, generation) = self.backend_id(key, b.address)?;
            // The outer header is of the backend's family (config validation
            // keeps IPv6 VIPs off IPv4 backends).
            let forwarding = match (vip.forwarding, b.address) {
                (Forwarding::L2, _) => FORWARD_L2,
                (Forwarding::Ipip, IpAddr::V4(_)) => FORWARD_IPIP,
                (Forwarding::Ipip, IpAddr::V6(_)) => FORWARD_IP6,
            };
            let mut entry = BackendEntry {
                addr: addr_key(b.address),
                dst_mac: [0; 6],
                src_mac: [0; 6],
                ifindex: 0,
                flags: 0,
                vip_id,
                forwarding,
                encap_src: [0; 16],
                mtu: 0,
                generation,
            };
            if let Some(n) = neighbours.get(&b.address) {
                entry.dst_mac = n.mac;
                entry.src_mac = n.src_mac;
                entry.ifindex = n.ifindex;
                entry.mtu = n.mtu;
                // An IPIP backend is usable only with an outer source address.
                let src = vip.encap_source.or(n.src_addr);
                if let Some(src) = src {
                    entry.encap_src = addr_key(src);
                }
                if vip.forwarding == Forwarding::L2 || src.is_some() {
                    entry.flags |= BACKEND_F_RESOLVED;
                }
                if vip.forwarding == Forwarding::Ipip && vip.icmp_too_big {
                    entry.flags |= BACKEND_F_ICMP_TOO_BIG;
                }
            }
            if plan.keep_flows.contains(&b.address) {
                entry.flags |= BACKEND_F_KEEP_FLOWS;
            }
            if health.get(&(key, b.address)).copied().unwrap_or(true) {
                entry.flags |= BACKEND_F_HEALTHY;
            }
            if self.backends.get(&id) != Some(&entry) {
                self.dp.set_backend(id, entry)?;
                self.backends.insert(id, entry);
            }
            ids.insert(b.address, id);
        }

        let seed = self.global.map_or(0, |g| g.hash_seed);
        let applied = self.vips.get(&key);
        let rebuild =
            applied.is_none_or(|a| a.members.as_ref() != Some(&plan.members) || a.seed != seed);
        let half = match applied {
            Some(a) if rebuild => (a.half + 1) % TABLE_HALVES,
            Some(a) => a.half,
            None => 0,
        };
        let table_base = (vip_id * TABLE_HALVES + half) * self.table_size;
        let mut build = Duration::ZERO;
        let mut shares = applied.map(|a| a.shares.clone()).unwrap_or_default();
        let mut swapped_at = applied.and_then(|a| a.swapped_at);
        if rebuild {
            // The half about to be written was active until the last swap;
            // let packets that read the old VIP entry finish with it.
            if let Some(since) = swapped_at.map(|t| t.elapsed())
                && since < SWAP_GRACE
            {
                std::thread::sleep(SWAP_GRACE - since);
            }
            let started = Instant::now();
            let table = maglev::build(&plan.members, self.table_size, seed);
            build = started.elapsed();
            // Table index -> backend id, resolved once rather than per slot.
            let id_of: Vec<u32> = table.backends.iter().map(|b| ids[&b.address]).collect();
            let slots: Vec<u32> = table
                .slots
                .iter()
                .map(|&s| {
                    id_of
                        .get(s as usize)
                        .copied()
                        .unwrap_or(lb_common::NO_BACKEND)
                })
                .collect();
            self.dp.write_table(table_base, &slots)?;
            shares = table
                .backends
                .iter()
                .zip(table.slot_counts())
                .map(|(b, n)| (b.address, n as f64 / self.table_size as f64))
                .collect();
        }
        let entry = VipEntry {
            id: vip_id,
            table_base,
            table_size: self.table_size,
        };
        if applied.is_none_or(|a| a.entry != entry) {
            self.dp.set_vip(key, entry)?;
            swapped_at = Some(Instant::now());
        }
        self.vips.insert(
            key,
            AppliedVip {
                entry,
                name: vip.name.clone(),
                half,
                members: Some(plan.members.clone()),
                seed,
                shares,
                swapped_at,
            },
        );
        Ok(rebuild.then(|| Swap {
            vip: key,
            name: vip.name.clone(),
            members: plan.members.len(),
            all_down: plan.all_down,
            build,
        }))
    }

    /// Fraction of the VIP's active table each backend holds.
    pub fn shares(&self, key: &VipKey) -> BTreeMap<IpAddr, f64> {
        self.vips
            .get(key)
            .map(|a| a.shares.clone())
            .unwrap_or_default()
    }

    /// A VIP's and its backends' counters, by address.
    pub fn vip_traffic(
        &self,
        counters: &Counters,
        key: &VipKey,
    ) -> (Traffic, BTreeMap<IpAddr, Traffic>) {
        let total = self
            .vips
            .get(key)
            .and_then(|a| counters.vips.get(a.entry.id as usize).copied())
            .unwrap_or_default();
        let backends = self
            .backend_ids
            .range((*key, IpAddr::from([0u8; 4]))..=(*key, IpAddr::from([0xffu8; 16])))
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
            .collect();
        (total, backends)
    }

    /// Labels raw counters with VIP names and backend addresses.
    pub fn traffic(&self, counters: &Counters) -> Vec<VipTraffic> {
        self.vips
            .iter()
            .map(|(key, a)| {
                let (total, backends) = self.vip_traffic(counters, key);
                VipTraffic {
                    name: a.name.clone(),
                    total,
                    backends: backends.into_iter().collect(),
                }
            })
            .collect()
    }
}

fn lowest_free(
    used: impl Iterator<Item = u32>,
    capacity: u32,
    what: &'static str,
) -> Result<u32, ReconcileError> {
    let used: BTreeSet<u32> = used.collect();
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

    fn config_with(web_backends: &str, on_all_down: &str) -> Config {
        let text = format!(
            "interface: eth0\nmaglev: {{ table_size: {M}, seed: 7 }}\nvips:\n\
             - name: web\n  address: 10.0.0.100\n  port: 80\n  protocol: tcp\n  forwarding: l2\n  \
             on_all_down: {on_all_down}\n  backends:\n{web_backends}\
             - name: dns\n  address: 10.0.0.100\n  port: 53\n  protocol: udp\n  forwarding: l2\n  backends:\n\
             \x20   - {{ address: 10.0.0.11, weight: 1 }}\n"
        );
        Config::parse(&text, Path::new("t.yaml")).expect("valid")
    }

    fn backends(list: &[(u8, u32, &str)]) -> String {
        list.iter()
            .map(|(i, w, state)| {
                format!("    - {{ address: 10.0.0.{i}, weight: {w}, state: {state} }}\n")
            })
            .collect()
    }

    fn config(extra_backend: bool, weight: u32) -> Config {
        let mut list = vec![(11, weight, "active"), (12, 1, "active")];
        if extra_backend {
            list.push((13, 1, "active"));
        }
        config_with(&backends(&list), "fail_open")
    }

    fn ip(i: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, i])
    }

    fn neighbours() -> Neighbours {
        [11u8, 12, 13]
            .into_iter()
            .map(|i| {
                (
                    ip(i),
                    Neighbour {
                        ifindex: 2,
                        mac: [2, 0, 0, 0, 0, i],
                        src_mac: [2; 6],
                        src_addr: None,
                        mtu: 0,
                    },
                )
            })
            .collect()
    }

    fn all_up() -> Health {
        Health::new()
    }

    fn down(c: &Config, addrs: &[u8]) -> Health {
        let key = vip_key(&c.vips[0]);
        addrs.iter().map(|&i| ((key, ip(i)), false)).collect()
    }

    /// The swap of `web` expected in these tests (VIP key of `config`).
    fn swap(name: &str, members: usize, all_down: bool) -> Swap {
        let vip = vip_key(&config(false, 1).vips[0]);
        Swap {
            vip,
            name: name.into(),
            members,
            all_down,
            build: Duration::ZERO,
        }
    }

    fn reconciler() -> Reconciler<FakeDataplane> {
        Reconciler::new(FakeDataplane::default(), M, 4)
    }

    /// The backend address each slot of the first VIP's table leads to, as
    /// the pure builder gives it (all backends healthy).
    fn planned_addresses(c: &Config) -> Vec<Option<IpAddr>> {
        let (_, table) = &plan(c)[0];
        table
            .slots
            .iter()
            .map(|&s| Some(table.backends[s as usize].address))
            .collect()
    }

    /// The backend address each slot of the VIP's active table leads to.
    fn active_addresses(r: &Reconciler<FakeDataplane>, vip: &Vip) -> Vec<Option<IpAddr>> {
        let dp = r.dataplane();
        dp.active_table(&vip_key(vip))
            .expect("table written")
            .iter()
            .map(|id| dp.backends.get(id).map(|e| key_addr(e.addr)))
            .collect()
    }

    fn entry_of(r: &Reconciler<FakeDataplane>, c: &Config, i: u8) -> BackendEntry {
        let id = r.backend_ids[&(vip_key(&c.vips[0]), ip(i))];
        r.dataplane().backends[&id]
    }

    #[test]
    fn first_apply_writes_everything_table_before_vip() {
        let mut r = reconciler();
        let c = config(false, 1);
        r.apply(&c, &all_up(), &neighbours()).unwrap();
        let dp = r.dataplane();
        assert_eq!(dp.global.hash_seed, 7);
        assert_eq!(dp.global.udp_idle_timeout_ns, 30_000_000_000);
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
        assert_eq!(active_addresses(&r, &c.vips[0]), planned_addresses(&c));
        // MACs, flags, VIP id and a generation reach the backend entries.
        let e = entry_of(&r, &c, 12);
        assert_eq!(
            (e.dst_mac, e.src_mac, e.ifindex),
            ([2, 0, 0, 0, 0, 12], [2; 6], 2)
        );
        assert_eq!(
            e.flags,
            BACKEND_F_RESOLVED | BACKEND_F_KEEP_FLOWS | BACKEND_F_HEALTHY,
            "an l2 backend never answers with ICMP"
        );
        assert_eq!(e.vip_id, 0);
        assert_ne!(e.generation, 0);
    }

    #[test]
    fn reapplying_the_same_state_writes_nothing() {
        let mut r = reconciler();
        r.apply(&config(false, 1), &all_up(), &neighbours())
            .unwrap();
        let before = r.dataplane().log.len();
        let swaps = r
            .apply(&config(false, 1), &all_up(), &neighbours())
            .unwrap();
        assert!(swaps.is_empty());
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
        r.apply(&config(false, 1), &all_up(), &neighbours())
            .unwrap();
        let base_before = r.dataplane().vips[&vip_key(&config(false, 1).vips[0])].table_base;
        let mark = r.dataplane().log.len();
        let c = config(true, 1);
        let swaps = r.apply(&c, &all_up(), &neighbours()).unwrap();
        assert_eq!(swaps, [swap("web", 3, false)]);
        let new = r.dataplane().log[mark..].to_vec();
        let entry = r.dataplane().vips[&vip_key(&c.vips[0])];
        assert_eq!(entry.table_base, base_before + M, "other half of VIP 0");
        assert_eq!(
            new,
            [
                "set_backend 3".to_string(),
                "zero_traffic None Some(3)".into(),
                "set_backend 3".into(),
                format!("write_table {M} {M}"),
                "set_vip 0".into()
            ]
        );
        assert!(active_addresses(&r, &c.vips[0]).contains(&Some(ip(13))));
        // A weight change flips back to the first half.
        r.apply(&config(true, 3), &all_up(), &neighbours()).unwrap();
        assert_eq!(
            r.dataplane().vips[&vip_key(&c.vips[0])].table_base,
            base_before
        );
    }

    #[test]
    fn a_mac_change_rewrites_only_the_backend_entry() {
        let mut r = reconciler();
        r.apply(&config(false, 1), &all_up(), &neighbours())
            .unwrap();
        let mark = r.dataplane().log.len();
        let mut n = neighbours();
        n.get_mut(&ip(12)).unwrap().mac = [2, 9, 9, 9, 9, 9];
        r.apply(&config(false, 1), &all_up(), &n).unwrap();
        assert_eq!(r.dataplane().log[mark..], ["set_backend 1".to_string()]);
    }

    #[test]
    fn unresolved_backends_stay_in_the_table_but_are_flagged() {
        let mut r = reconciler();
        let mut n = neighbours();
        n.remove(&ip(12));
        let c = config(false, 1);
        r.apply(&c, &all_up(), &n).unwrap();
        let e = entry_of(&r, &c, 12);
        assert_eq!((e.flags & BACKEND_F_RESOLVED, e.dst_mac), (0, [0; 6]));
    }

    #[test]
    fn a_down_backend_leaves_the_table_and_loses_its_flows() {
        let mut r = reconciler();
        let c = config(true, 1);
        r.apply(&c, &all_up(), &neighbours()).unwrap();
        let swaps = r.apply(&c, &down(&c, &[12]), &neighbours()).unwrap();
        assert_eq!(swaps, [swap("web", 2, false)]);
        assert!(!active_addresses(&r, &c.vips[0]).contains(&Some(ip(12))));
        assert_eq!(
            entry_of(&r, &c, 12).flags & (BACKEND_F_KEEP_FLOWS | BACKEND_F_HEALTHY),
            0
        );
        // Coming back restores the very same table.
        r.apply(&c, &all_up(), &neighbours()).unwrap();
        let expected = planned_addresses(&c);
        assert_eq!(active_addresses(&r, &c.vips[0]), expected);
    }

    #[test]
    fn drain_keeps_flows_but_takes_no_new_ones_and_disabled_keeps_neither() {
        let mut r = reconciler();
        let c = config_with(
            &backends(&[(11, 1, "active"), (12, 1, "drain"), (13, 1, "disabled")]),
            "fail_open",
        );
        r.apply(&c, &all_up(), &neighbours()).unwrap();
        let table = active_addresses(&r, &c.vips[0]);
        assert!(
            table.iter().all(|a| *a == Some(ip(11))),
            "only the active backend takes new flows"
        );
        assert_ne!(
            entry_of(&r, &c, 12).flags & BACKEND_F_KEEP_FLOWS,
            0,
            "drain keeps flows"
        );
        assert_eq!(
            entry_of(&r, &c, 13).flags & BACKEND_F_KEEP_FLOWS,
            0,
            "disabled loses flows"
        );
        // A draining backend that goes down loses its flows too.
        r.apply(&c, &down(&c, &[12]), &neighbours()).unwrap();
        assert_eq!(entry_of(&r, &c, 12).flags & BACKEND_F_KEEP_FLOWS, 0);
    }

    #[test]
    fn all_down_fails_open_over_every_active_backend() {
        let mut r = reconciler();
        let c = config_with(
            &backends(&[(11, 1, "active"), (12, 1, "active"), (13, 1, "drain")]),
            "fail_open",
        );
        let swaps = r
            .apply(&c, &down(&c, &[11, 12, 13]), &neighbours())
            .unwrap();
        assert_eq!(swaps[0], swap("web", 2, true));
        let table: BTreeSet<_> = active_addresses(&r, &c.vips[0]).into_iter().collect();
        assert_eq!(table, BTreeSet::from([Some(ip(11)), Some(ip(12))]));
        for i in [11, 12, 13] {
            assert_ne!(
                entry_of(&r, &c, i).flags & BACKEND_F_KEEP_FLOWS,
                0,
                "{i} keeps flows"
            );
        }
    }

    #[test]
    fn all_down_with_drop_empties_the_table() {
        let mut r = reconciler();
        let c = config_with(&backends(&[(11, 1, "active"), (12, 1, "active")]), "drop");
        let swaps = r.apply(&c, &down(&c, &[11, 12]), &neighbours()).unwrap();
        assert_eq!(swaps[0], swap("web", 0, true));
        let table = r.dataplane().active_table(&vip_key(&c.vips[0])).unwrap();
        assert!(table.iter().all(|&id| id == lb_common::NO_BACKEND));
        assert_eq!(entry_of(&r, &c, 11).flags & BACKEND_F_KEEP_FLOWS, 0);
    }

    #[test]
    fn a_removed_backend_is_invalidated_and_its_id_reused_with_a_new_generation() {
        let mut r = reconciler().with_id_quarantine(Duration::ZERO);
        let c = config(true, 1);
        r.apply(&c, &all_up(), &neighbours()).unwrap();
        let old = entry_of(&r, &c, 13);
        let id = r.backend_ids[&(vip_key(&c.vips[0]), ip(13))];
        r.apply(&config(false, 1), &all_up(), &neighbours())
            .unwrap();
        let gone = r.dataplane().backends[&id];
        assert_eq!(
            (gone.flags, gone.vip_id),
            (0, NO_VIP),
            "its flows are re-placed"
        );
        // Another backend takes the id; flows of the old one cannot follow it.
        let c2 = config_with(
            &backends(&[(11, 1, "active"), (12, 1, "active"), (14, 1, "active")]),
            "fail_open",
        );
        r.apply(&c2, &all_up(), &neighbours()).unwrap();
        let reused = r.dataplane().backends[&id];
        assert_eq!(key_addr(reused.addr), ip(14));
        assert_ne!(reused.generation, old.generation);
    }

    #[test]
    fn freed_ids_are_not_reused_while_a_packet_may_still_hold_them() {
        let mut r = Reconciler::new(FakeDataplane::default(), M, 4);
        let c = config(true, 1);
        r.apply(&c, &all_up(), &neighbours()).unwrap();
        let web = vip_key(&c.vips[0]);
        let id13 = r.backend_id_of(&web, ip(13)).unwrap();
        r.apply(&config(false, 1), &all_up(), &neighbours())
            .unwrap();
        let c14 = config_with(
            &backends(&[(11, 1, "active"), (12, 1, "active"), (14, 1, "active")]),
            "fail_open",
        );
        r.apply(&c14, &all_up(), &neighbours()).unwrap();
        assert_ne!(
            r.backend_id_of(&web, ip(14)),
            Some(id13),
            "quarantined id not reused at once"
        );
    }

    #[test]
    fn a_removed_vip_is_removed_and_its_id_reused() {
        let mut r = reconciler().with_id_quarantine(Duration::ZERO);
        let c = config(false, 1);
        r.apply(&c, &all_up(), &neighbours()).unwrap();
        let mut only_dns = c.clone();
        only_dns.vips.remove(0);
        r.apply(&only_dns, &all_up(), &neighbours()).unwrap();
        assert!(!r.dataplane().vips.contains_key(&vip_key(&c.vips[0])));
        assert_eq!(r.dataplane().vips.len(), 1);
        r.apply(&c, &all_up(), &neighbours()).unwrap();
        assert_eq!(
            r.dataplane().vips[&vip_key(&c.vips[0])].id,
            0,
            "lowest free id"
        );
    }

    #[test]
    fn adoption_keeps_ids_health_and_tables() {
        let mut r = reconciler();
        let c = config(true, 1);
        r.apply(&c, &down(&c, &[13]), &neighbours()).unwrap();
        let before_vips = r.dataplane().vips.clone();
        let before_backends = r.dataplane().backends.clone();
        let table_before = r.dataplane().active_table(&vip_key(&c.vips[0])).unwrap();
        let mut dp = std::mem::take(&mut r.dp);
        dp.log.clear();

        let (mut adopted, health) = Reconciler::adopt(dp, M, 4).unwrap();
        assert!(
            adopted.dataplane().log.is_empty(),
            "adoption writes nothing"
        );
        assert!(!health[&(vip_key(&c.vips[0]), ip(13))]);
        assert!(health[&(vip_key(&c.vips[0]), ip(11))]);
        adopted.apply(&c, &health, &neighbours()).unwrap();
        let dp = adopted.dataplane();
        // Same ids and generations; one rebuild into the other half gives the
        // identical table, so no flow moves.
        assert_eq!(dp.backends, before_backends);
        assert_eq!(dp.active_table(&vip_key(&c.vips[0])).unwrap(), table_before);
        for (k, e) in &before_vips {
            assert_eq!(dp.vips[k].id, e.id);
        }
        // A new backend gets a generation never used before.
        adopted
            .apply(
                &config_with(
                    &backends(&[(11, 1, "active"), (14, 1, "active")]),
                    "fail_open",
                ),
                &health,
                &neighbours(),
            )
            .unwrap();
        let max_before = before_backends
            .values()
            .map(|e| e.generation)
            .max()
            .unwrap();
        let new = adopted
            .dataplane()
            .backends
            .values()
            .find(|e| key_addr(e.addr) == ip(14))
            .unwrap();
        assert!(new.generation > max_before);
    }

    #[test]
    fn ipv6_vips_and_backends_get_their_family_s_entries() {
        let text = format!(
            "interface: eth0\nmaglev: {{ table_size: {M}, seed: 7 }}\nvips:\n\
             - name: web6\n  address: 2001:db8::100\n  port: 80\n  protocol: tcp\n  forwarding: ipip\n  backends:\n\
             \x20   - {{ address: \"2001:db8:1::11\", weight: 1 }}\n\
             - name: web4\n  address: 10.0.0.100\n  port: 80\n  protocol: tcp\n  forwarding: ipip\n  backends:\n\
             \x20   - {{ address: \"2001:db8:1::11\", weight: 1 }}\n\
             - name: l2\n  address: 2001:db8::100\n  port: 53\n  protocol: udp\n  forwarding: l2\n  backends:\n\
             \x20   - {{ address: 10.0.0.11, weight: 1 }}\n"
        );
        let c = Config::parse(&text, Path::new("t.yaml")).expect("valid");
        let backend: IpAddr = "2001:db8:1::11".parse().unwrap();
        let source: IpAddr = "2001:db8::3".parse().unwrap();
        let mut n = neighbours();
        n.insert(
            backend,
            Neighbour {
                ifindex: 3,
                mac: [2, 0, 0, 0, 0, 0x66],
                src_mac: [2; 6],
                src_addr: Some(source),
                mtu: 1500,
            },
        );
        let mut r = reconciler();
        r.apply(&c, &all_up(), &n).unwrap();
        let entry = |vip: usize, addr: IpAddr| {
            let id = r.backend_ids[&(vip_key(&c.vips[vip]), addr)];
            r.dataplane().backends[&id]
        };
        for vip in [0, 1] {
            let e = entry(vip, backend);
            assert_eq!(e.forwarding, FORWARD_IP6, "{}", c.vips[vip].name);
            assert_eq!((key_addr(e.addr), key_addr(e.encap_src)), (backend, source));
            assert_eq!(e.flags & BACKEND_F_RESOLVED, BACKEND_F_RESOLVED);
        }
        assert_eq!(entry(2, ip(11)).forwarding, FORWARD_L2);
        assert_eq!(
            key_addr(vip_key(&c.vips[0]).addr),
            "2001:db8::100".parse::<IpAddr>().unwrap()
        );
        let filter = &r.dataplane().vip_filter;
        assert!(FakeDataplane::admits(filter, c.vips[0].address));
        assert!(FakeDataplane::admits(filter, ip(100)));
    }

    #[test]
    fn the_vip_filter_admits_old_and_new_vips_during_a_change_and_only_new_ones_after() {
        let mut r = reconciler();
        let c = config(false, 1);
        r.apply(&c, &all_up(), &neighbours()).unwrap();
        assert!(FakeDataplane::admits(&r.dataplane().vip_filter, ip(100)));
        let moved = Config::parse(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../config/example.yaml"
            ))
            .unwrap()
            .replace("table_size: 65537", "table_size: 251"),
            Path::new("example.yaml"),
        )
        .unwrap();
        let (mark, filters) = (r.dataplane().log.len(), r.dataplane().vip_filters.len());
        r.apply(&moved, &all_up(), &Neighbours::new()).unwrap();
        let log = &r.dataplane().log[mark..];
        let written = &r.dataplane().vip_filters[filters..];
        let new_vip = IpAddr::from([192, 0, 2, 10]);
        // Widened to both VIPs before any VIP entry changes...
        let first_vip_change = log.iter().position(|l| l.contains("_vip ")).unwrap();
        assert_eq!(
            log[..first_vip_change]
                .iter()
                .filter(|l| *l == "set_vip_filter")
                .count(),
            1,
            "{log:?}"
        );
        assert!(
            FakeDataplane::admits(&written[0], ip(100))
                && FakeDataplane::admits(&written[0], new_vip)
        );
        // ...narrowed to the new one after the last.
        assert_eq!(
            log.last().map(String::as_str),
            Some("set_vip_filter"),
            "{log:?}"
        );
        let last = written.last().unwrap();
        assert!(FakeDataplane::admits(last, new_vip));
        assert!(
            !FakeDataplane::admits(last, ip(100)),
            "the old VIP address is filtered out"
        );
    }

    #[test]
    fn a_seed_change_rebuilds_every_table() {
        let mut r = reconciler();
        let c = config(false, 1);
        r.apply(&c, &all_up(), &neighbours()).unwrap();
        let before = r.dataplane().active_table(&vip_key(&c.vips[0])).unwrap();
        let mut reseeded = c.clone();
        reseeded.seed = 8;
        let swaps = r.apply(&reseeded, &all_up(), &neighbours()).unwrap();
        assert_eq!(swaps.len(), 2, "both VIPs rebuilt");
        assert_ne!(
            r.dataplane().active_table(&vip_key(&c.vips[0])).unwrap(),
            before
        );
        let expected = planned_addresses(&reseeded);
        assert_eq!(active_addresses(&r, &c.vips[0]), expected);
    }

    #[test]
    fn a_new_backend_id_gets_zeroed_counters_and_a_flagless_entry_first() {
        let mut r = reconciler();
        r.apply(&config(false, 1), &all_up(), &neighbours())
            .unwrap();
        let mark = r.dataplane().log.len();
        r.apply(&config(true, 1), &all_up(), &neighbours()).unwrap();
        let log = &r.dataplane().log[mark..];
        assert_eq!(
            &log[..3],
            [
                "set_backend 3",
                "zero_traffic None Some(3)",
                "set_backend 3"
            ],
            "{log:?}"
        );
    }

    #[test]
    fn adoption_refuses_maps_of_another_layout() {
        let mut r = reconciler();
        r.apply(&config(false, 1), &all_up(), &neighbours())
            .unwrap();
        let mut dp = std::mem::take(&mut r.dp);
        dp.global.layout_version = lb_common::LAYOUT_VERSION + 1;
        assert!(matches!(
            Reconciler::adopt(dp, M, 4),
            Err(ReconcileError::Layout { .. })
        ));
    }

    #[test]
    fn a_different_table_size_is_refused() {
        let mut r = Reconciler::new(FakeDataplane::default(), 257, 4);
        let e = r
            .apply(&config(false, 1), &all_up(), &neighbours())
            .unwrap_err();
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
        let c = config(false, 1);
        r.apply(&c, &all_up(), &neighbours()).unwrap();
        let mut counters = r.dataplane().counters().unwrap();
        let web = r.dataplane().vips[&vip_key(&c.vips[0])].id as usize;
        counters.vips[web] = Traffic {
            packets: 3,
            bytes: 180,
            new_flows: 1,
        };
        let id12 = r.backend_ids[&(vip_key(&c.vips[0]), ip(12))] as usize;
        counters.backends[id12] = Traffic {
            packets: 2,
            bytes: 120,
            new_flows: 1,
        };
        let t = r.traffic(&counters);
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
}
