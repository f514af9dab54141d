//! Every map the program uses. Userspace (lb-userspace's `dataplane::aya`) is
//! the only writer of the configuration maps; the program only writes counters
//! and the flow table.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use lb_common::{
    BackendEntry, GlobalConfig, MAGLEV_DEFAULT_ENTRIES, MAGLEV_MAP_FLAGS, MAX_BACKENDS, MAX_VIPS,
    SlotPair, StatBlock, Traffic, VIP_FILTER_WORDS, VIPS_MAP_FLAGS, VipEntry, VipKey,
    flow_table::{FLOW_TABLE_DEFAULT_BUCKETS, FLOW_TABLE_MAP_FLAGS, FlowBucket, FlowParams},
};

/// (address of either family, port, protocol) -> VIP id, active table half, forwarding mode.
#[map]
pub static VIPS: HashMap<VipKey, VipEntry> = HashMap::with_max_entries(MAX_VIPS, VIPS_MAP_FLAGS);

/// Backend id -> address, MACs, egress interface, forwarding mode.
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

/// The flow table of both families (`lb_common::flow_table`): buckets of
/// entries that keep established flows on their backend, shared by all CPUs
/// (a flow may arrive on any queue). Resized by userspace at load time. The
/// program is its only writer.
#[map]
pub static FLOW_TABLE: Array<FlowBucket> =
    Array::with_max_entries(FLOW_TABLE_DEFAULT_BUCKETS, FLOW_TABLE_MAP_FLAGS);

/// The flow table's key, size and eviction setting (one element), written by
/// userspace at load time.
#[map]
pub static FLOW_PARAMS: Array<FlowParams> = Array::with_max_entries(1, 0);

/// ICMP answer budget of each CPU: [time of the last refill (ns), tokens]
/// (see `lb_common::ICMP_BURST`). Not pinned: a restart may start afresh.
#[map]
pub static ICMP_BUCKET: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Settings shared by every VIP (one element).
#[map]
pub static CONFIG: Array<GlobalConfig> = Array::with_max_entries(1, 0);

/// Every global counter (`lb_common::Stat`) in one per-CPU element.
#[map]
pub static STATS: PerCpuArray<StatBlock> = PerCpuArray::with_max_entries(1, 0);

/// Bitmap over VIP destination addresses (`lb_common::vip_filter_bit`): a
/// packet whose bit is clear is not for a VIP and passes without a hash lookup.
#[map]
pub static VIP_FILTER: Array<u64> = Array::with_max_entries(VIP_FILTER_WORDS, 0);

/// Packets and bytes per VIP id, every packet that matched the VIP.
#[map]
pub static VIP_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

/// Packets and bytes per backend id, every packet forwarded to the backend.
#[map]
pub static BACKEND_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
