//! Every map the program uses. Userspace (lb-userspace's `dataplane::aya`) is
//! the only writer of the configuration maps; the program only writes counters
//! and the flow table.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    BackendEntry, FLOWS_DEFAULT_ENTRIES, FlowEntry, FlowKey, GlobalConfig, MAGLEV_DEFAULT_ENTRIES,
    MAGLEV_MAP_FLAGS, MAX_BACKENDS, MAX_VIPS, STAT_COUNT, SlotPair, Traffic, VipEntry, VipKey,
};

/// (address, port, protocol) -> VIP id, active table half, forwarding mode.
#[map]
pub static VIPS: HashMap<VipKey, VipEntry> = HashMap::with_max_entries(MAX_VIPS, 0);

/// Backend id -> address, MACs, egress interface.
#[map]
pub static BACKENDS: Array<BackendEntry> = Array::with_max_entries(MAX_BACKENDS, 0);

/// All Maglev tables, back to back: VIP `v`, half `h` starts at slot
/// `(v * TABLE_HALVES + h) * table_size`. Each slot holds a backend id; two
/// slots per element (see `lb_common::SlotPair`).
/// Resized by userspace at load time to fit the configured table size, and
/// memory-mapped by it to write table halves.
#[map]
pub static MAGLEV: Array<SlotPair> =
    Array::with_max_entries(MAGLEV_DEFAULT_ENTRIES, MAGLEV_MAP_FLAGS);

/// 5-tuple -> backend of each established flow, shared by all CPUs (a flow
/// may arrive on any queue). LRU: the least recently used flows make room.
/// Resized by userspace at load time. The program is its only writer.
#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::with_max_entries(FLOWS_DEFAULT_ENTRIES, 0);

/// Settings shared by every VIP (one element).
#[map]
pub static CONFIG: Array<GlobalConfig> = Array::with_max_entries(1, 0);

/// One counter per XDP action and per pass/drop reason (`lb_common::Stat`).
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// Packets and bytes per VIP id, every packet that matched the VIP.
#[map]
pub static VIP_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

/// Packets and bytes per backend id, every packet forwarded to the backend.
#[map]
pub static BACKEND_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
