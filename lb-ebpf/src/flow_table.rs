//! The flow table's mechanics (layout in `lb_common::flow_table`): find a
//! flow's entry in its bucket, choose an entry for a new flow, and write
//! entries so that no packet ever follows a torn or foreign one.
//!
//! Why no torn entry is ever followed: an entry is `check` and `meta`, each
//! loaded and stored whole. A writer first claims the entry with a
//! compare-and-swap of `meta` to a locked value, so there is one writer at a
//! time (a writer that loses the race leaves the flow untracked), then
//! stores `check`, then the new `meta` with a write count one higher. A
//! reader loads `meta`, `check` and `meta` again (volatile loads, which
//! x86-64 keeps in order) and uses the entry only when neither `meta` is
//! locked and both are equal: a rewrite in between either shows as the lock
//! or changes the write count (it would take eight complete rewrites of the
//! same entry within three loads to bring it back). Updates of a live entry
//! by the packets of its own flow (state, last seen) are compare-and-swaps
//! of `meta` alone and never touch `check`.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use lb_common::{
    Stat,
    flow_table::{
        FlowBucket, FlowSlot, META_LOCK, META_UDP, Meta, SlotState, WAYS, idle_ns, meta_seq,
        meta_state,
    },
};

/// Where a flow's entry is or may go: its bucket, its keyed hash and the
/// clock in last-seen units.
#[derive(Clone, Copy)]
pub struct Place {
    pub bucket: *mut FlowBucket,
    pub check: u64,
    pub now_seen: u32,
}

/// An entry the flow already has (stale: expired or its backend gone),
/// which a re-placement rewrites in place.
#[derive(Clone, Copy)]
pub struct Own {
    pub slot: *mut FlowSlot,
    pub meta: u64,
}

#[inline(always)]
fn slot(bucket: *mut FlowBucket, way: usize) -> *mut FlowSlot {
    // SAFETY: `way < WAYS`, so the slot lies inside the bucket.
    unsafe { (bucket as *mut FlowSlot).add(way) }
}

#[inline(always)]
fn load_meta(slot: *mut FlowSlot) -> u64 {
    // SAFETY: a valid map value; volatile so each load really happens, in
    // program order (other CPUs write the entry concurrently).
    unsafe { core::ptr::read_volatile(&raw const (*slot).meta) }
}

#[inline(always)]
fn load_check(slot: *mut FlowSlot) -> u64 {
    // SAFETY: as for `load_meta`.
    unsafe { core::ptr::read_volatile(&raw const (*slot).check) }
}

/// Replaces `meta` with `new` if it still is `old`; false when another CPU
/// changed it first.
#[inline(always)]
pub fn swap_meta(slot: *mut FlowSlot, old: u64, new: u64) -> bool {
    // The BPF target's `core` offers no `AtomicU64::compare_exchange`; the
    // intrinsic becomes the BPF_CMPXCHG instruction.
    // SAFETY: a valid, 8-byte aligned map value; every writer of `meta`
    // goes through here or owns the entry's lock.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            &raw mut (*slot).meta,
            old,
            new,
        )
    }
    .1
}

/// The `meta` of the entry whose check is `check`, read consistently, or
/// `None` when the entry belongs to another flow (or is being rewritten).
#[inline(always)]
fn matching(slot: *mut FlowSlot, check: u64) -> Option<u64> {
    // A second try only when a live update of the same entry raced the
    // first (for example its own flow's packet on another CPU).
    for _ in 0..2 {
        let before = load_meta(slot);
        if before & META_LOCK != 0 || meta_state(before) == SlotState::Free as u64 {
            return None;
        }
        if load_check(slot) != check {
            return None;
        }
        if load_meta(slot) == before {
            return Some(before);
        }
    }
    None
}

/// The flow's entry in its bucket: the slot and its `meta`.
#[inline(always)]
pub fn find(place: &Place) -> Option<Own> {
    for way in 0..WAYS {
        let s = slot(place.bucket, way);
        if let Some(meta) = matching(s, place.check) {
            return Some(Own { slot: s, meta });
        }
    }
    None
}

/// Limits on what a new flow may take.
pub struct Eviction {
    pub udp_timeout_ns: u64,
    pub idle_evict_ns: u64,
}

/// A new flow's entry: `state`, family and protocol, backend and generation.
pub struct NewEntry {
    pub udp: bool,
    pub v6: bool,
    pub state: SlotState,
    pub backend_id: u32,
    pub generation: u32,
}

/// Remembers a placed flow. With `own`, its stale entry is rewritten;
/// otherwise it takes, in this order, a free entry of its bucket, a closed
/// or expired one, the least recently seen single-packet one, or the least
/// recently seen established one idle for longer than `idle_evict_ns`.
/// Returns the eviction counter to move (if an entry was taken from another
/// flow), or `Err(Stat::Untracked)` when there was no entry to take.
#[inline(always)]
pub fn remember(
    place: &Place,
    own: Option<Own>,
    entry: &NewEntry,
    limits: &Eviction,
) -> Result<Option<Stat>, Stat> {
    let (target, evicted) = match own {
        Some(own) => (own, None),
        None => victim(place, limits).ok_or(Stat::Untracked)?,
    };
    if !swap_meta(target.slot, target.meta, target.meta | META_LOCK) {
        // Another CPU is writing or refreshing this entry right now.
        return Err(Stat::Untracked);
    }
    let meta = Meta {
        state: entry.state,
        udp: entry.udp,
        v6: entry.v6,
        seq: meta_seq(target.meta).wrapping_add(1),
        backend_id: entry.backend_id as u16,
        generation: entry.generation as u16,
        seen: place.now_seen,
    }
    .pack();
    // SAFETY: valid map value, owned by this CPU while locked; plain
    // aligned 64-bit stores, check first (see the module's comment).
    unsafe {
        core::ptr::write_volatile(&raw mut (*target.slot).check, place.check);
        core::ptr::write_volatile(&raw mut (*target.slot).meta, meta);
    }
    Ok(evicted)
}

/// The entry a new flow takes, with the eviction counter it moves.
#[inline(always)]
fn victim(place: &Place, limits: &Eviction) -> Option<(Own, Option<Stat>)> {
    // Best candidate so far: (rank, idle, way, meta); lower rank wins, then
    // longer idle.
    let mut best: Option<(u32, u64, usize, u64)> = None;
    for way in 0..WAYS {
        let meta = load_meta(slot(place.bucket, way));
        if meta & META_LOCK != 0 {
            continue;
        }
        let idle = idle_ns(meta, place.now_seen);
        let state = meta_state(meta);
        let rank = if state == SlotState::Free as u64 {
            0
        } else if state == SlotState::Closed as u64
            || (meta & META_UDP != 0 && idle > limits.udp_timeout_ns)
        {
            1
        } else if state == SlotState::New as u64 {
            2
        } else if idle > limits.idle_evict_ns {
            3
        } else {
            continue;
        };
        if best.is_none_or(|(r, i, _, _)| rank < r || rank == r && idle > i) {
            best = Some((rank, idle, way, meta));
        }
        if rank == 0 {
            break;
        }
    }
    let (rank, _, way, meta) = best?;
    let evicted = match rank {
        0 => None,
        1 if meta_state(meta) == SlotState::Closed as u64 => Some(Stat::EvictClosed),
        1 => Some(Stat::EvictExpired),
        2 => Some(Stat::EvictSinglePacket),
        _ => Some(Stat::EvictIdle),
    };
    let own = Own {
        slot: slot(place.bucket, way),
        meta,
    };
    Some((own, evicted))
}
