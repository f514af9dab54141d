//! Flow placement: the flow table (`crate::flow_table`) keeps established
//! flows on their backend; everything else is placed by the VIP's Maglev
//! table and remembered.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    BACKEND_F_KEEP_FLOWS, BackendEntry, IPPROTO_UDP, NO_BACKEND, Stat,
    UDP_LAST_SEEN_GRANULARITY_NS, VipEntry, VipKey,
    flow_table::{
        SlotState, bucket_of, idle_ns, meta_backend, meta_generation, meta_state, meta_with_seen,
        meta_with_state, seen_of,
    },
    hash::{flow_hash_v4, flow_hash_v6, flow_key_v4, flow_key_v6},
    vip_filter_word_v6,
};

use crate::{
    Verdict,
    flow_table::{self, Eviction, NewEntry, Own, Place},
    maps::{BACKENDS, CONFIG, FLOW_PARAMS, FLOW_TABLE, MAGLEV, VIPS},
    packet::Flow,
};

/// What differs between IPv4 and IPv6 flows, implemented by the address
/// type as it sits in the packet. Both families share one flow table.
pub trait Family: Sized {
    const IS_V6: bool;
    /// The flow table's keyed hash (`lb_common::hash::flow_key_v4`/`_v6`).
    fn flow_key(flow: &Flow<Self>, key: [u64; 2]) -> u64;
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
    const IS_V6: bool = false;

    #[inline(always)]
    fn flow_key(flow: &Flow<Self>, key: [u64; 2]) -> u64 {
        flow_key_v4(flow.src, flow.dst, flow.sport, flow.dport, flow.proto, key)
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
    const IS_V6: bool = true;

    #[inline(always)]
    fn flow_key(flow: &Flow<Self>, key: [u64; 2]) -> u64 {
        flow_key_v6(
            &flow.src, &flow.dst, flow.sport, flow.dport, flow.proto, key,
        )
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
pub enum Lookup {
    /// An established flow whose backend may keep it.
    Hit {
        backend_id: u32,
        backend: &'static BackendEntry,
    },
    /// No live entry: the flow must be placed. `outcome` is the flow-table
    /// counter to move once the packet is known to be for a VIP; `at` is
    /// where its entry goes (`None`: the table is not set up, the flow
    /// cannot be remembered).
    Miss { outcome: Stat, at: Option<Slot> },
}

/// Where a placed flow is remembered: its bucket, and its stale entry when
/// it has one.
#[derive(Clone, Copy)]
pub struct Slot {
    place: Place,
    own: Option<Own>,
}

#[inline(always)]
fn udp_timeout_ns(udp: bool) -> u64 {
    if udp {
        CONFIG.get(0).map_or(u64::MAX, |c| c.udp_idle_timeout_ns)
    } else {
        u64::MAX
    }
}

#[inline(always)]
pub fn lookup<A: Family>(flow: &Flow<A>) -> Lookup {
    let miss = if flow.opens {
        Stat::FlowMissSyn
    } else {
        Stat::FlowMissNonSyn
    };
    let Some(params) = FLOW_PARAMS.get(0) else {
        return Lookup::Miss {
            outcome: miss,
            at: None,
        };
    };
    let check = A::flow_key(flow, params.key);
    let Some(bucket) = FLOW_TABLE.get_ptr_mut(bucket_of(check, params.buckets)) else {
        return Lookup::Miss {
            outcome: miss,
            at: None,
        };
    };
    // The coarse clock (tick resolution) is plenty for timeouts of seconds
    // and far cheaper to read than the precise one.
    // SAFETY: plain helper call.
    let now_seen = seen_of(unsafe { bpf_ktime_get_coarse_ns() });
    let place = Place {
        bucket,
        check,
        now_seen,
    };
    let Some(own) = flow_table::find(&place) else {
        return Lookup::Miss {
            outcome: miss,
            at: Some(Slot { place, own: None }),
        };
    };
    let stale = |outcome| Lookup::Miss {
        outcome,
        at: Some(Slot {
            place,
            own: Some(own),
        }),
    };
    let udp = flow.proto == IPPROTO_UDP;
    let timeout = udp_timeout_ns(udp);
    let idle = idle_ns(own.meta, now_seen);
    if idle > timeout {
        return stale(Stat::FlowMissSyn);
    }
    let backend_id = meta_backend(own.meta);
    match BACKENDS.get(backend_id) {
        Some(b)
            if b.generation as u16 == meta_generation(own.meta)
                && b.flags & BACKEND_F_KEEP_FLOWS != 0 =>
        {
            refresh(&own, flow, idle, timeout, now_seen);
            Lookup::Hit {
                backend_id,
                backend: b,
            }
        }
        _ => stale(Stat::FlowReplaced),
    }
}

/// A hit's updates of its entry: a second packet makes the flow
/// established (safe from floods of new flows), a FIN or RST marks it
/// closed (reused first), and the last-seen time is refreshed at most once
/// per granularity, always well within the UDP timeout. Best effort: a
/// racing update from another CPU wins.
#[inline(always)]
fn refresh<A>(own: &Own, flow: &Flow<A>, idle: u64, timeout: u64, now_seen: u32) {
    let state = meta_state(own.meta);
    let mut meta = own.meta;
    if flow.closes {
        meta = meta_with_state(meta, SlotState::Closed);
    } else if state == SlotState::New as u64 {
        meta = meta_with_state(meta, SlotState::Established);
    }
    if idle > UDP_LAST_SEEN_GRANULARITY_NS.min(timeout / 2) {
        meta = meta_with_seen(meta, now_seen);
    }
    if meta != own.meta {
        flow_table::swap_meta(own.slot, own.meta, meta);
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

/// Places a new (or re-placed) flow with the VIP's Maglev table and
/// remembers it at `at`. Returns the backend, the flow hash and the
/// flow-table counter the placement moved (an eviction, or `Untracked`).
#[inline(always)]
pub fn place<A: Family>(
    flow: &Flow<A>,
    at: Option<Slot>,
    vip: &VipEntry,
) -> Result<(u32, &'static BackendEntry, u32, Option<Stat>), Verdict> {
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
    let counted = at.map_or(Err(Stat::Untracked), |at| {
        remember(flow, &at, backend_id, backend)
    });
    // Failing to remember only costs this flow its stickiness: the packet
    // is still forwarded.
    Ok((backend_id, backend, hash, counted.unwrap_or_else(Some)))
}

/// Writes the placed flow's entry (see `flow_table::remember`).
#[inline(always)]
fn remember<A: Family>(
    flow: &Flow<A>,
    at: &Slot,
    backend_id: u32,
    backend: &BackendEntry,
) -> Result<Option<Stat>, Stat> {
    let udp = flow.proto == IPPROTO_UDP;
    // A re-placed flow keeps how far it got (an established flow stays safe
    // from floods); an expired UDP flow starts afresh.
    let state = match at.own {
        Some(own) if meta_state(own.meta) == SlotState::Established as u64 && !flow.opens => {
            SlotState::Established
        }
        Some(own) if meta_state(own.meta) == SlotState::Closed as u64 => SlotState::Closed,
        _ => SlotState::New,
    };
    let entry = NewEntry {
        udp,
        v6: A::IS_V6,
        state,
        backend_id,
        generation: backend.generation,
    };
    let limits = Eviction {
        udp_timeout_ns: udp_timeout_ns(true),
        idle_evict_ns: FLOW_PARAMS.get(0).map_or(u64::MAX, |p| p.idle_evict_ns),
    };
    flow_table::remember(&at.place, at.own, &entry, &limits)
}
