//! Flow placement: the flow table keeps established flows on their backend;
//! everything else is placed by the VIP's Maglev table and remembered.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    BACKEND_F_KEEP_FLOWS, FAMILY_V4, FlowEntry, FlowKey, IPPROTO_UDP, NO_BACKEND, Stat,
    UDP_LAST_SEEN_GRANULARITY_NS, VipEntry, hash::flow_hash_v4,
};

use crate::{
    Verdict, count,
    maps::{BACKENDS, CONFIG, FLOWS, MAGLEV},
    packet::Flow,
};

/// The backend id for this packet's flow.
#[inline(always)]
pub fn backend_for(flow: &Flow, vip: &VipEntry) -> Result<u32, Verdict> {
    let key = FlowKey {
        src: [u32::from_ne_bytes(flow.src), 0, 0, 0],
        dst: [u32::from_ne_bytes(flow.dst), 0, 0, 0],
        sport: flow.sport.to_be(),
        dport: flow.dport.to_be(),
        proto: flow.proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    let config = CONFIG.get(0);
    let udp = flow.proto == IPPROTO_UDP;
    // Only UDP flows age; TCP flows leave the LRU table when it needs room.
    // SAFETY: plain helper call.
    let now = if udp {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };

    let miss = if let Some(entry) = FLOWS.get_ptr_mut(&key) {
        // SAFETY: pointer into the map's value, valid for this program run.
        let entry = unsafe { &mut *entry };
        let idle = now.wrapping_sub(entry.last_seen_ns);
        let expired = udp && idle > config.map_or(u64::MAX, |c| c.udp_idle_timeout_ns);
        if !expired {
            if let Some(b) = BACKENDS.get(entry.backend_id)
                && b.generation == entry.generation
                && b.flags & BACKEND_F_KEEP_FLOWS != 0
            {
                count(Stat::FlowHit);
                if udp && idle > UDP_LAST_SEEN_GRANULARITY_NS {
                    entry.last_seen_ns = now;
                }
                return Ok(entry.backend_id);
            }
            Stat::FlowReplaced
        } else {
            Stat::FlowMissSyn
        }
    } else if flow.opens {
        Stat::FlowMissSyn
    } else {
        Stat::FlowMissNonSyn
    };
    count(miss);

    let seed = config.map_or(0, |c| c.hash_seed);
    let hash = flow_hash_v4(
        u32::from_be_bytes(flow.src),
        u32::from_be_bytes(flow.dst),
        flow.sport,
        flow.dport,
        flow.proto,
        seed,
    );
    let slot = vip.table_base + hash % vip.table_size.max(1);
    let pair = MAGLEV.get(slot / 2).ok_or(Verdict::Drop(Stat::DropInternal))?;
    let backend_id = pair[(slot & 1) as usize];
    if backend_id == NO_BACKEND {
        return Err(Verdict::Drop(Stat::DropNoBackend));
    }
    let generation = BACKENDS
        .get(backend_id)
        .ok_or(Verdict::Drop(Stat::DropInternal))?
        .generation;
    let entry = FlowEntry {
        backend_id,
        generation,
        last_seen_ns: now,
    };
    // A full table evicts its least recently used entry; failure to insert
    // only costs this flow its stickiness, so the packet is still forwarded.
    let _ = FLOWS.insert(&key, &entry, 0);
    Ok(backend_id)
}
