//! The load balancer's XDP program: parse, skip what is surely not for a VIP,
//! keep established flows on their backend through the flow table, place new
//! flows with the VIP's Maglev table, rewrite the Ethernet header (and for
//! `ipip` add an outer IPv4 or IPv6 header) and send the frame on (direct server
//! return: the client's packet is not touched, the backend holds the VIP and
//! answers the client itself).
//!
//! Every packet moves exactly one verdict counter: its pass or drop reason, or
//! its action when forwarded (userspace sums reasons into action totals).
//! Side counters come on top: `flow_*` for flow-table lookups, `evict_*`
//! and `untracked` for where a placed flow's entry came from, and `icmp_*`
//! for an ICMP answer sent back (its action is `tx`).
#![no_std]
#![no_main]
// `atomic_cxchg`: see `flow_table::swap_meta`.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod csum;
mod flow_table;
mod flows;
mod forward;
mod icmp;
mod maps;
mod packet;

use aya_ebpf::{bindings::xdp_action, helpers::bpf_redirect, macros::xdp, programs::XdpContext};
use lb_common::{FORWARD_IP6, FORWARD_IPIP, FORWARD_L2, Stat, StatBlock, Traffic, vip_filter_bit};

use crate::{
    flows::{Family, Lookup},
    maps::{BACKEND_STATS, STATS, VIP_FILTER, VIP_STATS},
    packet::{Flow, Parsed},
};

/// What happens to a packet, with the reason when it is not forwarded.
pub enum Verdict {
    Pass(Stat),
    Drop(Stat),
    Tx,
    Redirect(u32),
    /// An answer to the sender built in place (counted under the reason),
    /// sent back with XDP_TX.
    Answer(Stat),
}

#[xdp]
pub fn lb(ctx: XdpContext) -> u32 {
    // The element always exists; without it nothing could be counted, so the
    // packet goes to the kernel untouched.
    let Some(stats) = STATS.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: per-CPU element, written only by this CPU while it runs us.
    let stats = unsafe { &mut *stats };
    let verdict = match balance(&ctx, stats) {
        Ok(v) | Err(v) => v,
    };
    match verdict {
        Verdict::Pass(reason) => {
            bump(stats, reason);
            xdp_action::XDP_PASS
        }
        Verdict::Drop(reason) => {
            bump(stats, reason);
            xdp_action::XDP_DROP
        }
        Verdict::Tx => {
            bump(stats, Stat::ActionTx);
            xdp_action::XDP_TX
        }
        Verdict::Answer(reason) => {
            bump(stats, reason);
            bump(stats, Stat::ActionTx);
            xdp_action::XDP_TX
        }
        Verdict::Redirect(ifindex) => {
            // SAFETY: plain helper call; flags 0 is always valid.
            let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
            bump(
                stats,
                if action == xdp_action::XDP_REDIRECT {
                    Stat::ActionRedirect
                } else {
                    Stat::ActionAborted
                },
            );
            action
        }
    }
}

#[inline(always)]
fn balance(ctx: &XdpContext, stats: &mut StatBlock) -> Result<Verdict, Verdict> {
    match packet::parse(ctx)? {
        Parsed::V4(flow) => balance_flow(ctx, stats, &flow),
        Parsed::V6(flow) => balance_flow(ctx, stats, &flow),
    }
}

#[inline(always)]
fn balance_flow<A: Family>(
    ctx: &XdpContext,
    stats: &mut StatBlock,
    flow: &Flow<A>,
) -> Result<Verdict, Verdict> {
    let (word, bit) = vip_filter_bit(flow.dst.filter_word());
    if VIP_FILTER.get(word).is_none_or(|w| w & bit == 0) {
        return Err(Verdict::Pass(Stat::PassNotVip));
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;

    let (backend_id, backend, hash) = match flows::lookup(flow) {
        Lookup::Hit {
            backend_id,
            backend,
        } => {
            bump(stats, Stat::FlowHit);
            add_traffic(&VIP_STATS, backend.vip_id, bytes, false);
            (backend_id, backend, None)
        }
        Lookup::Miss { outcome, at } => {
            let vip = flows::vip(flow)?;
            bump(stats, outcome);
            add_traffic(&VIP_STATS, vip.id, bytes, false);
            let (id, backend, hash, table) = flows::place(flow, at, &vip)?;
            if let Some(table) = table {
                bump(stats, table);
            }
            (id, backend, Some(hash))
        }
    };
    let placed = hash.is_some();
    let verdict = match backend.forwarding {
        FORWARD_L2 => forward::l2(ctx, backend)?,
        // Userspace never gives an IPv6 VIP an IPv4 outer header.
        FORWARD_IPIP if !A::IS_V6 => forward::ipip(ctx, backend)?,
        FORWARD_IP6 => {
            // An established flow's hash is only needed here, for the label.
            let hash = hash.unwrap_or_else(|| A::hash(flow, flows::seed()));
            forward::ip6(ctx, backend, A::IS_V6, hash)?
        }
        // Userspace only writes modes this program knows.
        _ => return Err(Verdict::Drop(Stat::DropInternal)),
    };
    add_traffic(&BACKEND_STATS, backend_id, bytes, placed);
    Ok(verdict)
}

#[inline(always)]
pub fn bump(stats: &mut StatBlock, stat: Stat) {
    if let Some(c) = stats.get_mut(stat as usize) {
        *c += 1;
    }
}

#[inline(always)]
fn add_traffic(map: &aya_ebpf::maps::PerCpuArray<Traffic>, index: u32, bytes: u64, new_flow: bool) {
    if let Some(t) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe {
            (*t).packets += 1;
            (*t).bytes += bytes;
            (*t).new_flows += new_flow as u64;
        }
    }
}
