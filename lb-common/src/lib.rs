//! What the XDP program and the control plane must agree on: map names, the
//! layout of every map key and value, counter indices and the flow hash.
//!
//! Every map type is `#[repr(C)]` with explicit padding fields, so it has no
//! implicit padding (the kernel compares hash keys byte for byte, and `aya::Pod`
//! requires every byte to be initialised).
#![no_std]

pub mod decap;
pub mod flow_table;
pub mod hash;

use core::net::IpAddr;

/// Map names, shared so userspace never mistypes one.
pub mod map_names {
    pub const VIPS: &str = "VIPS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const MAGLEV: &str = "MAGLEV";
    pub const CONFIG: &str = "CONFIG";
    pub const STATS: &str = "STATS";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const FLOW_TABLE: &str = "FLOW_TABLE";
    pub const VIP_FILTER: &str = "VIP_FILTER";
    pub const FLOW_PARAMS: &str = "FLOW_PARAMS";

    /// Every map, in the order userspace pins them.
    pub const ALL: [&str; 10] = [
        VIPS,
        BACKENDS,
        MAGLEV,
        CONFIG,
        STATS,
        VIP_STATS,
        BACKEND_STATS,
        FLOW_TABLE,
        VIP_FILTER,
        FLOW_PARAMS,
    ];
}

/// Name of the XDP entry point in the object file.
pub const PROGRAM_NAME: &str = "lb";

/// Capacity of the VIP map; VIP ids are `0..MAX_VIPS`.
pub const MAX_VIPS: u32 = 64;
/// Capacity of the backend map; backend ids are `0..MAX_BACKENDS`.
pub const MAX_BACKENDS: u32 = 4096;
/// Each VIP owns two table halves: the active one and the one being rebuilt.
pub const TABLE_HALVES: u32 = 2;
/// Placeholder size of the `MAGLEV` array in the object file. Userspace resizes
/// it at load time to [`maglev_entries`].
pub const MAGLEV_DEFAULT_ENTRIES: u32 = 1;
/// One element of the `MAGLEV` array: two consecutive slots. The kernel
/// stores array elements 8-byte aligned, so a lone `u32` would waste half the
/// memory; packed in pairs, slot `i` is `MAGLEV[i / 2][i % 2]` and the mapped
/// array reads as a plain `[u32]`.
pub type SlotPair = [u32; 2];

/// Elements of the `MAGLEV` array for `max_vips` VIPs of `table_size` slots.
pub const fn maglev_entries(max_vips: u32, table_size: u32) -> u32 {
    (max_vips * TABLE_HALVES * table_size).div_ceil(2)
}
/// Flags of the `MAGLEV` array: `BPF_F_MMAPABLE`, so userspace writes a whole
/// table half with plain stores instead of a system call per slot.
pub const MAGLEV_MAP_FLAGS: u32 = 1 << 10;
/// A Maglev slot holding this value has no backend (only in a table built from
/// an empty backend list); the program drops with [`Stat::DropNoBackend`].
pub const NO_BACKEND: u32 = u32::MAX;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// An address of either family as the maps hold it: an IPv6 address as is,
/// an IPv4 address IPv4-mapped (`::ffff:a.b.c.d`, so its four bytes are the
/// last four).
pub fn addr_key(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// The address an [`addr_key`] holds.
pub fn key_addr(key: [u8; 16]) -> IpAddr {
    core::net::Ipv6Addr::from(key).to_canonical()
}

/// Key of the `VIPS` hash map, for VIPs of both families. Looked up only
/// for packets the flow table does not know.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    /// [`addr_key`] of the VIP address (network byte order).
    pub addr: [u8; 16],
    /// Destination port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl VipKey {
    /// The key of the VIP `addr:port` (port in host byte order) for IP
    /// protocol `proto`.
    pub fn new(addr: IpAddr, port: u16, proto: u8) -> Self {
        Self {
            addr: addr_key(addr),
            port: port.to_be(),
            proto,
            _pad: 0,
        }
    }
}

/// Value of the `VIPS` hash map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipEntry {
    /// Index into `VIP_STATS`.
    pub id: u32,
    /// First slot of the active Maglev table half in `MAGLEV`. Rewriting this
    /// entry (one atomic map update) switches the VIP to another, fully written
    /// half, so no packet ever sees a mixture of two tables.
    pub table_base: u32,
    /// Number of slots in the table (a prime).
    pub table_size: u32,
}

