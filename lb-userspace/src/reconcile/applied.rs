//! What the reconciler last wrote to the maps, kept so the next apply writes
//! only the difference. Read-side code (status, counters) reads it through
//! [`Applied`]'s accessors; only the reconciler changes it.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::{BackendEntry, TABLE_HALVES, VipEntry, VipKey};

use crate::maglev::Weighted;

/// How long a table half that was just retired stays untouched. XDP runs a
/// packet in well under a microsecond; a millisecond covers any packet that
/// read the VIP entry just before the swap.
pub const SWAP_GRACE: Duration = Duration::from_millis(1);

/// One VIP as the maps hold it.
#[derive(Debug)]
pub struct AppliedVip {
    pub(super) entry: VipEntry,
    pub(super) name: String,
    /// Half the VIP entry points at.
    pub(super) half: u32,
    /// The members the active table was built from; `None` when unknown
    /// (adopted from a previous run), which forces one rebuild.
    pub(super) members: Option<Vec<Weighted>>,
    /// The hash seed the active table was built with.
    pub(super) seed: u32,
    /// Each member's fraction of the active table's slots.
    pub(super) shares: BTreeMap<IpAddr, f64>,
    /// When the half retired by the last swap may be written again.
    pub(super) writable_at: Option<Instant>,
    /// A rebuild is due but waits for `writable_at`.
    pub(super) deferred: bool,
}

impl AppliedVip {
    /// A VIP found in maps a previous run wrote, its entry pointing at
    /// `half`.
    pub(super) fn adopted(entry: VipEntry, half: u32) -> Self {
        Self {
            entry,
            name: String::new(),
            half,
            members: None,
            seed: 0,
            shares: BTreeMap::new(),
            writable_at: None,
            deferred: false,
        }
    }

    /// The VIP's id (its index in the VIP counters).
    pub fn id(&self) -> u32 {
        self.entry.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Fraction of the VIP's active table each backend holds.
    pub fn shares(&self) -> &BTreeMap<IpAddr, f64> {
        &self.shares
    }

    /// The half a rebuild writes: the one the entry does not point at.
    pub(super) fn inactive_half(&self) -> u32 {
        (self.half + 1) % TABLE_HALVES
    }

    /// Whether the inactive half may be written at `now`.
    pub(super) fn writable(&self, now: Instant) -> bool {
        self.writable_at.is_none_or(|at| now >= at)
    }
}

/// Every VIP and backend entry the reconciler wrote.
#[derive(Debug, Default)]
pub struct Applied {
    pub(super) vips: BTreeMap<VipKey, AppliedVip>,
    pub(super) backend_ids: BTreeMap<(VipKey, IpAddr), u32>,
    pub(super) backends: BTreeMap<u32, BackendEntry>,
}

impl Applied {
    pub fn vip(&self, key: &VipKey) -> Option<&AppliedVip> {
        self.vips.get(key)
    }

    pub fn vips(&self) -> impl Iterator<Item = (&VipKey, &AppliedVip)> {
        self.vips.iter()
    }

    /// The backend id of `addr` in VIP `key`, if it has one.
    pub fn backend_id(&self, key: &VipKey, addr: IpAddr) -> Option<u32> {
        self.backend_ids.get(&(*key, addr)).copied()
    }

    /// Every backend of VIP `key` with its id, by address.
    pub fn backend_ids(&self, key: &VipKey) -> impl Iterator<Item = (IpAddr, u32)> {
        self.backend_ids
            .range((*key, IpAddr::from([0u8; 4]))..=(*key, IpAddr::from([0xffu8; 16])))
            .map(|(&(_, addr), &id)| (addr, id))
    }
}
