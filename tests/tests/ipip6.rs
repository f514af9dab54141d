//! Packet tier for `forwarding: ipip` to IPv6 backends: IP6IP6 for an IPv6
//! VIP, IPv4-in-IPv6 for an IPv4 one. Exact outer header bytes (the flow
//! label is the flow hash), the inner packet unchanged, the no-neighbour
//! path and ICMPv6 "packet too big", through BPF_PROG_TEST_RUN. Needs root.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{IpNumber, Ipv6FlowLabel, Ipv6Header};
use lb_common::Stat;
use lb_tests::{
    packet::{
        Harness, LB_MAC, ROUTER_MAC, fix_ipv4_checksum, flow_hash, frag_needed, packet_too_big,
        routed_neighbours, tcp_ack, tcp_syn, udp, with_ipv6_extensions,
    },
    root::root_or_skip,
};
use lb_userspace::model::Neighbours;

const XDP_DROP: u32 = 1;
const XDP_TX: u32 = 3;
const SEED: u32 = 0x5eed;
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x100);
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const ROUTE_SRC: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x33);
const ENCAP_SRC: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 3);
const BACKENDS: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x12),
    Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x13),
];

/// web6 (TCP) and dns6 (UDP) on the IPv6 VIP, web4 (TCP) on the IPv4 VIP,
/// all to the same IPv6 backends; `extra` goes into each VIP.
fn config(extra: &str) -> String {
    let backends: String = BACKENDS
        .iter()
        .map(|b| format!("      - {{ address: \"{b}\", weight: 1 }}\n"))
        .collect();
    let vip = |name: &str, address: &str, port: u16, protocol: &str| {
        format!(
            "  - name: {name}\n    address: \"{address}\"\n    port: {port}\n    protocol: {protocol}\n    \
             forwarding: ipip\n{extra}    backends:\n{backends}"
        )
    };
    format!(
        "interface: lo\nmaglev: {{ table_size: 65537, seed: {SEED:#x} }}\nvips:\n{}{}{}",
        vip("web6", &VIP6.to_string(), 80, "tcp"),
        vip("dns6", &VIP6.to_string(), 53, "udp"),
        vip("web4", &VIP4.to_string(), 80, "tcp"),
    )
}

/// Every backend reached through the router, with `mtu`.
fn routed(mtu: u32) -> Neighbours {
    routed_neighbours(BACKENDS, ROUTE_SRC, mtu)
}

fn harness(test: &str, extra: &str, neighbours: &Neighbours) -> Option<Harness> {
    if !root_or_skip(test) {
        return None;
    }
    Some(Harness::new(&config(extra), neighbours).expect("load"))
}

/// What the program must produce for `input` (a packet from `client` to
/// `vip`) sent to `backend` from `src`: an outer IPv6 header whose traffic
/// class is the inner one, whose flow label is the flow hash, then the
/// inner packet unchanged.
fn expected(input: &[u8], src: Ipv6Addr, backend: IpAddr, label: u32) -> Vec<u8> {
    let IpAddr::V6(backend) = backend else {
        panic!("{backend} is not an IPv6 backend");
    };
    let inner = &input[14..];
    let (class, next) = match inner[0] >> 4 {
        4 => (inner[1], IpNumber::IPV4),
        6 => (inner[0] << 4 | inner[1] >> 4, IpNumber::IPV6),
        v => panic!("IP version {v}"),
    };
    let outer = Ipv6Header {
        traffic_class: class,
        flow_label: Ipv6FlowLabel::try_new(label).unwrap(),
        payload_length: inner.len() as u16,
        next_header: next,
        hop_limit: 64,
        source: src.octets(),
        destination: backend.octets(),
    };
    let mut p = Vec::new();
    p.extend_from_slice(&ROUTER_MAC);
    p.extend_from_slice(&LB_MAC);
    p.extend_from_slice(&0x86ddu16.to_be_bytes());
    p.extend_from_slice(&outer.to_bytes());
    p.extend_from_slice(inner);
    p
}

/// The flow label the program must write: the low 20 bits of the flow hash.
fn label(client: IpAddr, vip: IpAddr, sport: u16, dport: u16, proto: u8) -> u32 {
    flow_hash(client, vip, sport, dport, proto, SEED) & 0xf_ffff
}