/// Forwarding mode: rewrite MACs and send on the same L2 segment.
pub const FORWARD_L2: u32 = 0;
/// Forwarding mode: encapsulate in an outer IPv4 header (IPIP) to the
/// backend, sent to the next hop towards it.
pub const FORWARD_IPIP: u32 = 1;
/// Forwarding mode: encapsulate in an outer IPv6 header to the backend (IP6IP6
/// for an IPv6 VIP, IPv4-in-IPv6 for an IPv4 one), sent to the next hop
/// towards it.
pub const FORWARD_IP6: u32 = 2;

/// Value of the `BACKENDS` array, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendEntry {
    /// [`addr_key`] of the backend address.
    pub addr: [u8; 16],
    /// MAC of the backend (`l2`) or of the next hop towards it (`ipip`).
    pub dst_mac: [u8; 6],
    /// MAC of the interface the frame leaves through.
    pub src_mac: [u8; 6],
    /// Interface the backend is reached through. When it differs from the
    /// ingress interface the program redirects instead of `XDP_TX`.
    pub ifindex: u32,
    /// `BACKEND_F_*` bits.
    pub flags: u32,
    /// The VIP this backend belongs to (each (VIP, address) pair has its own
    /// id): where a flow-table hit counts its VIP traffic, and what a
    /// restarted control plane rebuilds its bookkeeping from.
    pub vip_id: u32,
    /// The VIP's `FORWARD_*` mode, so a flow-table hit needs no VIP lookup.
    pub forwarding: u32,
    /// `ipip`: [`addr_key`] of the outer source address, of the backend's
    /// family.
    pub encap_src: [u8; 16],
    /// MTU of the egress interface (0: unknown, not checked).
    pub mtu: u32,
    /// Bumped by userspace whenever the id is given to a new (VIP, address)
    /// pair. A flow remembers the generation it was placed with, so a flow of
    /// a removed backend never follows its id to whoever reuses it.
    pub generation: u32,
}

/// The backend's MAC is known; without it the program drops with
/// [`Stat::DropNoNeighbour`] rather than sending a frame to a zero MAC.
pub const BACKEND_F_RESOLVED: u32 = 1;
/// Established flows may stay on this backend: it is enabled (active or
/// draining) and healthy, or every backend is down and the VIP fails open.
/// Without it the flow table's entry is ignored and the flow re-placed.
pub const BACKEND_F_KEEP_FLOWS: u32 = 2;
/// The backend was healthy when its entry was last written. Control-plane
/// bookkeeping only, so a restarted `lb` adopts the health it had; the
/// program does not read it.
pub const BACKEND_F_HEALTHY: u32 = 4;
/// `ipip`: answer a packet that would exceed the egress MTU once encapsulated
/// (IPv4 with Don't Fragment: ICMP "fragmentation needed"; IPv6: ICMPv6
/// "packet too big") instead of dropping it (the VIP's `icmp_too_big`).
pub const BACKEND_F_ICMP_TOO_BIG: u32 = 8;

/// Flags of the `VIPS` map: `BPF_F_NO_PREALLOC`. A preallocated hash map
/// recycles a replaced element at once, so a packet still reading it could
/// copy another VIP's entry; without preallocation the kernel frees replaced
/// elements only after every program that could read them has finished.
pub const VIPS_MAP_FLAGS: u32 = 1;

/// Words of the `VIP_FILTER` bitmap (64 bits each).
pub const VIP_FILTER_WORDS: u32 = 64;

/// Where an IPv4 destination's bit sits in `VIP_FILTER`: (word, mask). The
/// program passes a packet whose bit is clear without any hash lookup; a set
/// bit means "perhaps a VIP" (addresses may share a bit).
#[inline(always)]
pub fn vip_filter_bit(addr: u32) -> (u32, u64) {
    // Fibonacci hashing: the top 12 bits of the product select one of 4096.
    let h = addr.wrapping_mul(0x9e37_79b1) >> 20;
    (h >> 6, 1u64 << (h & 63))
}

/// The word an IPv6 destination is filtered by (its four words folded), for
/// [`vip_filter_bit`].
#[inline(always)]
pub fn vip_filter_word_v6(addr: &[u8; 16]) -> u32 {
    let w = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    w(0) ^ w(4) ^ w(8) ^ w(12)
}

