//! Bounds-checked access to packet memory and header parsing. Every read of
//! the packet goes through [`ptr_at`].

use aya_ebpf::programs::XdpContext;
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, Stat};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::Verdict;

/// A pointer to a `T` at byte `offset` of the packet, or `None` when the packet
/// ends before the whole `T`. The check is written against `data_end` so the
/// verifier accepts later dereferences.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The fields of an IPv4 TCP/UDP packet that select a VIP and a backend.
/// Addresses are as they sit in the packet (network byte order); ports are
/// host-order numbers.
pub struct Flow {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// A TCP SYN (without ACK) or any UDP datagram: a packet that may start a
    /// flow, as opposed to one in the middle of a TCP connection.
    pub opens: bool,
}

/// Parses Ethernet, IPv4 and the TCP or UDP header. Anything the load balancer
/// does not handle is a `Pass` verdict; malformed headers are a `Drop` with the
/// reason, since the kernel would discard them too.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Flow, Verdict> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Verdict::Drop(Stat::DropTruncatedEth))?;
    // SAFETY: ptr_at checked that the header lies inside the packet.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return Err(Verdict::Pass(Stat::PassNotIpv4));
    }

    let ip: *const Ipv4Hdr =
        ptr_at(ctx, EthHdr::LEN).ok_or(Verdict::Drop(Stat::DropTruncatedIp))?;
    // SAFETY: as above.
    let ip = unsafe { &*ip };
    let ihl = (ip.vihl & 0x0f) as usize;
    if ip.vihl >> 4 != 4 || ihl < 5 {
        return Err(Verdict::Drop(Stat::DropBadIpHeader));
    }
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return Err(Verdict::Pass(Stat::PassNotTcpUdp));
    }
    // More-fragments flag or a non-zero offset: a non-first fragment carries no
    // ports, so the kernel reassembles (it drops those not addressed to it).
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(Verdict::Pass(Stat::PassFragment));
    }

    // IHL counts 32-bit words and honours IP options.
    let l4 = EthHdr::LEN + ihl * 4;
    let (sport, dport, opens) = if ip.proto == IPPROTO_TCP {
        let tcp: *const TcpHdr = ptr_at(ctx, l4).ok_or(Verdict::Drop(Stat::DropTruncatedL4))?;
        // SAFETY: as above.
        let tcp = unsafe { &*tcp };
        let syn_only = tcp.syn() != 0 && tcp.ack() == 0;
        (
            u16::from_be_bytes(tcp.source),
            u16::from_be_bytes(tcp.dest),
            syn_only,
        )
    } else {
        let udp: *const UdpHdr = ptr_at(ctx, l4).ok_or(Verdict::Drop(Stat::DropTruncatedL4))?;
        // SAFETY: as above.
        let udp = unsafe { &*udp };
        (
            u16::from_be_bytes(udp.src),
            u16::from_be_bytes(udp.dst),
            true,
        )
    };

    Ok(Flow {
        src: ip.src_addr,
        dst: ip.dst_addr,
        sport,
        dport,
        proto: ip.proto,
        opens,
    })
}
