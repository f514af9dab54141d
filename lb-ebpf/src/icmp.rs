//! Answers to packets that would exceed the egress MTU once encapsulated:
//! ICMP "fragmentation needed" for IPv4, ICMPv6 "packet too big" for IPv6.
//! The client's kernel lowers its path MTU for the VIP and sends smaller
//! packets (path MTU discovery through the tunnel).
//!
//! Both answers are built in place, from the VIP to the client, quoting the
//! original IP header and the 8 bytes after it (the ports and, for TCP, the
//! sequence number the sender checks). They are always smaller than the
//! packet answered, so they cannot amplify, and rate-limited per CPU.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{ICMP_BURST, ICMP_NS_PER_TOKEN, IPPROTO_TCP, IPPROTO_UDP, Stat};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use lb_ebpf::{ptr_at, read_at};

use crate::{csum, maps::ICMP_BUCKET};

/// Length of the ICMP and ICMPv6 headers (type, code, checksum, 4 more).
const ICMP_HEADER: usize = 8;
/// The whole IPv4 answer: Ethernet, IPv4 and ICMP headers, then the original
/// IPv4 header (no options) and the first 8 bytes after it (RFC 792).
const ANSWER: usize = EthHdr::LEN + Ipv4Hdr::LEN + ICMP_HEADER + Ipv4Hdr::LEN + 8;
/// The whole IPv6 answer, laid out the same way.
const ANSWER6: usize = EthHdr::LEN + Ipv6Hdr::LEN + ICMP_HEADER + Ipv6Hdr::LEN + 8;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

/// Turns the packet (Ethernet + IPv4 without options, Don't Fragment set)
/// into an ICMP "fragmentation needed" answer to its sender carrying `mtu`,
/// ready for XDP_TX. Refuses (`drop_too_big`, packet untouched) what RFC 1122
/// 3.2.2 forbids answering or what the answer could not quote whole;
/// `drop_internal` if the packet cannot be reshaped.
#[inline(always)]
pub fn frag_needed(ctx: &XdpContext, mtu: u16) -> Result<(), Stat> {
    let eth: EthHdr = read_at(ctx, 0).ok_or(Stat::DropTooBig)?;
    let ip: Ipv4Hdr = read_at(ctx, EthHdr::LEN).ok_or(Stat::DropTooBig)?;
    let dont_fragment = u16::from_be_bytes(ip.frags) & 0x4000 != 0;
    // Never to 0/8, 127/8, multicast or class E (broadcast included), never
    // for a frame sent to a group MAC: no ICMP storms, no reflection.
    let unicast_sender = !matches!(ip.src_addr[0], 0 | 127 | 224..=255);
    if !dont_fragment || ip.vihl != 0x45 || !unicast_sender || !unicast(&eth) {
        return Err(Stat::DropTooBig);
    }
    let p: &mut [u8; ANSWER] = reshape(ctx, Ipv4Hdr::LEN)?;
    let mut reply = Ipv4Hdr {
        vihl: 0x45,
        // Internetwork control, as the kernel marks its own ICMP errors.
        tos: 0xc0,
        tot_len: ((ANSWER - EthHdr::LEN) as u16).to_be_bytes(),
        // Don't Fragment: an atomic datagram, so ID 0 (RFC 6864).
        id: [0, 0],
        frags: [0x40, 0],
        ttl: 64,
        proto: IPPROTO_ICMP,
        check: [0, 0],
        src_addr: ip.dst_addr,
        dst_addr: ip.src_addr,
    };
    reply.check = csum::ipv4_header(&reply).to_be_bytes();
    write_headers(p, &eth, EtherType::Ipv4, reply);
    let icmp = EthHdr::LEN + Ipv4Hdr::LEN;
    let [m0, m1] = mtu.to_be_bytes();
    p[icmp..icmp + ICMP_HEADER].copy_from_slice(&[3, 4, 0, 0, 0, 0, m0, m1]);
    let mut message = [0u8; ANSWER - EthHdr::LEN - Ipv4Hdr::LEN];
    message.copy_from_slice(&p[icmp..]);
    set_checksum(p, icmp, csum::fold(csum::sum(&message)));
    Ok(())
}