/// [`vip_filter_bit`] of an address of either family, as the program
/// computes it from the packet.
pub fn vip_filter_bit_of(addr: IpAddr) -> (u32, u64) {
    match addr {
        IpAddr::V4(a) => vip_filter_bit(u32::from_ne_bytes(a.octets())),
        IpAddr::V6(a) => vip_filter_bit(vip_filter_word_v6(&a.octets())),
    }
}

/// A UDP entry's last-seen time is refreshed at most this often (and always
/// well within the timeout), to spare the cache line.
pub const UDP_LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// Version of every map's key and value layout; bump it with any change to
/// them (sizes alone do not catch reordered fields).
pub const LAYOUT_VERSION: u32 = 5;

/// Value of the `CONFIG` array (one element): settings that apply to every VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GlobalConfig {
    /// Seed of the flow hash; identical on every instance behind one ECMP VIP.
    pub hash_seed: u32,
    /// [`LAYOUT_VERSION`] of the control plane that wrote the maps, so a
    /// restarted `lb` refuses pinned maps whose layout it does not know.
    pub layout_version: u32,
    /// A UDP flow idle for longer than this is placed afresh.
    pub udp_idle_timeout_ns: u64,
}

/// Packet, byte and new-flow counts; the value of `VIP_STATS` and
/// `BACKEND_STATS` (per-CPU arrays, summed by userspace). A VIP's `new_flows`
/// stays 0: its new flows are the sum of its backends'.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    /// Flows placed by the Maglev table (new, or re-placed).
    pub new_flows: u64,
}

macro_rules! stats {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, )+) => {
        /// Index of a global counter in the per-CPU `STATS` block: the XDP
        /// actions, the reasons a packet was passed, the flow-table results and
        /// the reasons a packet was dropped. The program counts a passed or
        /// dropped packet once, under its reason; the `ActionPass` and
        /// `ActionDrop` slots stay 0 and userspace derives them as the sums of
        /// their reasons (see [`Stat::action`]).
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
        pub enum Stat {
            $( $(#[$doc])* $variant, )+
        }

        impl Stat {
            pub const ALL: &'static [Stat] = &[$(Stat::$variant),+];
            /// Stable lowercase name, used as a log field and metric label.
            pub const fn name(self) -> &'static str {
                match self { $(Stat::$variant => $name),+ }
            }

            /// The action a pass or drop reason belongs to (by naming
            /// convention: `pass_*` and `drop_*`).
            pub fn action(self) -> Option<Stat> {
                let name = self.name();
                if name.starts_with("pass_") {
                    Some(Stat::ActionPass)
                } else if name.starts_with("drop_") {
                    Some(Stat::ActionDrop)
                } else {
                    None
                }
            }
        }
    };
}

