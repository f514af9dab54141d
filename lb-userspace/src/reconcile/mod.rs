//! Turns (config, backend health, neighbour table) into map contents and
//! applies only the difference. The [`Reconciler`] is the single writer of the
//! maps: every change the control plane makes goes through
//! [`Reconciler::apply`].
//!
//! Table swaps are whole: a VIP's new table is written to the half its entry
//! does not point at, and only then is the VIP entry rewritten (one atomic map
//! update) to name that half.

mod applied;
mod entries;
mod ids;
mod plan;
mod room;
mod tables;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::{
    BACKEND_F_HEALTHY, GlobalConfig, TABLE_HALVES, VipEntry, VipKey, key_addr, vip_filter_bit_of,
};

pub use self::{
    applied::{Applied, AppliedVip, SWAP_GRACE},
    ids::ID_QUARANTINE,
    plan::{VipPlan, backend_keys, plan, plan_vip},
    tables::TableJob,
};
use self::{
    entries::{BackendFacts, backend_entry},
    ids::Ids,
    room::no_room_message,
};
use crate::{
    config::{Config, Vip},
    dataplane::{Dataplane, DataplaneError, VipFilter},
    maglev,
    model::{Health, Neighbours, is_up},
};

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
    /// Found before anything was written: the maps are as they were.
    #[error("{}", no_room_message(.what, *.needed, *.free, *.quarantined, *.capacity))]
    NoRoom {
        what: &'static str,
        needed: u32,
        free: u32,
        quarantined: u32,
        capacity: u32,
        /// When enough ids come out of quarantine for the change to fit;
        /// `None` when it never fits.
        retry_at: Option<Instant>,
    },
    #[error(
        "the pinned maps were written with layout {found}, this build uses {wanted}; remove them with `lb stop` first"
    )]
    Layout { found: u32, wanted: u32 },
}

