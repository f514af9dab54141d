//! The load balancer's XDP program: parse, look up the VIP, keep established
//! flows on their backend through the flow table, place new flows with the
//! VIP's Maglev table, rewrite the Ethernet header and send the frame on
//! (direct server return: the IP packet is not touched, the backend holds the
//! VIP and answers the client itself). Every packet ends in exactly one action
//! counter and, unless forwarded, one reason counter.
#![no_std]
#![no_main]

mod flows;
mod forward;
mod maps;
mod packet;

use aya_ebpf::{bindings::xdp_action, helpers::bpf_redirect, macros::xdp, programs::XdpContext};
use lb_common::{FAMILY_V4, FORWARD_L2, Stat, Traffic, VipKey};

use crate::maps::{BACKEND_STATS, BACKENDS, STATS, VIP_STATS, VIPS};

/// What happens to a packet, with the reason when it is not forwarded.
pub enum Verdict {
    Pass(Stat),
    Drop(Stat),
    Tx,
    Redirect(u32),
}

#[xdp]
pub fn lb(ctx: XdpContext) -> u32 {
    let verdict = match balance(&ctx) {
        Ok(v) | Err(v) => v,
    };
    match verdict {
        Verdict::Pass(reason) => {
            count(reason);
            count(Stat::ActionPass);
            xdp_action::XDP_PASS
        }
        Verdict::Drop(reason) => {
            count(reason);
            count(Stat::ActionDrop);
            xdp_action::XDP_DROP
        }
        Verdict::Tx => {
            count(Stat::ActionTx);
            xdp_action::XDP_TX
        }
        Verdict::Redirect(ifindex) => {
            // SAFETY: plain helper call; flags 0 is always valid.
            let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
            count(if action == xdp_action::XDP_REDIRECT {
                Stat::ActionRedirect
            } else {
                Stat::ActionAborted
            });
            action
        }
    }
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    let flow = packet::parse(ctx)?;
    let key = VipKey {
        addr: [u32::from_ne_bytes(flow.dst), 0, 0, 0],
        port: flow.dport.to_be(),
        proto: flow.proto,
        family: FAMILY_V4,
    };
    // SAFETY: the value is only read, and copied before any other map call.
    let vip = *unsafe { VIPS.get(&key) }.ok_or(Verdict::Pass(Stat::PassNotVip))?;
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    add_traffic(&VIP_STATS, vip.id, bytes);

    let backend_id = flows::backend_for(&flow, &vip)?;
    let backend = BACKENDS
        .get(backend_id)
        .ok_or(Verdict::Drop(Stat::DropInternal))?;
    let verdict = match vip.forwarding {
        FORWARD_L2 => forward::l2(ctx, backend)?,
        // Userspace only writes modes this program knows.
        _ => return Err(Verdict::Drop(Stat::DropInternal)),
    };
    add_traffic(&BACKEND_STATS, backend_id, bytes);
    Ok(verdict)
}

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn add_traffic(map: &aya_ebpf::maps::PerCpuArray<Traffic>, index: u32, bytes: u64) {
    if let Some(t) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe {
            (*t).packets += 1;
            (*t).bytes += bytes;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
