//! ICMP "fragmentation needed" for IPv4 packets that would exceed the egress
//! MTU once encapsulated: the client's kernel lowers its path MTU for the VIP
//! and sends smaller packets (path MTU discovery through the tunnel).

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{ICMP_BURST, ICMP_NS_PER_TOKEN, Stat};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

use crate::{
    forward::{checksum, checksum_words},
    maps::ICMP_BUCKET,
    packet::ptr_at,
};

/// The whole answer: Ethernet, IPv4 and ICMP headers, then the original IPv4
/// header (no options) and the first 8 bytes after it, as RFC 792 asks.
const ANSWER: usize = EthHdr::LEN + Ipv4Hdr::LEN + 8 + Ipv4Hdr::LEN + 8;

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
    let unicast_frame = eth.dst_addr[0] & 1 == 0;
    if !dont_fragment || ip.vihl != 0x45 || !unicast_sender || !unicast_frame {
        return Err(Stat::DropTooBig);
    }
    if !take_token() {
        return Err(Stat::DropIcmpRateLimited);
    }
    // Room for the new IPv4 and ICMP headers in front of the original IPv4
    // header, which (with its next 8 bytes) becomes the ICMP payload where it
    // already is.
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -((Ipv4Hdr::LEN + 8) as i32)) } != 0 {
        return Err(Stat::DropInternal);
    }
    let len = (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, ANSWER as i32 - len) } != 0 {
        return Err(Stat::DropInternal);
    }
    let p: *mut [u8; ANSWER] = ptr_at(ctx, 0).ok_or(Stat::DropInternal)?;
    // SAFETY: bounds-checked by ptr_at after both adjustments.
    let p = unsafe { &mut *p };
    let mut reply = Ipv4Hdr {
        vihl: 0x45,
        // Internetwork control, as the kernel marks its own ICMP errors.
        tos: 0xc0,
        tot_len: ((ANSWER - EthHdr::LEN) as u16).to_be_bytes(),
        // Don't Fragment: an atomic datagram, so ID 0 (RFC 6864).
        id: [0, 0],
        frags: [0x40, 0],
        ttl: 64,
        proto: 1,
        check: [0, 0],
        src_addr: ip.dst_addr,
        dst_addr: ip.src_addr,
    };
    reply.check = checksum(&reply).to_be_bytes();
    let back = EthHdr {
        dst_addr: eth.src_addr,
        src_addr: eth.dst_addr,
        ether_type: EtherType::Ipv4 as u16,
    };
    // SAFETY: both plain byte structs of the sizes written.
    unsafe {
        *(p.as_mut_ptr() as *mut EthHdr) = back;
        *(p.as_mut_ptr().add(EthHdr::LEN) as *mut Ipv4Hdr) = reply;
    }
    let icmp = EthHdr::LEN + Ipv4Hdr::LEN;
    p[icmp..icmp + 8].copy_from_slice(&[3, 4, 0, 0, 0, 0, (mtu >> 8) as u8, mtu as u8]);
    let mut payload = [0u8; ANSWER - EthHdr::LEN - Ipv4Hdr::LEN];
    payload.copy_from_slice(&p[icmp..]);
    let sum = checksum_words(&payload).to_be_bytes();
    p[icmp + 2] = sum[0];
    p[icmp + 3] = sum[1];
    Ok(())
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

/// A copy of the `T` at `offset`, bounds-checked (a copy, because the
/// helpers that move the packet's head and tail invalidate references).
#[inline(always)]
fn read_at<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let p: *const T = ptr_at(ctx, offset)?;
    // SAFETY: bounds-checked by ptr_at.
    Some(unsafe { *p })
}

const _: () = assert!(ANSWER == 70);