/// Turns the packet (Ethernet + IPv6 directly followed by TCP or UDP) into an
/// ICMPv6 "packet too big" answer to its sender carrying `mtu`, ready for
/// XDP_TX. Refuses (`drop_too_big`, packet untouched) a multicast,
/// unspecified or loopback sender and a frame to a group MAC (stricter than
/// RFC 4443 2.4, which lets "packet too big" answer multicast: no VIP is
/// multicast, so such a packet is someone else's), and packets with
/// extension headers, which the answer could not quote up to the ports.
#[inline(always)]
pub fn packet_too_big(ctx: &XdpContext, mtu: u32) -> Result<(), Stat> {
    let eth: EthHdr = read_at(ctx, 0).ok_or(Stat::DropTooBig)?;
    let ip: Ipv6Hdr = read_at(ctx, EthHdr::LEN).ok_or(Stat::DropTooBig)?;
    let src = u128::from_be_bytes(ip.src_addr);
    let unicast_sender = ip.src_addr[0] != 0xff && src != 0 && src != 1;
    let plain = ip.next_hdr == IPPROTO_TCP || ip.next_hdr == IPPROTO_UDP;
    if !plain || !unicast_sender || !unicast(&eth) {
        return Err(Stat::DropTooBig);
    }
    let p: &mut [u8; ANSWER6] = reshape(ctx, Ipv6Hdr::LEN)?;
    let length = (ANSWER6 - EthHdr::LEN - Ipv6Hdr::LEN) as u16;
    let reply = Ipv6Hdr {
        // Traffic class and flow label 0, as the kernel sends its own.
        vcf: [0x60, 0, 0, 0],
        payload_len: length.to_be_bytes(),
        next_hdr: IPPROTO_ICMPV6,
        hop_limit: 64,
        src_addr: ip.dst_addr,
        dst_addr: ip.src_addr,
    };
    write_headers(p, &eth, EtherType::Ipv6, reply);
    let icmp = EthHdr::LEN + Ipv6Hdr::LEN;
    let [m0, m1, m2, m3] = mtu.to_be_bytes();
    p[icmp..icmp + ICMP_HEADER].copy_from_slice(&[2, 0, 0, 0, m0, m1, m2, m3]);
    let mut message = [0u8; ANSWER6 - EthHdr::LEN - Ipv6Hdr::LEN];
    message.copy_from_slice(&p[icmp..]);
    // The ICMPv6 checksum covers a pseudo-header too (RFC 8200 8.1).
    let pseudo =
        csum::sum(&ip.dst_addr) + csum::sum(&ip.src_addr) + length as u32 + IPPROTO_ICMPV6 as u32;
    set_checksum(p, icmp, csum::fold(pseudo + csum::sum(&message)));
    Ok(())
}

/// A frame to a unicast MAC (an ICMP error is never sent for one to a group).
#[inline(always)]
fn unicast(eth: &EthHdr) -> bool {
    eth.dst_addr[0] & 1 == 0
}

/// Takes a token, then grows the head by a new IP header of `ip_len` bytes
/// and the ICMP header (the original IP header with its next 8 bytes becomes
/// the quote where it already is) and cuts the tail to `N`, the answer's
/// length. Nothing is changed when the budget is spent.
#[inline(always)]
fn reshape<const N: usize>(ctx: &XdpContext, ip_len: usize) -> Result<&mut [u8; N], Stat> {
    if !take_token() {
        return Err(Stat::DropIcmpRateLimited);
    }
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -((ip_len + ICMP_HEADER) as i32)) } != 0 {
        return Err(Stat::DropInternal);
    }
    let len = (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, N as i32 - len) } != 0 {
        return Err(Stat::DropInternal);
    }
    let p: *mut [u8; N] = ptr_at(ctx, 0).ok_or(Stat::DropInternal)?;
    // SAFETY: bounds-checked by ptr_at after both adjustments; valid until
    // the next helper that moves the packet, and none follows.
    Ok(unsafe { &mut *p })
}

/// Writes the Ethernet header back to the sender and the answer's IP header.
#[inline(always)]
fn write_headers<const N: usize, H>(p: &mut [u8; N], eth: &EthHdr, ether_type: EtherType, ip: H) {
    let back = EthHdr {
        dst_addr: eth.src_addr,
        src_addr: eth.dst_addr,
        ether_type: ether_type as u16,
    };
    // SAFETY: both plain byte structs, and `N` covers them (every answer is
    // longer than its headers).
    unsafe {
        (p.as_mut_ptr() as *mut EthHdr).write_unaligned(back);
        (p.as_mut_ptr().add(EthHdr::LEN) as *mut H).write_unaligned(ip);
    }
}

#[inline(always)]
fn set_checksum<const N: usize>(p: &mut [u8; N], icmp: usize, sum: u16) {
    let [s0, s1] = sum.to_be_bytes();
    p[icmp + 2] = s0;
    p[icmp + 3] = s1;
}

/// Takes one answer from this CPU's token bucket; false when it is empty.
#[inline(always)]
fn take_token() -> bool {
    let Some(bucket) = ICMP_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU element, used only by this CPU while it runs us.
    let [last, tokens] = unsafe { &mut *bucket };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let earned = now.saturating_sub(*last) / ICMP_NS_PER_TOKEN;
    if earned > 0 {
        *tokens = (*tokens + earned).min(ICMP_BURST);
        // Keep the fraction of a token already earned.
        *last += earned * ICMP_NS_PER_TOKEN;
    }
    if *tokens == 0 {
        return false;
    }
    *tokens -= 1;
    true
}

const _: () = assert!(ANSWER == 70);
const _: () = assert!(ANSWER6 == 110);
