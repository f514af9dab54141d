//! Packet tier for `lb decap`'s program: exact output bytes and counters
//! through BPF_PROG_TEST_RUN. Needs root.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{IpNumber, PacketBuilder};
use lb_common::decap::DecapStat;
use lb_tests::{
    addresses::{
        CLIENT, CLIENT6, LB, LB6, UDP_PORT, VIP, VIP6, routed_backend_address,
        routed_backend_address6,
    },
    decap::Decap,
    fixture::{Case, Expect, check},
    packet::{ROUTER_MAC, backend_mac},
    root::root_or_skip,
    xdp::XdpAction,
};

const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];

/// The backend the program runs on.
fn host() -> Ipv4Addr {
    routed_backend_address(0)
}

fn host6() -> Ipv6Addr {
    routed_backend_address6(0)
}

/// The decap program with `host()` and `host6()` as its local addresses.
fn program(test: &str) -> Option<Decap> {
    if !root_or_skip(test) {
        return None;
    }
    Some(Decap::new([IpAddr::V4(host()), IpAddr::V6(host6())]).expect("load"))
}

/// The inner packet: a UDP datagram from the client to the VIP.
fn inner() -> Vec<u8> {
    let mut p = Vec::new();
    PacketBuilder::ipv4(CLIENT.octets(), VIP.octets(), 63)
        .udp(40000, UDP_PORT)
        .write(&mut p, b"hello")
        .unwrap();
    p
}

/// The IPv6 inner packet: a UDP datagram from the client to the VIP.
fn inner6() -> Vec<u8> {
    let mut p = Vec::new();
    PacketBuilder::ipv6(CLIENT6.octets(), VIP6.octets(), 63)
        .udp(40000, UDP_PORT)
        .write(&mut p, b"hello")
        .unwrap();
    p
}

/// `inner` (IPv4 or IPv6, as `next` says) in an IPv6 packet from the load
/// balancer to `to`, through the router: IPv4-in-IPv6 or IP6IP6.
fn in_ipv6(to: Ipv6Addr, next: IpNumber, inner: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    PacketBuilder::ethernet2(ROUTER_MAC, backend_mac(to))
        .ipv6(LB6.octets(), to.octets(), 64)
        .write(&mut p, next, inner)
        .unwrap();
    p
}

/// `inner` in an IPIP packet from the load balancer to `to`, through the
/// router.
fn ipip(to: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    PacketBuilder::ethernet2(ROUTER_MAC, backend_mac(to))
        .ipv4(LB.octets(), to.octets(), 64)
        .write(&mut p, IpNumber::IPV4, inner)
        .unwrap();
    p
}

/// `packet` passed to the kernel as `ether_type` and `inner`: its MACs kept,
/// its outer header gone.
fn decapsulated(name: &str, packet: Vec<u8>, ether_type: [u8; 2], inner: &[u8]) -> Case<DecapStat> {
    let output = Expect::Bytes([&packet[..12], &ether_type[..], inner].concat());
    Case::new(
        name,
        packet,
        XdpAction::Pass,
        output,
        &[DecapStat::Decapsulated],
    )
}

#[test]
fn an_ipip_packet_for_this_host_loses_exactly_its_outer_header() {
    let Some(mut decap) = program("an_ipip_packet_for_this_host_loses_exactly_its_outer_header")
    else {
        return;
    };
    let inner = inner();
    let packet = ipip(host(), &inner);
    assert_eq!(packet[14 + 9], 4, "outer protocol IPIP");
    assert_eq!(packet[12..14], ETHERTYPE_IPV4);
    // Same Ethernet header, then the inner packet byte for byte.
    check(
        &mut decap,
        &[decapsulated("IPIP", packet, ETHERTYPE_IPV4, &inner)],
    );
    assert_eq!(decap.counters().unwrap(), [1, 0, 0]);
}

