//! Header parsing. Every read of the packet goes through `lb_ebpf::ptr_at`.

use aya_ebpf::programs::XdpContext;
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, MAX_IPV6_EXT_HEADERS, Stat};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use lb_ebpf::{ptr_at, read_at};

use crate::Verdict;

/// IPv6 extension headers walked to reach TCP or UDP (RFC 8200).
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTIONS: u8 = 60;

/// The fields of a TCP/UDP packet that select a VIP and a backend; `A` is
/// the address as it sits in the packet: `[u8; 4]` or `[u8; 16]`. Ports are
/// host-order numbers.
pub struct Flow<A> {
    pub src: A,
    pub dst: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// A TCP SYN (without ACK) or any UDP datagram: a packet that may start a
    /// flow, as opposed to one in the middle of a TCP connection.
    pub opens: bool,
    /// A TCP FIN or RST: the flow is ending, its entry may be reused first.
    pub closes: bool,
}

pub enum Parsed {
    V4(Flow<[u8; 4]>),
    V6(Flow<[u8; 16]>),
}

/// Parses Ethernet, IPv4 or IPv6 (with its extension headers) and the TCP or
/// UDP header. Anything the load balancer does not handle is a `Pass`
/// verdict; malformed headers are a `Drop` with the reason, since the kernel
/// would discard them too.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Parsed, Verdict> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Verdict::Drop(Stat::DropTruncatedEth))?;
    // SAFETY: ptr_at checked that the header lies inside the packet.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == EtherType::Ipv4 as u16 {
        parse_v4(ctx).map(Parsed::V4)
    } else if ether_type == EtherType::Ipv6 as u16 {
        parse_v6(ctx).map(Parsed::V6)
    } else {
        Err(Verdict::Pass(Stat::PassNotIp))
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext) -> Result<Flow<[u8; 4]>, Verdict> {
    let ip: *const Ipv4Hdr =
        ptr_at(ctx, EthHdr::LEN).ok_or(Verdict::Drop(Stat::DropTruncatedIp))?;
    // SAFETY: bounds-checked by ptr_at.
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
    let (sport, dport, opens, closes) = ports(ctx, EthHdr::LEN + ihl * 4, ip.proto)?;
    Ok(Flow {
        src: ip.src_addr,
        dst: ip.dst_addr,
        sport,
        dport,
        proto: ip.proto,
        opens,
        closes,
    })
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext) -> Result<Flow<[u8; 16]>, Verdict> {
    let ip: *const Ipv6Hdr =
        ptr_at(ctx, EthHdr::LEN).ok_or(Verdict::Drop(Stat::DropTruncatedIp))?;
    // SAFETY: bounds-checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Err(Verdict::Drop(Stat::DropBadIpHeader));
    }
    let mut next = ip.next_hdr;
    let mut l4 = EthHdr::LEN + Ipv6Hdr::LEN;
    // A bounded walk: each header names the next one and its own length.
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        // The first 8 bytes of any of the four (none is shorter): next
        // header, length (or reserved), then routing type and segments
        // left, or the fragment offset and flags.
        let h: [u8; 8] = match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_DEST_OPTIONS => {
                read_at(ctx, l4).ok_or(Verdict::Drop(Stat::DropTruncatedIp))?
            }
            _ => break,
        };
        match next {
            IPV6_FRAGMENT => {
                // Offset or more-fragments set: as for IPv4, the kernel
                // reassembles. (Offset 0 without M is an atomic fragment.)
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff9 != 0 {
                    return Err(Verdict::Pass(Stat::PassFragment));
                }
                l4 += 8;
            }
            IPV6_ROUTING if h[3] != 0 => {
                // Segments left: the destination is a waypoint, not the VIP.
                return Err(Verdict::Pass(Stat::PassIpv6ExtHeaders));
            }
            // Length in 8-byte units, not counting the first 8 bytes.
            _ => l4 += (h[1] as usize + 1) * 8,
        }
        next = h[0];
    }
    if next == IPV6_HOP_BY_HOP
        || next == IPV6_ROUTING
        || next == IPV6_FRAGMENT
        || next == IPV6_DEST_OPTIONS
    {
        return Err(Verdict::Pass(Stat::PassIpv6ExtHeaders));
    }
    if next != IPPROTO_TCP && next != IPPROTO_UDP {
        return Err(Verdict::Pass(Stat::PassNotTcpUdp));
    }
    let (sport, dport, opens, closes) = ports(ctx, l4, next)?;
    Ok(Flow {
        src: ip.src_addr,
        dst: ip.dst_addr,
        sport,
        dport,
        proto: next,
        opens,
        closes,
    })
}

/// Source and destination port of the TCP or UDP header at `l4`, whether
/// the packet may open a flow and whether it ends one.
#[inline(always)]
fn ports(ctx: &XdpContext, l4: usize, proto: u8) -> Result<(u16, u16, bool, bool), Verdict> {
    if proto == IPPROTO_TCP {
        let tcp: *const TcpHdr = ptr_at(ctx, l4).ok_or(Verdict::Drop(Stat::DropTruncatedL4))?;
        // SAFETY: bounds-checked by ptr_at.
        let tcp = unsafe { &*tcp };
        let syn_only = tcp.syn() != 0 && tcp.ack() == 0;
        Ok((
            u16::from_be_bytes(tcp.source),
            u16::from_be_bytes(tcp.dest),
            syn_only,
            tcp.fin() != 0 || tcp.rst() != 0,
        ))
    } else {
        let udp: *const UdpHdr = ptr_at(ctx, l4).ok_or(Verdict::Drop(Stat::DropTruncatedL4))?;
        // SAFETY: bounds-checked by ptr_at.
        let udp = unsafe { &*udp };
        Ok((
            u16::from_be_bytes(udp.src),
            u16::from_be_bytes(udp.dst),
            true,
            false,
        ))
    }
}
