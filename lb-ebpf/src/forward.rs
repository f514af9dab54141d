//! Forwarding modes. The client's IP packet reaches the backend unmodified
//! (`l2`: new MACs; `ipip`: an outer IPv4 or IPv6 header in front), and
//! backends hold the VIP and reply to the client directly (direct server
//! return).

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    BACKEND_F_ICMP_TOO_BIG, BACKEND_F_RESOLVED, BackendEntry, Stat,
    decap::{IPPROTO_IPIP, IPPROTO_IPV6},
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use lb_ebpf::{ptr_at, read_at};

use crate::{Verdict, csum, icmp};

/// `l2` mode: the backend is on a segment this host is attached to. Rewrite the
/// destination MAC to the backend's and the source MAC to the egress
/// interface's; send back out of the ingress interface, or redirect when the
/// backend sits behind another one. The same for both families.
#[inline(always)]
pub fn l2(ctx: &XdpContext, backend: &BackendEntry) -> Result<Verdict, Verdict> {
    resolved(backend)?;
    // The parser already read a whole Ethernet header; this check restates it
    // for the verifier.
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::Drop(Stat::DropTruncatedEth))?;
    // SAFETY: bounds-checked by ptr_at.
    unsafe {
        (*eth).dst_addr = backend.dst_mac;
        (*eth).src_addr = backend.src_mac;
    }
    Ok(out(ctx, backend))
}

/// `ipip` mode to an IPv4 backend (IPIP; the VIP is IPv4 too): put an outer
/// IPv4 header in front of the packet, from the VIP's encapsulation source to
/// the backend, and send it to the next hop towards the backend. Every byte
/// of the outer header is written: version and IHL, TOS (copied from the
/// inner header), total length, ID 0 with Don't Fragment (RFC 6864: an
/// atomic datagram needs no ID), TTL 64, protocol IPIP and the checksum.
#[inline(always)]
pub fn ipip(ctx: &XdpContext, backend: &BackendEntry) -> Result<Verdict, Verdict> {
    resolved(backend)?;
    let inner = inner(ctx, false)?;
    let outer_len = inner.len as u32 + Ipv4Hdr::LEN as u32;
    if outer_len > u16::MAX as u32 || backend.mtu != 0 && outer_len > backend.mtu {
        return Err(too_big(ctx, backend, false, Ipv4Hdr::LEN as u32));
    }
    let a = &backend.addr;
    let s = &backend.encap_src;
    let mut header = Ipv4Hdr {
        vihl: 0x45,
        tos: inner.class,
        tot_len: (outer_len as u16).to_be_bytes(),
        id: [0, 0],
        frags: 0x4000u16.to_be_bytes(),
        ttl: 64,
        proto: IPPROTO_IPIP,
        check: [0, 0],
        // IPv4 addresses are IPv4-mapped in the entry: the last four bytes.
        src_addr: [s[12], s[13], s[14], s[15]],
        dst_addr: [a[12], a[13], a[14], a[15]],
    };
    header.check = csum::ipv4_header(&header).to_be_bytes();
    push_outer(ctx, backend, EtherType::Ipv4, header)
}

/// `ipip` mode to an IPv6 backend: put an outer IPv6 header in front of the
/// packet (IP6IP6 for an IPv6 packet, IPv4-in-IPv6 for an IPv4 one), from the
/// VIP's encapsulation source to the backend. Every byte is written: version,
/// traffic class (copied from the inner TOS or traffic class), flow label
/// (the flow hash, RFC 6438: the only per-flow field of the outer header,
/// for routers and receivers that spread flows by it), payload length, next
/// header, hop limit 64 and both addresses. IPv6 has no header checksum.
#[inline(always)]
pub fn ip6(
    ctx: &XdpContext,
    backend: &BackendEntry,
    inner_v6: bool,
    hash: u32,
) -> Result<Verdict, Verdict> {
    resolved(backend)?;
    let inner = inner(ctx, inner_v6)?;
    if backend.mtu != 0 && inner.len as u32 + Ipv6Hdr::LEN as u32 > backend.mtu {
        return Err(too_big(ctx, backend, inner_v6, Ipv6Hdr::LEN as u32));
    }
    let label = hash & 0x000f_ffff;
    let header = Ipv6Hdr {
        vcf: [
            0x60 | inner.class >> 4,
            inner.class << 4 | (label >> 16) as u8,
            (label >> 8) as u8,
            label as u8,
        ],
        payload_len: inner.len.to_be_bytes(),
        next_hdr: if inner_v6 { IPPROTO_IPV6 } else { IPPROTO_IPIP },
        hop_limit: 64,
        src_addr: backend.encap_src,
        dst_addr: backend.addr,
    };
    push_outer(ctx, backend, EtherType::Ipv6, header)
}