impl ReconcileError {
    /// When the same change may succeed if tried again: `None` for a change
    /// that can never apply (it is wrong, not unlucky).
    pub fn retry_at(&self, now: Instant) -> Option<Instant> {
        match self {
            ReconcileError::NoRoom { retry_at, .. } => *retry_at,
            ReconcileError::Dataplane(_) | ReconcileError::Exhausted { .. } => Some(now),
            ReconcileError::TableSizeChanged { .. } | ReconcileError::Layout { .. } => None,
        }
    }
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

/// The single writer of the maps, over dataplane `D`.
pub struct Reconciler<D> {
    dp: D,
    /// Slots of one table half, fixed by the loaded maps.
    table_size: u32,
    ids: Ids,
    /// The global settings last written.
    global: Option<GlobalConfig>,
    /// The VIP filter last written.
    vip_filter: Option<VipFilter>,
    /// The VIP and backend entries last written.
    applied: Applied,
    /// How long a retired table half stays untouched.
    swap_grace: Duration,
    /// Tables built elsewhere for the next apply, with their build time.
    prebuilt: HashMap<TableJob, (maglev::Table, Duration)>,
}

/// The VIP destination bitmap for a set of VIP keys.
fn vip_filter<'a>(keys: impl IntoIterator<Item = &'a VipKey>) -> VipFilter {
    let mut words = [0u64; lb_common::VIP_FILTER_WORDS as usize];
    for k in keys {
        let (w, bit) = vip_filter_bit_of(key_addr(k.addr));
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
            ids: Ids::new(max_vips),
            global: None,
            vip_filter: None,
            applied: Applied::default(),
            swap_grace: SWAP_GRACE,
            prebuilt: HashMap::new(),
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
            r.ids.vips.claim(entry.id);
            r.applied.vips.insert(key, AppliedVip::adopted(entry, half));
        }
        let mut health = Health::new();
        for (id, entry) in snapshot.backends {
            r.ids.generations.seen(entry.generation);
            // Ids of removed backends stay free; their generation still counts.
            let Some(&vip) = by_id.get(&entry.vip_id) else {
                continue;
            };
            let addr = key_addr(entry.addr);
            r.ids.backends.claim(id);
            r.applied.backend_ids.insert((vip, addr), id);
            r.applied.backends.insert(id, entry);
            health.insert((vip, addr), entry.flags & BACKEND_F_HEALTHY != 0);
        }
        Ok((r, health))
    }

    pub fn dataplane(&self) -> &D {
        &self.dp
    }

    /// What the maps hold, for read-side queries.
    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    /// How long freed ids stay unused (default [`ID_QUARANTINE`]); tests of
    /// id reuse shorten it.
    pub fn with_id_quarantine(mut self, quarantine: Duration) -> Self {
        self.ids.set_quarantine(quarantine);
        self
    }

    /// How long a retired table half stays untouched (default
    /// [`SWAP_GRACE`]); tests about what is written rather than when set it
    /// to zero.
    pub fn with_swap_grace(mut self, grace: Duration) -> Self {
        self.swap_grace = grace;
        self
    }

    /// When to apply again: the earliest instant a VIP whose rebuild was
    /// deferred may have its retired half written. `None` when nothing
    /// waits.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.applied
            .vips
            .values()
            .filter(|a| a.deferred)
            .filter_map(|a| a.writable_at)
            .min()
    }

    /// Makes the maps express `config` with `health` and the MACs in
    /// `neighbours`. Returns the VIPs whose table was swapped.
    ///
    /// Order matters, since the program reads the maps throughout: the VIP
    /// filter widens first; removed VIPs stop matching and their backends
    /// stop keeping flows before any id is reused; each VIP's backend entries
    /// are written before the table naming them, and the table before the
    /// VIP entry that points at it; backends removed from a VIP lose their
    /// flows only once its new table (which no longer names them) is active;
    /// the VIP filter narrows last.
    ///
    /// A table half retired by a swap is rewritten only [`SWAP_GRACE`] later.
    /// A VIP whose rebuild comes sooner keeps its active table for now and
    /// the call does not wait: apply again at
    /// [`next_deadline`](Self::next_deadline).
    pub fn apply(
        &mut self,
        config: &Config,
        health: &Health,
        neighbours: &Neighbours,
    ) -> Result<Vec<Swap>, ReconcileError> {
        // Every apply decides afresh which VIPs wait (a failed one leaves
        // none waiting on a deadline already past).
        for a in self.applied.vips.values_mut() {
            a.deferred = false;
        }
        self.check_table_size(config)?;
        let wanted: BTreeSet<VipKey> = config.vips.iter().map(|v| v.key).collect();
        let moves = self.moved_vips(config, &wanted);
        self.check_room(config, &moves)?;
        self.write_global(config)?;
        self.widen_vip_filter(&wanted)?;
        self.move_vips(&moves)?;
        self.remove_gone_vips(&wanted)?;
        let swaps = self.apply_vips(config, health, neighbours);
        // Whatever was not used was built for another state.
        self.prebuilt.clear();
        let swaps = swaps?;
        self.release_removed_backends(config)?;
        self.narrow_vip_filter(&wanted)?;
        Ok(swaps)
    }

    fn check_table_size(&self, config: &Config) -> Result<(), ReconcileError> {
        if config.table_size != self.table_size {
            return Err(ReconcileError::TableSizeChanged {
                loaded: self.table_size,
                new: config.table_size,
            });
        }
        Ok(())
    }

    fn write_global(&mut self, config: &Config) -> Result<(), ReconcileError> {
        let global = GlobalConfig {
            hash_seed: config.seed,
            layout_version: lb_common::LAYOUT_VERSION,
            udp_idle_timeout_ns: config.udp_idle_timeout.as_nanos() as u64,
        };
        if self.global != Some(global) {
            self.dp.set_global(global)?;
            self.global = Some(global);
        }
        Ok(())
    }

    /// Admits the wanted VIPs and those still in the maps.
    fn widen_vip_filter(&mut self, wanted: &BTreeSet<VipKey>) -> Result<(), ReconcileError> {
        let words = vip_filter(wanted.iter().chain(self.applied.vips.keys()));
        self.write_vip_filter(words)
    }

    /// Admits only the wanted VIPs.
    fn narrow_vip_filter(&mut self, wanted: &BTreeSet<VipKey>) -> Result<(), ReconcileError> {
        self.write_vip_filter(vip_filter(wanted))
    }

    fn write_vip_filter(&mut self, words: VipFilter) -> Result<(), ReconcileError> {
        if self.vip_filter != Some(words) {
            self.dp.set_vip_filter(&words)?;
            self.vip_filter = Some(words);
        }
        Ok(())
    }

    /// Removes the VIPs not `wanted` and releases their backends.
    fn remove_gone_vips(&mut self, wanted: &BTreeSet<VipKey>) -> Result<(), ReconcileError> {
        let gone: Vec<VipKey> = self
            .applied
            .vips
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for key in &gone {
            self.dp.remove_vip(*key)?;
            if let Some(a) = self.applied.vips.remove(key) {
                self.ids.vips.release(a.id(), Instant::now());
            }
        }
        self.release_backends(|(vip, _)| gone.contains(vip))
    }

    /// Releases the backends no longer in `config`, except those of a VIP
    /// whose rebuild was deferred: its active table may still name them.
    fn release_removed_backends(&mut self, config: &Config) -> Result<(), ReconcileError> {
        let live = backend_keys(config);
        let waiting: BTreeSet<VipKey> = self
            .applied
            .vips
            .iter()
            .filter(|(_, a)| a.deferred)
            .map(|(k, _)| *k)
            .collect();
        self.release_backends(|k| !live.contains(k) && !waiting.contains(&k.0))
    }

    /// Makes backends matching `gone` lose their flows (a flow that still
    /// names one is re-placed) and frees their ids.
    fn release_backends(
        &mut self,
        gone: impl Fn(&(VipKey, IpAddr)) -> bool,
    ) -> Result<(), ReconcileError> {
        let stale: Vec<((VipKey, IpAddr), u32)> = self
            .applied
            .backend_ids
            .iter()
            .filter(|(k, _)| gone(k))
            .map(|(k, &id)| (*k, id))
            .collect();
        for (k, id) in stale {
            if let Some(entry) = self.applied.backends.remove(&id) {
                self.dp.set_backend(id, entries::released(entry))?;
            }
            self.applied.backend_ids.remove(&k);
            self.ids.backends.release(id, Instant::now());
        }
        Ok(())
    }

    /// Each VIP of `config` in turn; returns the swaps done.
    fn apply_vips(
        &mut self,
        config: &Config,
        health: &Health,
        neighbours: &Neighbours,
    ) -> Result<Vec<Swap>, ReconcileError> {
        let mut swaps = Vec::new();
        for vip in &config.vips {
            swaps.extend(self.apply_vip(vip, health, neighbours)?);
        }
        Ok(swaps)
    }

    /// One VIP: its id, its backend entries, then (if its members or the
    /// seed changed and the half to write is past its grace) its table and
    /// the VIP entry naming it.
    fn apply_vip(
        &mut self,
        vip: &Vip,
        health: &Health,
        neighbours: &Neighbours,
    ) -> Result<Option<Swap>, ReconcileError> {
        let plan = plan_vip(vip, |a| is_up(health, vip.key, a));
        let vip_id = self.vip_id(vip.key)?;
        let ids = self.write_backend_entries(vip, vip_id, &plan, health, neighbours)?;
        match self.half_to_rebuild(vip, &plan) {
            Some(half) => self.swap_table(vip, vip_id, half, &plan, &ids).map(Some),
            None => Ok(None),
        }
    }

    /// The half a new table for `vip` goes to; `None` when the active table
    /// already matches `plan` and the seed, or when the half is still in its
    /// grace (the VIP is then deferred).
    fn half_to_rebuild(&mut self, vip: &Vip, plan: &VipPlan) -> Option<u32> {
        let seed = self.seed();
        let Some(a) = self.applied.vips.get_mut(&vip.key) else {
            return Some(0);
        };
        a.name.clone_from(&vip.name);
        if a.members.as_ref() == Some(&plan.members) && a.seed == seed {
            return None;
        }
        if !a.writable(Instant::now()) {
            a.deferred = true;
            return None;
        }
        Some(a.inactive_half())
    }

    fn seed(&self) -> u32 {
        self.global.map_or(0, |g| g.hash_seed)
    }

    /// Builds `vip`'s table from `plan`, writes it into `half`, then points
    /// the VIP entry at it.
    fn swap_table(
        &mut self,
        vip: &Vip,
        vip_id: u32,
        half: u32,
        plan: &VipPlan,
        ids: &BTreeMap<IpAddr, u32>,
    ) -> Result<Swap, ReconcileError> {
        let seed = self.seed();
        let job = TableJob {
            members: plan.members.clone(),
            size: self.table_size,
            seed,
        };
        let (table, build) = match self.prebuilt.remove(&job) {
            Some(built) => built,
            None => job.build(),
        };
        let table_base = self.write_table(vip_id, half, &table, ids)?;
        let shares = table
            .backends
            .iter()
            .zip(table.slot_counts())
            .map(|(b, n)| (b.address, n as f64 / self.table_size as f64))
            .collect();
        let applied = AppliedVip {
            entry: VipEntry {
                id: vip_id,
                table_base,
                table_size: self.table_size,
            },
            name: vip.name.clone(),
            half,
            members: Some(plan.members.clone()),
            seed,
            shares,
            writable_at: None,
            deferred: false,
        };
        self.point_vip_at(vip.key, applied)?;
        Ok(Swap {
            vip: vip.key,
            name: vip.name.clone(),
            members: plan.members.len(),
            all_down: plan.all_down,
            build,
        })
    }

    /// The VIP's id: the one it has, or the lowest free one (with its
    /// counters zeroed), claimed once the VIP entry names it.
    fn vip_id(&mut self, key: VipKey) -> Result<u32, ReconcileError> {
        if let Some(a) = self.applied.vips.get(&key) {
            return Ok(a.id());
        }
        let id = self.ids.vips.lowest_free(Instant::now())?;
        self.dp.zero_traffic(Some(id), None)?;
        Ok(id)
    }

    /// Writes the entries of the VIP's backends that changed; returns every
    /// backend's id. These come first: a table may only name ids whose entry
    /// exists.
    fn write_backend_entries(
        &mut self,
        vip: &Vip,
        vip_id: u32,
        plan: &VipPlan,
        health: &Health,
        neighbours: &Neighbours,
    ) -> Result<BTreeMap<IpAddr, u32>, ReconcileError> {
        let mut ids = BTreeMap::new();
        for b in &vip.backends {
            let (id, generation) = self.backend_id(vip, b.address)?;
            let entry = backend_entry(
                vip,
                b.address,
                BackendFacts {
                    vip_id,
                    generation,
                    neighbour: neighbours.get(&b.address),
                    keep_flows: plan.keep_flows.contains(&b.address),
                    healthy: is_up(health, vip.key, b.address),
                },
            );
            if self.applied.backends.get(&id) != Some(&entry) {
                self.dp.set_backend(id, entry)?;
                self.applied.backends.insert(id, entry);
            }
            ids.insert(b.address, id);
        }
        Ok(ids)
    }

    /// The id (and its generation) of `addr` in `vip`, handing out one with
    /// a new generation and zeroed counters if it has none: the id of a
    /// backend this change removes from the same VIP (a packet that still
    /// reaches it through the VIP's old table lands on a backend of the same
    /// VIP, as a re-placed flow would; the generation keeps old flows off
    /// it), else the lowest free one. A new id is first written as a
    /// [placeholder](entries::placeholder).
    fn backend_id(&mut self, vip: &Vip, addr: IpAddr) -> Result<(u32, u32), ReconcileError> {
        let key = vip.key;
        if let Some(id) = self.applied.backend_id(&key, addr) {
            let generation = self.applied.backends.get(&id).map_or(0, |e| e.generation);
            return Ok((id, generation));
        }
        let removed = self
            .applied
            .backend_ids(&key)
            .find(|(a, _)| !vip.backends.iter().any(|b| b.address == *a));
        let id = match removed {
            Some((_, id)) => id,
            None => self.ids.backends.lowest_free(Instant::now())?,
        };
        let generation = self.ids.generations.next();
        let placeholder = entries::placeholder(generation);
        self.dp.set_backend(id, placeholder)?;
        self.dp.zero_traffic(None, Some(id))?;
        if let Some((old, _)) = removed {
            self.applied.backend_ids.remove(&(key, old));
        }
        self.ids.backends.claim(id);
        self.applied.backends.insert(id, placeholder);
        self.applied.backend_ids.insert((key, addr), id);
        Ok((id, generation))
    }

    /// Writes `table` into `half` of VIP `vip_id`'s slots; returns where it
    /// starts.
    fn write_table(
        &mut self,
        vip_id: u32,
        half: u32,
        table: &maglev::Table,
        ids: &BTreeMap<IpAddr, u32>,
    ) -> Result<u32, ReconcileError> {
        let table_base = (vip_id * TABLE_HALVES + half) * self.table_size;
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
        Ok(table_base)
    }

    /// Points the VIP entry at the table just written (the swap) and
    /// records what the maps now hold for the VIP.
    fn point_vip_at(&mut self, key: VipKey, mut next: AppliedVip) -> Result<(), ReconcileError> {
        let previous = self.applied.vips.get(&key);
        next.writable_at = previous.and_then(|a| a.writable_at);
        if previous.is_none_or(|a| a.entry != next.entry) {
            self.dp.set_vip(key, next.entry)?;
            next.writable_at = Some(Instant::now() + self.swap_grace);
        }
        if previous.is_none() {
            self.ids.vips.claim(next.id());
        }
        self.applied.vips.insert(key, next);
        Ok(())
    }
}
