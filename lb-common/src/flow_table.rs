//! The flow table's layout, shared by the program (its only writer of
//! entries) and userspace (which sizes it, keys it and counts its entries).
//!
//! One table for both families: a preallocated, pinned, mmap-able array of
//! 64-byte buckets (one cache line each), [`WAYS`] entries of 16 bytes per
//! bucket. A flow's keyed hash ([`crate::hash::flow_key_v4`] /
//! [`crate::hash::flow_key_v6`], SipHash-1-3 under a per-host random key)
//! picks its bucket and is stored whole as the entry's check word: a packet
//! follows an entry only when all 64 bits agree.
//!
//! Each entry is two words: `check` (the flow's keyed hash) and `meta`
//! (state, family, protocol, backend, generation, last seen). Writers claim
//! an entry by a compare-and-swap of `meta` to a value with [`META_LOCK`]
//! set, store `check`, then store the new `meta` (lock clear). Readers read
//! `meta`, `check`, and `meta` again, and trust the pair only when both
//! `meta` reads agree and are unlocked: a reader can never pair one flow's
//! check with another flow's backend (see lb-ebpf's `flows` module).

/// Entries per bucket: 4 x 16 bytes, one cache line.
pub const WAYS: usize = 4;

/// One entry. Both words are only ever loaded and stored whole (aligned
/// 64-bit accesses, which do not tear).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowSlot {
    /// The flow's keyed hash; meaningful only while `meta` says the entry is
    /// in use.
    pub check: u64,
    /// [`Meta`] packed (see the `META_*` constants).
    pub meta: u64,
}

/// One bucket: a cache line of entries. The array is created with
/// `BPF_F_MMAPABLE`, which places its values page-aligned, so every bucket
/// is exactly one cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowBucket {
    pub slots: [FlowSlot; WAYS],
}

/// Flags of the `FLOW_TABLE` array: `BPF_F_MMAPABLE` (page-aligned values,
/// and userspace counts entries through a mapping instead of a system call
/// per bucket).
pub const FLOW_TABLE_MAP_FLAGS: u32 = 1 << 10;
/// Placeholder size of the `FLOW_TABLE` array; userspace sizes it at load
/// time with [`flow_table_buckets`].
pub const FLOW_TABLE_DEFAULT_BUCKETS: u32 = 1;

/// Buckets for a table of `flows` configured flows: twice as many entries as
/// flows (16 bytes each, so 32 bytes per configured flow), which keeps the
/// share of flows that find their bucket full small (a random 4-way table at
/// half load leaves about 4% of flows without a free entry, at a quarter
/// about 0.4%).
pub const fn flow_table_buckets(flows: u64) -> u32 {
    let buckets = (flows * 2).div_ceil(WAYS as u64);
    if buckets > u32::MAX as u64 {
        u32::MAX
    } else if buckets == 0 {
        1
    } else {
        buckets as u32
    }
}

/// The bucket of a flow whose keyed hash is `hash`, in a table of `buckets`
/// buckets: the top 32 bits scaled to the range (a multiply and a shift, no
/// division, and no power-of-two rounding of the table).
#[inline(always)]
pub fn bucket_of(hash: u64, buckets: u32) -> u32 {
    (((hash >> 32) * buckets as u64) >> 32) as u32
}

/// Value of the `FLOW_PARAMS` array (one element): what the program needs to
/// use the table. Written by userspace at load time; `key` only when the
/// table is new (an adopted table keeps the key its entries were made with).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowParams {
    /// SipHash key of the flow hash: random per host, never the Maglev seed,
    /// so nobody outside can predict which flows share a bucket.
    pub key: [u64; 2],
    /// Buckets in `FLOW_TABLE`.
    pub buckets: u32,
    pub _pad: u32,
    /// An established entry idle for longer than this may be reused for a
    /// new flow (`flow_table.idle_evict`).
    pub idle_evict_ns: u64,
}

/// Lifecycle of an entry, as `meta` bits [`META_STATE_SHIFT`]..
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    Free = 0,
    /// One packet seen: what a flood of spoofed SYNs leaves behind; reused
    /// least recently seen first.
    New = 1,
    /// More than one packet seen: survives floods of new flows.
    Established = 2,
    /// FIN or RST seen: still followed, reused first.
    Closed = 3,
}

/// Set while a writer owns the entry; readers skip it.
pub const META_LOCK: u64 = 1 << 63;
pub const META_STATE_SHIFT: u32 = 61;
/// The entry is a UDP flow (it expires after `udp_idle_timeout`).
pub const META_UDP: u64 = 1 << 60;
/// The entry is an IPv6 flow (for the occupancy metric only).
pub const META_V6: u64 = 1 << 59;
/// A 3-bit count of the writes the entry has had, so a reader whose two
/// `meta` reads straddle a rewrite (or two) never sees them agree.
pub const META_SEQ_SHIFT: u32 = 56;
pub const META_SEQ_MASK: u64 = 7 << META_SEQ_SHIFT;
/// 13 bits (see the assertion on `MAX_BACKENDS` below).
pub const META_BACKEND_SHIFT: u32 = 43;
pub const META_BACKEND_MASK: u64 = 0x1fff;
pub const META_GENERATION_SHIFT: u32 = 27;
/// Last seen, in units of [`SEEN_UNIT_SHIFT`] nanoseconds (about 67 ms; 27
/// bits wrap after 104 days, compared with wrapping arithmetic).
pub const META_SEEN_BITS: u32 = 27;
pub const META_SEEN_MASK: u64 = (1 << META_SEEN_BITS) - 1;
pub const SEEN_UNIT_SHIFT: u32 = 26;