/// Drops (counted) towards a backend whose MAC, or next hop's, is unknown:
/// never a frame to a zero MAC.
#[inline(always)]
fn resolved(backend: &BackendEntry) -> Result<(), Verdict> {
    if backend.flags & BACKEND_F_RESOLVED == 0 {
        return Err(Verdict::Drop(Stat::DropNoNeighbour));
    }
    Ok(())
}

/// XDP_TX out of the ingress interface, or a redirect to the backend's.
#[inline(always)]
fn out(ctx: &XdpContext, backend: &BackendEntry) -> Verdict {
    if backend.ifindex == 0 || backend.ifindex == ctx.ingress_ifindex() as u32 {
        Verdict::Tx
    } else {
        Verdict::Redirect(backend.ifindex)
    }
}

/// What the outer header copies from the packet being encapsulated.
struct Inner {
    /// IPv4 total length, or IPv6 header plus payload length.
    len: u16,
    /// IPv4 TOS or IPv6 traffic class.
    class: u8,
}

/// Reads the inner packet's length and class. The outer length and the
/// too-big decision come from that length, so it must be the packet's real
/// length: a forged one would make a malformed outer header, or an ICMP
/// answer to a packet that is not big.
#[inline(always)]
fn inner(ctx: &XdpContext, v6: bool) -> Result<Inner, Verdict> {
    let (len, class, header) = if v6 {
        let ip: Ipv6Hdr = read_at(ctx, EthHdr::LEN).ok_or(Verdict::Drop(Stat::DropTruncatedIp))?;
        let len = u16::from_be_bytes(ip.payload_len) as u32 + Ipv6Hdr::LEN as u32;
        (len, ip.vcf[0] << 4 | ip.vcf[1] >> 4, Ipv6Hdr::LEN)
    } else {
        let ip: Ipv4Hdr = read_at(ctx, EthHdr::LEN).ok_or(Verdict::Drop(Stat::DropTruncatedIp))?;
        (u16::from_be_bytes(ip.tot_len) as u32, ip.tos, Ipv4Hdr::LEN)
    };
    if (len as usize) < header {
        return Err(Verdict::Drop(Stat::DropBadIpHeader));
    }
    // (IPv6 jumbograms, length 0 and a hop-by-hop option, never fit a frame
    // and are encapsulated as what they claim: 40 bytes.)
    if len as usize > ctx.data_end() - ctx.data() - EthHdr::LEN || len > u16::MAX as u32 {
        return Err(Verdict::Drop(Stat::DropTruncatedIp));
    }
    Ok(Inner {
        len: len as u16,
        class,
    })
}

/// The verdict for a packet too big once encapsulated with `overhead`
/// bytes: an ICMP or ICMPv6 answer telling the client the size that fits,
/// or a counted drop.
#[inline(always)]
fn too_big(ctx: &XdpContext, backend: &BackendEntry, inner_v6: bool, overhead: u32) -> Verdict {
    // With no known MTU there is no size to tell the client.
    if backend.flags & BACKEND_F_ICMP_TOO_BIG == 0 || backend.mtu == 0 {
        return Verdict::Drop(Stat::DropTooBig);
    }
    let mtu = backend.mtu.saturating_sub(overhead);
    let answered = if inner_v6 {
        icmp::packet_too_big(ctx, mtu).map(|()| Stat::IcmpPacketTooBig)
    } else {
        icmp::frag_needed(ctx, mtu.min(u16::MAX as u32) as u16).map(|()| Stat::IcmpTooBig)
    };
    match answered {
        Ok(stat) => Verdict::Answer(stat),
        Err(reason) => Verdict::Drop(reason),
    }
}

/// Makes room for `header` (an outer IPv4 or IPv6 header) between the
/// Ethernet header and the packet, writes both, and sends the frame on.
#[inline(always)]
fn push_outer<H>(
    ctx: &XdpContext,
    backend: &BackendEntry,
    ether_type: EtherType,
    header: H,
) -> Result<Verdict, Verdict> {
    let grow = size_of::<H>() as i32;
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return Err(Verdict::Drop(Stat::DropInternal));
    }
    // Packet pointers are invalid after adjust_head; take them afresh.
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::Drop(Stat::DropInternal))?;
    let outer: *mut H = ptr_at(ctx, EthHdr::LEN).ok_or(Verdict::Drop(Stat::DropInternal))?;
    // SAFETY: both bounds-checked by ptr_at after the adjustment; H is a
    // plain header struct of byte fields (unaligned stores are fine).
    unsafe {
        *eth = EthHdr {
            dst_addr: backend.dst_mac,
            src_addr: backend.src_mac,
            ether_type: ether_type as u16,
        };
        outer.write_unaligned(header);
    }
    Ok(out(ctx, backend))
}
