//! Flow placement: the flow table keeps established flows on their backend;
//! everything else is placed by the VIP's Maglev table and remembered.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, maps::LruHashMap};
use lb_common::{
    BACKEND_F_KEEP_FLOWS, BackendEntry, FlowEntry, FlowKey, FlowKey6, IPPROTO_UDP, NO_BACKEND,
    Stat, UDP_LAST_SEEN_GRANULARITY_NS, VipEntry, VipKey,
    hash::{flow_hash_v4, flow_hash_v6},
    vip_filter_word_v6,
};

use crate::{
    Verdict,
    maps::{BACKENDS, CONFIG, FLOWS, FLOWS6, MAGLEV, VIPS},
    packet::Flow,
};

/// What differs between IPv4 and IPv6 flows, implemented by the address
/// type as it sits in the packet. Each family has its own flow table, so the
/// IPv4 table keeps its compact key.
pub trait Family: Sized {
    type Key: 'static;
    const IS_V6: bool;
    fn flows() -> &'static LruHashMap<Self::Key, FlowEntry>;
    fn flow_key(flow: &Flow<Self>) -> Self::Key;
    /// The flow hash (`lb_common::hash`) of the 5-tuple.
    fn hash(flow: &Flow<Self>, seed: u32) -> u32;
    /// The word `VIP_FILTER` is indexed by.
    fn filter_word(&self) -> u32;
    /// The address as `VipKey` holds it (`lb_common::addr_key`), or `None`
    /// for an IPv6 address that is IPv4-mapped: the key of an IPv4 VIP,
    /// which an IPv6 packet must never reach.
    fn key(&self) -> Option<[u8; 16]>;
}

impl Family for [u8; 4] {
    type Key = FlowKey;
    const IS_V6: bool = false;

    #[inline(always)]
    fn flows() -> &'static LruHashMap<FlowKey, FlowEntry> {
        &FLOWS
    }

    #[inline(always)]
    fn flow_key(flow: &Flow<Self>) -> FlowKey {
        FlowKey {
            src: u32::from_ne_bytes(flow.src),
            dst: u32::from_ne_bytes(flow.dst),
            sport: flow.sport.to_be(),
            dport: flow.dport.to_be(),
            proto: flow.proto,
            _pad: [0; 3],
        }
    }

    #[inline(always)]
    fn hash(flow: &Flow<Self>, seed: u32) -> u32 {
        flow_hash_v4(
            u32::from_be_bytes(flow.src),
            u32::from_be_bytes(flow.dst),
            flow.sport,
            flow.dport,
            flow.proto,
            seed,
        )
    }

    #[inline(always)]
    fn filter_word(&self) -> u32 {
        u32::from_ne_bytes(*self)
    }

    #[inline(always)]
    fn key(&self) -> Option<[u8; 16]> {
        let [a, b, c, d] = *self;
        Some([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d])
    }
}

impl Family for [u8; 16] {
    type Key = FlowKey6;
    const IS_V6: bool = true;

    #[inline(always)]
    fn flows() -> &'static LruHashMap<FlowKey6, FlowEntry> {
        &FLOWS6
    }

    #[inline(always)]
    fn flow_key(flow: &Flow<Self>) -> FlowKey6 {
        FlowKey6 {
            src: flow.src,
            dst: flow.dst,
            sport: flow.sport.to_be(),
            dport: flow.dport.to_be(),
            proto: flow.proto,
            _pad: [0; 3],
        }
    }

    #[inline(always)]
    fn hash(flow: &Flow<Self>, seed: u32) -> u32 {
        flow_hash_v6(
            &flow.src, &flow.dst, flow.sport, flow.dport, flow.proto, seed,
        )
    }

    #[inline(always)]
    fn filter_word(&self) -> u32 {
        vip_filter_word_v6(self)
    }

    #[inline(always)]
    fn key(&self) -> Option<[u8; 16]> {
        let mapped = self[..10].iter().all(|&b| b == 0) && self[10] == 0xff && self[11] == 0xff;
        (!mapped).then_some(*self)
    }
}

/// The seed of the flow hash.
#[inline(always)]
pub fn seed() -> u32 {
    CONFIG.get(0).map_or(0, |c| c.hash_seed)
}