#[test]
fn ip6ip6_and_ipv4_in_ipv6_packets_for_this_host_lose_exactly_their_outer_header() {
    let Some(mut decap) =
        program("ip6ip6_and_ipv4_in_ipv6_packets_for_this_host_lose_exactly_their_outer_header")
    else {
        return;
    };
    let cases = [
        ("IP6IP6", IpNumber::IPV6, inner6(), ETHERTYPE_IPV6),
        ("IPv4 in IPv6", IpNumber::IPV4, inner(), ETHERTYPE_IPV4),
    ]
    .map(|(name, next, inner, ether_type)| {
        let packet = in_ipv6(host6(), next, &inner);
        assert_eq!(packet[12..14], ETHERTYPE_IPV6, "outer IPv6");
        // Same MACs, the inner packet's EtherType, then the inner packet
        // byte for byte.
        decapsulated(name, packet, ether_type, &inner)
    });
    check(&mut decap, &cases);
    assert_eq!(decap.counters().unwrap(), [2, 0, 0]);
}

#[test]
fn everything_else_passes_untouched() {
    let Some(mut decap) = program("everything_else_passes_untouched") else {
        return;
    };
    let mut with_options = ipip(host(), &inner());
    with_options[14] = 0x46; // IHL 6: not opened, the kernel decides
    let mut fragment = ipip(host(), &inner());
    fragment[14 + 6] = 0x20; // more fragments
    let mut plain = Vec::new();
    PacketBuilder::ethernet2(ROUTER_MAC, backend_mac(host()))
        .ipv4(LB.octets(), host().octets(), 64)
        .udp(1, 2)
        .write(&mut plain, b"x")
        .unwrap();
    // A hop-by-hop options header in front of the tunnel: not opened.
    let mut extension = in_ipv6(host6(), IpNumber::IPV6, &inner6());
    extension[14 + 6] = 0;
    let passed = |name, packet| Case::passed(name, packet, &[DecapStat::Passed]);
    let cases = [
        passed(
            "IPIP to another host",
            ipip(routed_backend_address(1), &inner()),
        ),
        passed("IPIP with IP options", with_options),
        passed("an IPIP fragment", fragment),
        passed("UDP", plain),
        passed(
            "IP6IP6 to another host",
            in_ipv6(routed_backend_address6(1), IpNumber::IPV6, &inner6()),
        ),
        // The IPv4-mapped key of the host is not an IPv6 address of it.
        passed(
            "IPv4 in IPv6 to the host's IPv4-mapped address",
            in_ipv6(host().to_ipv6_mapped(), IpNumber::IPV4, &inner()),
        ),
        passed("a hop-by-hop header before IP6IP6", extension),
    ];
    check(&mut decap, &cases);
    assert_eq!(decap.counters().unwrap(), [0, cases.len() as u64, 0]);
}

#[test]
fn a_tunnel_for_this_host_without_the_announced_inner_header_is_dropped() {
    let Some(mut decap) =
        program("a_tunnel_for_this_host_without_the_announced_inner_header_is_dropped")
    else {
        return;
    };
    let short = ipip(host(), &inner()[..10]);
    let mut not_v4 = inner();
    not_v4[0] = 0x65;
    let dropped = |name, packet| Case::dropped(name, packet, &[DecapStat::Malformed]);
    let cases = [
        dropped("IPIP with 10 bytes of inner header", short),
        dropped("IPIP with an IPv6 version", ipip(host(), &not_v4)),
        // The outer header announces one family, the inner is the other.
        dropped(
            "IP6IP6 carrying IPv4",
            in_ipv6(host6(), IpNumber::IPV6, &inner()),
        ),
        dropped(
            "IPv4 in IPv6 carrying IPv6",
            in_ipv6(host6(), IpNumber::IPV4, &inner6()),
        ),
        dropped(
            "IP6IP6 with nothing inside",
            in_ipv6(host6(), IpNumber::IPV6, &[]),
        ),
        dropped(
            "IP6IP6 with 30 bytes of inner header",
            in_ipv6(host6(), IpNumber::IPV6, &inner6()[..30]),
        ),
    ];
    check(&mut decap, &cases);
    assert_eq!(decap.counters().unwrap(), [0, 0, cases.len() as u64]);
}