#[test]
fn ip6ip6_and_ipv4_in_ipv6_are_encapsulated_byte_for_byte() {
    let Some(mut h) = harness(
        "ip6ip6_and_ipv4_in_ipv6_are_encapsulated_byte_for_byte",
        &format!("    encap_source: \"{ENCAP_SRC}\"\n"),
        &routed(1500),
    ) else {
        return;
    };
    let vips = h.config.vips.clone();
    let (web6, dns6, web4) = (&vips[0], &vips[1], &vips[2]);
    let mut seen = std::collections::BTreeSet::new();
    let mut labels = std::collections::BTreeSet::new();
    for sport in 40000..40100u16 {
        let cases = [
            (
                tcp_syn(CLIENT6, sport, VIP6, 80),
                web6,
                IpAddr::from(CLIENT6),
                6,
            ),
            (
                udp(CLIENT6, sport, VIP6, 53, b"query"),
                dns6,
                CLIENT6.into(),
                17,
            ),
            (tcp_syn(CLIENT4, sport, VIP4, 80), web4, CLIENT4.into(), 6),
        ];
        for (input, vip, client, proto) in cases {
            let backend = h.expected_backend(vip, client, sport);
            let label = label(client, vip.address, sport, vip.port, proto);
            let out = h.run(&input).unwrap();
            assert_eq!(out.action, XDP_TX);
            assert_eq!(
                out.packet,
                expected(&input, ENCAP_SRC, backend, label),
                "{} from port {sport}",
                vip.name
            );
            seen.insert((vip.name.clone(), backend));
            labels.insert(label);
        }
    }
    assert_eq!(seen.len(), 9, "each VIP used each backend: {seen:?}");
    assert!(
        labels.len() > 290,
        "labels differ per flow: {}",
        labels.len()
    );
    let c = h.counters().unwrap();
    assert_eq!(
        (c.stat(Stat::ActionTx), c.stat(Stat::FlowMissSyn)),
        (300, 300)
    );
}

#[test]
fn the_inner_class_is_copied_the_route_source_is_the_default_and_flows_keep_their_label() {
    let Some(mut h) = harness(
        "the_inner_class_is_copied_the_route_source_is_the_default_and_flows_keep_their_label",
        "",
        &routed(1500),
    ) else {
        return;
    };
    let vips = h.config.vips.clone();
    let (web6, web4) = (&vips[0], &vips[2]);
    // Traffic class 0xb9 (DSCP EF, ECN 01) in an IPv6 packet: it straddles
    // the first two bytes.
    let mut syn6 = tcp_syn(CLIENT6, 41000, VIP6, 80);
    syn6[14] = 0x6b;
    syn6[15] = 0x90 | (syn6[15] & 0x0f);
    let mut syn4 = tcp_syn(CLIENT4, 41000, VIP4, 80);
    syn4[15] = 0xb9;
    for (syn, ack, vip, client) in [
        (
            syn6,
            tcp_ack(CLIENT6, 41000, VIP6, 80),
            web6,
            IpAddr::from(CLIENT6),
        ),
        (
            syn4,
            tcp_ack(CLIENT4, 41000, VIP4, 80),
            web4,
            CLIENT4.into(),
        ),
    ] {
        let backend = h.expected_backend(vip, client, 41000);
        let label = label(client, vip.address, 41000, 80, 6);
        let out = h.run(&syn).unwrap();
        assert_eq!(out.packet, expected(&syn, ROUTE_SRC, backend, label));
        assert_eq!(
            (out.packet[14], out.packet[15] & 0xf0),
            (0x6b, 0x90),
            "outer traffic class 0xb9"
        );
        // The established flow (a flow-table hit) keeps backend and label.
        let out = h.run(&ack).unwrap();
        assert_eq!(out.packet, expected(&ack, ROUTE_SRC, backend, label));
    }
    let c = h.counters().unwrap();
    assert_eq!((c.stat(Stat::FlowMissSyn), c.stat(Stat::FlowHit)), (2, 2));
}

#[test]
fn no_next_hop_or_no_source_is_a_counted_drop_never_a_zero_mac() {
    if !root_or_skip("ipv6_no_next_hop_or_no_source_is_a_counted_drop") {
        return;
    }
    let mut no_src = routed(1500);
    for n in no_src.values_mut() {
        n.src_addr = None;
    }
    for (what, neighbours) in [("no neighbour", Neighbours::new()), ("no source", no_src)] {
        let mut h = Harness::new(&config(""), &neighbours).unwrap();
        for input in [
            tcp_syn(CLIENT6, 42000, VIP6, 80),
            tcp_syn(CLIENT4, 42000, VIP4, 80),
        ] {
            let out = h.run(&input).unwrap();
            assert_eq!((out.action, &out.packet), (XDP_DROP, &input), "{what}");
        }
        let c = h.counters().unwrap();
        assert_eq!(
            (c.stat(Stat::DropNoNeighbour), c.stat(Stat::ActionTx)),
            (2, 0),
            "{what}"
        );
    }
}