/// What the flow table says about a packet.
pub enum Lookup<K> {
    /// An established flow whose backend may keep it.
    Hit {
        backend_id: u32,
        backend: &'static BackendEntry,
    },
    /// No live entry: the flow must be placed. `outcome` is the flow-table
    /// counter to move once the packet is known to be for a VIP.
    Miss { outcome: Stat, key: K, now: u64 },
}

#[inline(always)]
pub fn lookup<A: Family>(flow: &Flow<A>) -> Lookup<A::Key> {
    let key = A::flow_key(flow);
    let udp = flow.proto == IPPROTO_UDP;
    // Only UDP flows age; TCP flows leave the LRU table when it needs room.
    // The coarse clock (tick resolution) is plenty for timeouts of seconds
    // and far cheaper to read than the precise one.
    // SAFETY: plain helper call.
    let now = if udp {
        unsafe { bpf_ktime_get_coarse_ns() }
    } else {
        0
    };

    let Some(entry) = A::flows().get_ptr_mut(&key) else {
        let outcome = if flow.opens {
            Stat::FlowMissSyn
        } else {
            Stat::FlowMissNonSyn
        };
        return Lookup::Miss { outcome, key, now };
    };
    // SAFETY: pointer into the map's value, valid for this program run.
    let entry = unsafe { &mut *entry };
    // Saturating: another CPU may just have stored a later timestamp.
    let idle = now.saturating_sub(entry.last_seen_ns);
    let timeout = if udp {
        CONFIG.get(0).map_or(u64::MAX, |c| c.udp_idle_timeout_ns)
    } else {
        u64::MAX
    };
    if idle > timeout {
        return Lookup::Miss {
            outcome: Stat::FlowMissSyn,
            key,
            now,
        };
    }
    match BACKENDS.get(entry.backend_id) {
        Some(b) if b.generation == entry.generation && b.flags & BACKEND_F_KEEP_FLOWS != 0 => {
            // Refreshed at most once per granularity, and always well
            // within the timeout, so a busy flow never looks idle.
            if udp && idle > UDP_LAST_SEEN_GRANULARITY_NS.min(timeout / 2) {
                entry.last_seen_ns = now;
            }
            Lookup::Hit {
                backend_id: entry.backend_id,
                backend: b,
            }
        }
        _ => Lookup::Miss {
            outcome: Stat::FlowReplaced,
            key,
            now,
        },
    }
}

/// The VIP the packet is addressed to.
#[inline(always)]
pub fn vip<A: Family>(flow: &Flow<A>) -> Result<VipEntry, Verdict> {
    let key = VipKey {
        addr: flow.dst.key().ok_or(Verdict::Pass(Stat::PassNotVip))?,
        port: flow.dport.to_be(),
        proto: flow.proto,
        _pad: 0,
    };
    // SAFETY: the value is only read, and copied before any other map call.
    unsafe { VIPS.get(&key) }
        .copied()
        .ok_or(Verdict::Pass(Stat::PassNotVip))
}

/// Places a new (or re-placed) flow with the VIP's Maglev table and remembers
/// it. Returns the backend and the flow hash.
#[inline(always)]
pub fn place<A: Family>(
    flow: &Flow<A>,
    key: &A::Key,
    vip: &VipEntry,
    now: u64,
) -> Result<(u32, &'static BackendEntry, u32), Verdict> {
    let hash = A::hash(flow, seed());
    let slot = vip.table_base + hash % vip.table_size.max(1);
    let pair = MAGLEV
        .get(slot / 2)
        .ok_or(Verdict::Drop(Stat::DropInternal))?;
    let backend_id = pair[(slot & 1) as usize];
    if backend_id == NO_BACKEND {
        return Err(Verdict::Drop(Stat::DropNoBackend));
    }
    let backend = BACKENDS
        .get(backend_id)
        .ok_or(Verdict::Drop(Stat::DropInternal))?;
    // A packet that read a VIP entry just before the VIP was removed may find
    // its id's slots and backends already given to another VIP: never send
    // (or pin) a flow to a backend of another VIP.
    if backend.vip_id != vip.id {
        return Err(Verdict::Drop(Stat::DropInternal));
    }
    let entry = FlowEntry {
        backend_id,
        generation: backend.generation,
        last_seen_ns: now,
    };
    // A full table evicts its least recently used entry; failure to insert
    // only costs this flow its stickiness, so the packet is still forwarded.
    let _ = A::flows().insert(key, &entry, 0);
    Ok((backend_id, backend, hash))
}