/// `meta` unpacked. The generation is the low 16 bits of the backend's
/// (`BackendEntry::generation`): an id would have to be reused 65,536 times
/// while one of its flows stays in the table for a flow to follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    pub state: SlotState,
    pub udp: bool,
    pub v6: bool,
    /// The entry's write count (mod 8): one more than the entry it replaces.
    pub seq: u8,
    pub backend_id: u16,
    pub generation: u16,
    /// In units of `1 << SEEN_UNIT_SHIFT` ns, [`META_SEEN_BITS`] bits.
    pub seen: u32,
}

impl Meta {
    #[inline(always)]
    pub fn pack(&self) -> u64 {
        ((self.state as u64) << META_STATE_SHIFT)
            | if self.udp { META_UDP } else { 0 }
            | if self.v6 { META_V6 } else { 0 }
            | ((self.seq as u64 & 7) << META_SEQ_SHIFT)
            | ((self.backend_id as u64 & META_BACKEND_MASK) << META_BACKEND_SHIFT)
            | ((self.generation as u64) << META_GENERATION_SHIFT)
            | (self.seen as u64 & META_SEEN_MASK)
    }
}

/// The backend id of a packed `meta`.
#[inline(always)]
pub fn meta_backend(meta: u64) -> u32 {
    ((meta >> META_BACKEND_SHIFT) & META_BACKEND_MASK) as u32
}

/// The generation bits of a packed `meta`.
#[inline(always)]
pub fn meta_generation(meta: u64) -> u16 {
    (meta >> META_GENERATION_SHIFT) as u16
}

/// The write count of a packed `meta`.
#[inline(always)]
pub fn meta_seq(meta: u64) -> u8 {
    ((meta & META_SEQ_MASK) >> META_SEQ_SHIFT) as u8
}

/// The state bits of a packed `meta`.
#[inline(always)]
pub fn meta_state(meta: u64) -> u64 {
    (meta >> META_STATE_SHIFT) & 3
}

/// `meta` with another state.
#[inline(always)]
pub fn meta_with_state(meta: u64, state: SlotState) -> u64 {
    (meta & !(3 << META_STATE_SHIFT)) | ((state as u64) << META_STATE_SHIFT)
}

/// `meta` with another last-seen time.
#[inline(always)]
pub fn meta_with_seen(meta: u64, seen: u32) -> u64 {
    (meta & !META_SEEN_MASK) | (seen as u64 & META_SEEN_MASK)
}

/// A clock reading (ns) in last-seen units.
#[inline(always)]
pub fn seen_of(now_ns: u64) -> u32 {
    ((now_ns >> SEEN_UNIT_SHIFT) & META_SEEN_MASK) as u32
}

/// How long (ns, at last-seen resolution) since an entry's last-seen time.
#[inline(always)]
pub fn idle_ns(meta: u64, now_seen: u32) -> u64 {
    ((now_seen as u64).wrapping_sub(meta) & META_SEEN_MASK) << SEEN_UNIT_SHIFT
}

/// Entries in use, by family: `[IPv4, IPv6]`. Reads each `meta` once; a
/// racing writer can only make the count one off for an instant.
pub fn count_entries(buckets: &[FlowBucket]) -> [u64; 2] {
    let mut n = [0u64; 2];
    for b in buckets {
        for s in &b.slots {
            // SAFETY: a valid reference; volatile because the program
            // writes the table concurrently.
            let meta = unsafe { core::ptr::read_volatile(&s.meta) };
            if meta_state(meta & !META_LOCK) != SlotState::Free as u64 {
                n[(meta & META_V6 != 0) as usize] += 1;
            }
        }
    }
    n
}

const _: () = assert!(size_of::<FlowSlot>() == 16);
const _: () = assert!(size_of::<FlowBucket>() == 64);
const _: () = assert!(size_of::<FlowParams>() == 32);
// Backend ids fit the 13 bits `meta` gives them.
const _: () = assert!(crate::MAX_BACKENDS <= 1 << 13);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_its_fields() {
        let m = Meta {
            state: SlotState::Established,
            udp: true,
            v6: false,
            seq: 5,
            backend_id: 4095,
            generation: 0xbeef,
            seen: (META_SEEN_MASK as u32) - 1,
        }
        .pack();
        assert_eq!(m & META_LOCK, 0);
        assert_eq!(meta_state(m), SlotState::Established as u64);
        assert_eq!(meta_backend(m), 4095);
        assert_eq!(meta_generation(m), 0xbeef);
        assert_eq!(meta_seq(m), 5);
        assert_eq!(m & META_UDP, META_UDP);
        assert_eq!(meta_state(meta_with_state(m, SlotState::Closed)), 3);
        // Idle time wraps: seen near the end of the range, now past it.
        assert_eq!(idle_ns(m, 1), 3 << SEEN_UNIT_SHIFT);
    }

    #[test]
    fn buckets_cover_twice_the_flows_and_the_index_stays_in_range() {
        assert_eq!(flow_table_buckets(2048), 1024);
        assert_eq!(flow_table_buckets(1), 1);
        assert_eq!(bucket_of(u64::MAX, 1000), 999);
        assert_eq!(bucket_of(0, 1000), 0);
    }

    #[test]
    fn entries_are_counted_by_family() {
        let mut b = [FlowBucket::default(); 2];
        b[0].slots[1].meta = Meta {
            state: SlotState::New,
            udp: false,
            v6: true,
            seq: 0,
            backend_id: 1,
            generation: 1,
            seen: 0,
        }
        .pack();
        b[1].slots[3].meta = meta_with_state(0, SlotState::Closed);
        b[1].slots[2].meta = META_LOCK;
        assert_eq!(count_entries(&b), [1, 1]);
    }
}