stats! {
    ActionAborted = "action_aborted",
    ActionDrop = "action_drop",
    ActionPass = "action_pass",
    ActionTx = "action_tx",
    ActionRedirect = "action_redirect",
    /// Neither IPv4 nor IPv6 (ARP, anything else): passed untouched.
    PassNotIp = "pass_not_ip",
    /// IP but neither TCP nor UDP: passed untouched.
    PassNotTcpUdp = "pass_not_tcp_udp",
    /// IPv4 or IPv6 fragment: no ports to look up, passed to the kernel.
    PassFragment = "pass_fragment",
    /// IPv6 whose extension headers the program does not walk: more than
    /// `lb_common::MAX_IPV6_EXT_HEADERS` of them, or a routing header with
    /// segments left (this host is not the final destination): passed to
    /// the kernel.
    PassIpv6ExtHeaders = "pass_ipv6_ext_headers",
    /// TCP/UDP whose (address, port, protocol) is not a VIP: passed untouched.
    PassNotVip = "pass_not_vip",
    /// VIP packet of a flow in the flow table, kept on its backend.
    FlowHit = "flow_hit",
    /// VIP packet that may start a flow (TCP SYN, or UDP) with no live entry:
    /// placed by Maglev and remembered.
    FlowMissSyn = "flow_miss_syn",
    /// TCP packet other than a SYN with no entry (the entry was evicted, or the
    /// flow started at another instance): placed by Maglev and remembered.
    FlowMissNonSyn = "flow_miss_non_syn",
    /// Flow whose backend may no longer keep it (down, disabled, removed):
    /// re-placed by Maglev.
    FlowReplaced = "flow_replaced",
    /// A placed flow found no entry to take (its bucket held only
    /// established flows seen within `flow_table.idle_evict`, or another CPU
    /// was writing the entry it chose): forwarded by the Maglev table
    /// without being remembered.
    Untracked = "untracked",
    /// A new flow took the entry of a flow that saw a FIN or RST.
    EvictClosed = "evict_closed",
    /// A new flow took the entry of a UDP flow idle past its timeout.
    EvictExpired = "evict_expired",
    /// A new flow took the least recently seen single-packet entry of its
    /// bucket.
    EvictSinglePacket = "evict_single_packet",
    /// A new flow took the entry of an established flow idle for longer than
    /// `flow_table.idle_evict`.
    EvictIdle = "evict_idle",
    /// Frame shorter than an Ethernet header.
    DropTruncatedEth = "drop_truncated_eth",
    /// The frame ends inside the IPv4 or IPv6 header or the first 8 bytes of
    /// an IPv6 extension header, or (when encapsulating) before the length
    /// the IP header announces.
    DropTruncatedIp = "drop_truncated_ip",
    /// IPv4 header with IHL < 5 or a version other than 4, IPv6 header with
    /// a version other than 6, or a total length shorter than the header.
    DropBadIpHeader = "drop_bad_ip_header",
    /// The frame ends before the end of the TCP or UDP header (counting any
    /// IPv6 extension header bytes in front of it).
    DropTruncatedL4 = "drop_truncated_l4",
    /// The VIP's table has no backend.
    DropNoBackend = "drop_no_backend",
    /// The chosen backend's MAC is not resolved yet.
    DropNoNeighbour = "drop_no_neighbour",
    /// A map lookup that cannot fail did (table index out of range).
    DropInternal = "drop_internal",
    /// Encapsulated, the packet would exceed the egress MTU (and no ICMP
    /// answer may be sent: turned off, no Don't Fragment, IP options, or a
    /// sender RFC 1122 forbids answering).
    DropTooBig = "drop_too_big",
    /// Too big, and an ICMP answer was due, but this CPU's ICMP budget was
    /// spent (see `lb_common::ICMP_BURST`).
    DropIcmpRateLimited = "drop_icmp_rate_limited",
    /// Answered with ICMP "fragmentation needed" (sent with XDP_TX, also
    /// counted as `action_tx`).
    IcmpTooBig = "icmp_too_big",
    /// Answered with ICMPv6 "packet too big" (sent with XDP_TX, also counted
    /// as `action_tx`).
    IcmpPacketTooBig = "icmp_packet_too_big",
}

pub const STAT_COUNT: u32 = Stat::ALL.len() as u32;

/// IPv6 extension headers (hop-by-hop, routing, fragment, destination
/// options) the program walks to find the TCP or UDP header: RFC 8200's
/// recommended order puts at most five of them before the upper layer
/// (destination options twice, around the routing and fragment headers).
pub const MAX_IPV6_EXT_HEADERS: usize = 5;

/// ICMP answers are limited per CPU by a token bucket holding up to
/// `ICMP_BURST` answers and refilled by one every `ICMP_NS_PER_TOKEN` (1000
/// a second), as the kernel limits its own ICMP errors: a flood of too-big
/// packets cannot turn the load balancer into an ICMP source at line rate.
pub const ICMP_BURST: u64 = 100;
pub const ICMP_NS_PER_TOKEN: u64 = 1_000_000;

/// The only element of the per-CPU `STATS` array: every global counter, so a
/// packet's counting costs one map lookup however many counters it moves.
pub type StatBlock = [u64; STAT_COUNT as usize];

#[cfg(feature = "user")]
mod pod {
    use super::{
        BackendEntry, GlobalConfig, Traffic, VipEntry, VipKey,
        flow_table::{FlowBucket, FlowParams},
    };

    /// Marks map keys and values as plain old data for aya.
    macro_rules! pod {
        ($($t:ident),*) => {$(
            // SAFETY: #[repr(C)], Copy, made only of integers and byte arrays,
            // and without implicit padding (checked by the size asserts).
            unsafe impl aya::Pod for $t {}
        )*};
    }
    pod!(
        VipKey,
        VipEntry,
        BackendEntry,
        GlobalConfig,
        Traffic,
        FlowBucket,
        FlowParams
    );
}

// Sizes are the sum of the fields: no implicit padding anywhere.
const _: () = assert!(size_of::<VipKey>() == 20);
const _: () = assert!(size_of::<VipEntry>() == 12);
const _: () = assert!(size_of::<BackendEntry>() == 68);
const _: () = assert!(size_of::<GlobalConfig>() == 16);
const _: () = assert!(size_of::<Traffic>() == 24);