#[test]
fn a_packet_too_big_once_encapsulated_is_answered_with_icmpv6_packet_too_big() {
    // MTU 100: a SYN (60 bytes of IPv6, 100 encapsulated) fits; 100 bytes
    // of UDP payload (148 bytes of IPv6) do not.
    let Some(mut h) = harness(
        "a_packet_too_big_once_encapsulated_is_answered_with_icmpv6_packet_too_big",
        "",
        &routed(100),
    ) else {
        return;
    };
    let syn = tcp_syn(CLIENT6, 43000, VIP6, 80);
    assert_eq!(h.run(&syn).unwrap().action, XDP_TX);
    let big = udp(CLIENT6, 43001, VIP6, 53, &[0u8; 100]);
    let out = h.run(&big).unwrap();
    assert_eq!(out.action, XDP_TX, "sent back to the client");
    assert_eq!(out.packet, packet_too_big(&big, 60), "MTU 100 - 40");
    // An IPv4 client of the IPv4 VIP gets ICMP "fragmentation needed" with
    // the room the IPv6 outer header leaves.
    let mut big4 = tcp_syn(CLIENT4, 43002, VIP4, 80);
    big4.extend_from_slice(&[0u8; 60]);
    big4[14 + 2..14 + 4].copy_from_slice(&100u16.to_be_bytes());
    fix_ipv4_checksum(&mut big4);
    let out = h.run(&big4).unwrap();
    assert_eq!(out.action, XDP_TX);
    assert_eq!(out.packet, frag_needed(&big4, 60), "MTU 100 - 40");
    let c = h.counters().unwrap();
    assert_eq!(
        (
            c.stat(Stat::IcmpPacketTooBig),
            c.stat(Stat::IcmpTooBig),
            c.stat(Stat::ActionTx),
            c.stat(Stat::DropTooBig)
        ),
        (1, 1, 3, 0)
    );
}

#[test]
fn too_big_ipv6_packets_icmpv6_may_not_answer_are_a_counted_drop() {
    if !root_or_skip("too_big_ipv6_packets_icmpv6_may_not_answer_are_a_counted_drop") {
        return;
    }
    let big = |src: Ipv6Addr| udp(src, 44000, VIP6, 53, &[0u8; 100]);
    let mut group_mac = big(CLIENT6);
    group_mac[0] |= 1;
    // A hop-by-hop header (PadN) in front of the UDP header.
    let mut hop_by_hop = vec![0u8; 8];
    hop_by_hop[2..4].copy_from_slice(&[1, 4]);
    let extension = with_ipv6_extensions(&big(CLIENT6), &[(0, hop_by_hop)]);
    let cases = [
        (
            "icmp_too_big: false",
            "    icmp_too_big: false\n",
            big(CLIENT6),
        ),
        ("an extension header", "", extension),
        ("from multicast", "", big("ff02::1".parse().unwrap())),
        (
            "from the unspecified address",
            "",
            big(Ipv6Addr::UNSPECIFIED),
        ),
        ("from loopback", "", big(Ipv6Addr::LOCALHOST)),
        ("to a group MAC", "", group_mac),
    ];
    for (what, extra, packet) in cases {
        let mut h = Harness::new(&config(extra), &routed(100)).unwrap();
        h.assert_too_big_dropped(&packet, Stat::IcmpPacketTooBig, what);
    }
}

#[test]
fn an_ipv6_payload_length_that_is_not_the_packets_is_a_counted_drop() {
    let Some(mut h) = harness(
        "an_ipv6_payload_length_that_is_not_the_packets_is_a_counted_drop",
        "",
        &routed(100),
    ) else {
        return;
    };
    // 13 bytes of UDP claiming 2000 (would be "too big").
    let mut packet = udp(CLIENT6, 45000, VIP6, 53, b"hello");
    packet[14 + 4..14 + 6].copy_from_slice(&2000u16.to_be_bytes());
    let out = h.run(&packet).unwrap();
    assert_eq!((out.action, &out.packet), (XDP_DROP, &packet));
    let c = h.counters().unwrap();
    assert_eq!(
        (
            c.stat(Stat::DropTruncatedIp),
            c.stat(Stat::IcmpPacketTooBig),
            c.stat(Stat::DropTooBig)
        ),
        (1, 0, 0)
    );
}
