//! `lb decap`'s XDP program, for backends: strips the outer header of IPIP,
//! IPv4-in-IPv6 and IP6IP6 packets addressed to this host and passes the
//! inner packet to the kernel, so a backend needs no `ipip` or `ip6_tunnel`
//! module. Everything else passes untouched.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    addr_key,
    decap::{DECAP_MAX_ADDRS, DecapStat, DecapStats, IPPROTO_IPIP, IPPROTO_IPV6},
};
use lb_ebpf::ptr_at;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};

/// This host's addresses (`lb_common::addr_key`): only tunnels
/// addressed to one of them are opened. Written by `lb decap`.
#[map]
static DECAP_ADDRS: HashMap<[u8; 16], u8> = HashMap::with_max_entries(DECAP_MAX_ADDRS, 0);

/// `lb_common::decap::DecapStat` counters, per CPU.
#[map]
static DECAP_STATS: PerCpuArray<DecapStats> = PerCpuArray::with_max_entries(1, 0);

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
    // Only a plain tunnel to one of our addresses is opened: an IPv4 outer
    // header without options or fragmentation, or an IPv6 one whose next
    // header is the inner packet (no extension headers). The kernel deals
    // with anything else as it would without this program.
    let (outer_len, inner_proto, dst) = if eth_copy.ether_type == EtherType::Ipv4 as u16 {
        let Some(outer) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
            return pass;
        };
        // SAFETY: as above.
        let outer = unsafe { &*outer };
        if outer.proto != IPPROTO_IPIP
            || outer.vihl != 0x45
            || u16::from_be_bytes(outer.frags) & 0x3fff != 0
        {
            return pass;
        }
        let dst = IpAddr::V4(Ipv4Addr::from(outer.dst_addr));
        (Ipv4Hdr::LEN, IPPROTO_IPIP, dst)
    } else if eth_copy.ether_type == EtherType::Ipv6 as u16 {
        let Some(outer) = ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN) else {
            return pass;
        };
        // SAFETY: as above.
        let outer = unsafe { &*outer };
        if outer.next_hdr != IPPROTO_IPIP && outer.next_hdr != IPPROTO_IPV6 {
            return pass;
        }
        let dst = Ipv6Addr::from(outer.dst_addr);
        // IPv4-mapped addresses never appear on the wire (RFC 4291 2.5.5.2),
        // and in DECAP_ADDRS they stand for the host's IPv4 addresses.
        if dst.to_ipv4_mapped().is_some() {
            return pass;
        }
        (Ipv6Hdr::LEN, outer.next_hdr, IpAddr::V6(dst))
    } else {
        return pass;
    };
    // SAFETY: the value is only tested for presence.
    if unsafe { DECAP_ADDRS.get(&addr_key(dst)) }.is_none() {
        return pass;
    }
    // The inner header must be there whole, of the family the outer one
    // names.
    let inner_at = EthHdr::LEN + outer_len;
    let (first_byte, version, ether_type) = if inner_proto == IPPROTO_IPIP {
        // SAFETY: bounds-checked by ptr_at.
        let first = ptr_at::<Ipv4Hdr>(ctx, inner_at).map(|h| unsafe { (*h).vihl });
        (first, 4, EtherType::Ipv4)
    } else {
        // SAFETY: bounds-checked by ptr_at.
        let first = ptr_at::<Ipv6Hdr>(ctx, inner_at).map(|h| unsafe { (*h).vcf[0] });
        (first, 6, EtherType::Ipv6)
    };
    if first_byte.map(|b| b >> 4) != Some(version) {
        return (xdp_action::XDP_DROP, DecapStat::Malformed);
    }
    // Move the Ethernet header over the outer header (with the inner
    // packet's EtherType), then drop the bytes in front of it.
    let Some(new_eth) = ptr_at::<EthHdr>(ctx, outer_len) else {
        return (xdp_action::XDP_DROP, DecapStat::Malformed);
    };
    // SAFETY: bounds-checked by ptr_at; the copy was taken above.
    unsafe {
        *new_eth = EthHdr {
            ether_type: ether_type as u16,
            ..eth_copy
        }
    };
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return (xdp_action::XDP_DROP, DecapStat::Malformed);
    }
    (xdp_action::XDP_PASS, DecapStat::Decapsulated)
}
