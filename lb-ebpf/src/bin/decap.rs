//! `lb decap`'s XDP program, for backends: strips the outer IPv4 header of
//! IPIP packets addressed to this host and passes the inner packet to the
//! kernel, so a backend needs no `ipip` tunnel module. Everything else passes
//! untouched.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::decap::{DECAP_MAX_ADDRS, DecapStat, DecapStats, IPPROTO_IPIP};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

/// This host's IPv4 addresses (network byte order): only tunnels addressed to
/// one of them are opened. Written by `lb decap`.
#[map]
static DECAP_ADDRS: HashMap<u32, u8> = HashMap::with_max_entries(DECAP_MAX_ADDRS, 0);

/// `lb_common::decap::DecapStat` counters, per CPU.
#[map]
static DECAP_STATS: PerCpuArray<DecapStats> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let (action, stat) = decap(&ctx);
    if let Some(stats) = DECAP_STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU element, written only by this CPU while it runs us.
        if let Some(c) = unsafe { (*stats).get_mut(stat as usize) } {
            *c += 1;
        }
    }
    action
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> (u32, DecapStat) {
    let pass = (xdp_action::XDP_PASS, DecapStat::Passed);
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return pass;
    };
    // SAFETY: bounds-checked by ptr_at.
    let eth_copy = unsafe { *eth };
    if eth_copy.ether_type != EtherType::Ipv4 as u16 {
        return pass;
    }
    let Some(outer) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return pass;
    };
    // SAFETY: as above.
    let outer = unsafe { &*outer };
    // Only plain, unfragmented IPIP to one of our addresses is opened; the
    // kernel deals with anything else as it would without this program.
    if outer.proto != IPPROTO_IPIP
        || outer.vihl != 0x45
        || u16::from_be_bytes(outer.frags) & 0x3fff != 0
    {
        return pass;
    }
    // SAFETY: the value is only tested for presence.
    if unsafe { DECAP_ADDRS.get(&u32::from_ne_bytes(outer.dst_addr)) }.is_none() {
        return pass;
    }
    // The inner header must be there, and IPv4.
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN + Ipv4Hdr::LEN) else {
        return (xdp_action::XDP_DROP, DecapStat::Malformed);
    };
    // SAFETY: as above.
    if unsafe { (*inner).vihl } >> 4 != 4 {
        return (xdp_action::XDP_DROP, DecapStat::Malformed);
    }
    // Move the Ethernet header over the outer IPv4 header, then drop the
    // 20 bytes in front of it.
    let Some(new_eth) = ptr_at::<EthHdr>(ctx, Ipv4Hdr::LEN) else {
        return (xdp_action::XDP_DROP, DecapStat::Malformed);
    };
    // SAFETY: bounds-checked by ptr_at; the copy was taken above.
    unsafe { *new_eth = eth_copy };
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, Ipv4Hdr::LEN as i32) } != 0 {
        return (xdp_action::XDP_DROP, DecapStat::Malformed);
    }
    (xdp_action::XDP_PASS, DecapStat::Decapsulated)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
