//! Forwarding modes. The client's IP packet reaches the backend unmodified
//! (`l2`: new MACs; `ipip`: an outer header in front), and backends hold the
//! VIP and reply to the client directly (direct server return).

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    BACKEND_F_ICMP_TOO_BIG, BACKEND_F_RESOLVED, BackendEntry, Stat, decap::IPPROTO_IPIP,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

use crate::{Verdict, icmp, packet::ptr_at};

/// `l2` mode: the backend is on a segment this host is attached to. Rewrite the
/// destination MAC to the backend's and the source MAC to the egress
/// interface's; send back out of the ingress interface, or redirect when the
/// backend sits behind another one.
#[inline(always)]
pub fn l2(ctx: &XdpContext, backend: &BackendEntry) -> Result<Verdict, Verdict> {
    if backend.flags & BACKEND_F_RESOLVED == 0 {
        return Err(Verdict::Drop(Stat::DropNoNeighbour));
    }
    // The parser already read a whole Ethernet header; this check restates it
    // for the verifier.
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::Drop(Stat::DropTruncatedEth))?;
    // SAFETY: bounds-checked by ptr_at.
    unsafe {
        (*eth).dst_addr = backend.dst_mac;
        (*eth).src_addr = backend.src_mac;
    }
    if backend.ifindex == 0 || backend.ifindex == ctx.ingress_ifindex() as u32 {
        Ok(Verdict::Tx)
    } else {
        Ok(Verdict::Redirect(backend.ifindex))
    }
}

/// `ipip` mode: the backend is anywhere routable and runs `lb decap` (or a
/// kernel IPIP tunnel). Put an outer IPv4 header in front of the packet,
/// addressed from the VIP's encapsulation source to the backend, and send it
/// to the next hop towards the backend. Every byte of the outer header is
/// written: version and IHL, TOS (copied from the inner header), total
/// length, ID 0 with Don't Fragment (RFC 6864: an atomic datagram needs no
/// ID), TTL 64, protocol IPIP and the checksum.
#[inline(always)]
pub fn ipip(ctx: &XdpContext, backend: &BackendEntry) -> Result<Verdict, Verdict> {
    if backend.flags & BACKEND_F_RESOLVED == 0 {
        return Err(Verdict::Drop(Stat::DropNoNeighbour));
    }
    let inner: *const Ipv4Hdr =
        ptr_at(ctx, EthHdr::LEN).ok_or(Verdict::Drop(Stat::DropTruncatedIp))?;
    // SAFETY: bounds-checked by ptr_at.
    let (tos, inner_len) = unsafe { ((*inner).tos, u16::from_be_bytes((*inner).tot_len)) };
    // The outer length and the too-big decision come from the total length,
    // so it must be the packet's real length: a forged one would make a
    // malformed outer header, or an ICMP answer to a packet that is not big.
    let frame_ip_len = ctx.data_end() - ctx.data() - EthHdr::LEN;
    if (inner_len as usize) < Ipv4Hdr::LEN {
        return Err(Verdict::Drop(Stat::DropBadIpHeader));
    }
    if inner_len as usize > frame_ip_len {
        return Err(Verdict::Drop(Stat::DropTruncatedIp));
    }
    let outer_len = inner_len as u32 + Ipv4Hdr::LEN as u32;
    if outer_len > u16::MAX as u32 || backend.mtu != 0 && outer_len > backend.mtu {
        // With no known MTU there is no size to tell the client.
        if backend.flags & BACKEND_F_ICMP_TOO_BIG == 0 || backend.mtu == 0 {
            return Err(Verdict::Drop(Stat::DropTooBig));
        }
        let mtu = backend
            .mtu
            .saturating_sub(Ipv4Hdr::LEN as u32)
            .min(u16::MAX as u32) as u16;
        return match icmp::frag_needed(ctx, mtu) {
            Ok(()) => Err(Verdict::Answer(Stat::IcmpTooBig)),
            Err(reason) => Err(Verdict::Drop(reason)),
        };
    }
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(Ipv4Hdr::LEN as i32)) } != 0 {
        return Err(Verdict::Drop(Stat::DropInternal));
    }
    // Packet pointers are invalid after adjust_head; take them afresh.
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::Drop(Stat::DropInternal))?;
    let outer: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(Verdict::Drop(Stat::DropInternal))?;
    let mut header = Ipv4Hdr {
        vihl: 0x45,
        tos,
        tot_len: (outer_len as u16).to_be_bytes(),
        id: [0, 0],
        frags: 0x4000u16.to_be_bytes(),
        ttl: 64,
        proto: IPPROTO_IPIP,
        check: [0, 0],
        src_addr: backend.encap_src.to_ne_bytes(),
        dst_addr: backend.addr.to_ne_bytes(),
    };
    header.check = checksum(&header).to_be_bytes();
    // SAFETY: both bounds-checked by ptr_at after the adjustment.
    unsafe {
        *eth = EthHdr {
            dst_addr: backend.dst_mac,
            src_addr: backend.src_mac,
            ether_type: EtherType::Ipv4 as u16,
        };
        *outer = header;
    }
    if backend.ifindex == 0 || backend.ifindex == ctx.ingress_ifindex() as u32 {
        Ok(Verdict::Tx)
    } else {
        Ok(Verdict::Redirect(backend.ifindex))
    }
}

/// The IPv4 header checksum of `h` (whose `check` is zero).
#[inline(always)]
pub fn checksum(h: &Ipv4Hdr) -> u16 {
    // SAFETY: Ipv4Hdr is 20 plain bytes.
    let bytes: &[u8; 20] = unsafe { &*(h as *const Ipv4Hdr as *const [u8; 20]) };
    checksum_words(bytes)
}

/// The Internet checksum (RFC 1071) of an even number of bytes.
#[inline(always)]
pub fn checksum_words<const N: usize>(bytes: &[u8; N]) -> u16 {
    const { assert!(N % 2 == 0) };
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < N {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
