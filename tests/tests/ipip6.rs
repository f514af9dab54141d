//! Packet tier for `forwarding: ipip` to IPv6 backends: IP6IP6 for an IPv6
//! VIP, IPv4-in-IPv6 for an IPv4 one. Exact outer header bytes (the flow
//! label is the flow hash), the inner packet unchanged, the no-neighbour
//! path and ICMPv6 "packet too big", through BPF_PROG_TEST_RUN. Needs root.

use std::net::{IpAddr, Ipv6Addr};

use etherparse::{IpNumber, Ipv6FlowLabel, Ipv6Header};
use lb_common::Stat;
use lb_tests::{
    addresses::{CLIENT, CLIENT6, LB6, TCP_PORT, UDP_PORT, VIP, VIP6, routed_backend_address6},
    config_yaml::{ConfigYaml, SEED, VipYaml, dns, web},
    fixture::{Case, Expect, check},
    packet::{
        Harness, LB_MAC, ROUTER_MAC, fix_ipv4_checksum, flow_hash, frag_needed, packet_too_big,
        routed_neighbours, tcp_ack, tcp_syn, udp, with_ipv6_extensions,
    },
    root::root_or_skip,
    xdp::XdpAction,
};
use lb_userspace::{config::Vip, model::Neighbours};

/// The source address of the route to the backends: another address of the
/// load balancer's than `LB6`, so a test tells which of the two was used.
const ROUTE_SRC: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x33);

/// The three IPv6 backends behind the router.
fn backends() -> impl Iterator<Item = Ipv6Addr> {
    (0..3).map(routed_backend_address6)
}

/// web6 (TCP) and dns6 (UDP) on the IPv6 VIP, web4 (TCP) on the IPv4 VIP,
/// all `forwarding: ipip` to the same IPv6 backends, each VIP adjusted by
/// `with`.
fn config(with: impl Fn(VipYaml) -> VipYaml) -> String {
    ConfigYaml::new(
        [web(VIP6), dns(VIP6), web(VIP).named("web4")].map(|v| with(v.ipip()).backends(backends())),
    )
    .to_string()
}

/// Every backend reached through the router, with `mtu`.
fn routed(mtu: u32) -> Neighbours {
    routed_neighbours(backends(), ROUTE_SRC, mtu)
}

/// `input` from `client` to `vip` and `sport`, sent with XDP_TX from `src`
/// to the backend the table names, as a fixture.
fn encapsulated(
    h: &Harness,
    name: String,
    input: Vec<u8>,
    (vip, client, sport): (&Vip, IpAddr, u16),
    src: Ipv6Addr,
    flow: Stat,
) -> Case {
    let backend = h.expected_backend(vip, client, sport);
    let label = label(client, vip.address, sport, vip.port, vip.protocol.number());
    let output = Expect::Encapsulated(backend, expected(&input, src, backend, label));
    Case::new(name, input, XdpAction::Tx, output, &[flow])
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
    let Some(mut h) = Harness::for_test(
        "ip6ip6_and_ipv4_in_ipv6_are_encapsulated_byte_for_byte",
        &config(|v| v.setting("encap_source", LB6)),
        &routed(1500),
    ) else {
        return;
    };
    let vips = h.config.vips.clone();
    let (web6, dns6, web4) = (&vips[0], &vips[1], &vips[2]);
    let mut seen = std::collections::BTreeSet::new();
    let mut labels = std::collections::BTreeSet::new();
    let mut cases = Vec::new();
    for sport in 40000..40100u16 {
        let inputs = [
            (
                tcp_syn(CLIENT6, sport, VIP6, TCP_PORT),
                web6,
                IpAddr::from(CLIENT6),
                6,
            ),
            (
                udp(CLIENT6, sport, VIP6, UDP_PORT, b"query"),
                dns6,
                CLIENT6.into(),
                17,
            ),
            (
                tcp_syn(CLIENT, sport, VIP, TCP_PORT),
                web4,
                CLIENT.into(),
                6,
            ),
        ];
        for (input, vip, client, proto) in inputs {
            seen.insert((vip.name.clone(), h.expected_backend(vip, client, sport)));
            labels.insert(label(client, vip.address, sport, vip.port, proto));
            cases.push(encapsulated(
                &h,
                format!("{} from port {sport}", vip.name),
                input,
                (vip, client, sport),
                LB6,
                Stat::FlowMissSyn,
            ));
        }
    }
    check(&mut h, &cases);
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
    let Some(mut h) = Harness::for_test(
        "the_inner_class_is_copied_the_route_source_is_the_default_and_flows_keep_their_label",
        &config(|v| v),
        &routed(1500),
    ) else {
        return;
    };
    let vips = h.config.vips.clone();
    let (web6, web4) = (&vips[0], &vips[2]);
    // Traffic class 0xb9 (DSCP EF, ECN 01) in an IPv6 packet: it straddles
    // the first two bytes.
    let mut syn6 = tcp_syn(CLIENT6, 41000, VIP6, TCP_PORT);
    syn6[14] = 0x6b;
    syn6[15] = 0x90 | (syn6[15] & 0x0f);
    let mut syn4 = tcp_syn(CLIENT, 41000, VIP, TCP_PORT);
    syn4[15] = 0xb9;
    for (syn, ack, vip, client) in [
        (
            syn6,
            tcp_ack(CLIENT6, 41000, VIP6, TCP_PORT),
            web6,
            IpAddr::from(CLIENT6),
        ),
        (
            syn4,
            tcp_ack(CLIENT, 41000, VIP, TCP_PORT),
            web4,
            CLIENT.into(),
        ),
    ] {
        let flow = (vip, client, 41000);
        let syn = encapsulated(&h, "SYN".into(), syn, flow, ROUTE_SRC, Stat::FlowMissSyn);
        let Expect::Encapsulated(_, output) = &syn.output else {
            unreachable!()
        };
        assert_eq!(
            (output[14], output[15] & 0xf0),
            (0x6b, 0x90),
            "outer traffic class 0xb9"
        );
        // The established flow (a flow-table hit) keeps backend and label.
        let ack = encapsulated(&h, "ACK".into(), ack, flow, ROUTE_SRC, Stat::FlowHit);
        check(&mut h, &[syn, ack]);
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
        let mut h = Harness::new(&config(|v| v), &neighbours).unwrap();
        let dropped = |family, input| {
            Case::dropped(
                format!("{what}, {family}"),
                input,
                &[Stat::FlowMissSyn, Stat::DropNoNeighbour],
            )
        };
        let cases = [
            dropped("IPv6", tcp_syn(CLIENT6, 42000, VIP6, TCP_PORT)),
            dropped("IPv4", tcp_syn(CLIENT, 42000, VIP, TCP_PORT)),
        ];
        check(&mut h, &cases);
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
    let Some(mut h) = Harness::for_test(
        "a_packet_too_big_once_encapsulated_is_answered_with_icmpv6_packet_too_big",
        &config(|v| v),
        &routed(100),
    ) else {
        return;
    };
    let web6 = h.config.vips[0].clone();
    let big = udp(CLIENT6, 43001, VIP6, UDP_PORT, &[0u8; 100]);
    // An IPv4 client of the IPv4 VIP gets ICMP "fragmentation needed" with
    // the room the IPv6 outer header leaves.
    let mut big4 = tcp_syn(CLIENT, 43002, VIP, TCP_PORT);
    big4.extend_from_slice(&[0u8; 60]);
    big4[14 + 2..14 + 4].copy_from_slice(&100u16.to_be_bytes());
    fix_ipv4_checksum(&mut big4);
    let cases = [
        encapsulated(
            &h,
            "a SYN fits".into(),
            tcp_syn(CLIENT6, 43000, VIP6, TCP_PORT),
            (&web6, CLIENT6.into(), 43000),
            ROUTE_SRC,
            Stat::FlowMissSyn,
        ),
        Case::new(
            "ICMPv6 packet too big carrying MTU 100 - 40, sent back to the client",
            big.clone(),
            XdpAction::Tx,
            Expect::Bytes(packet_too_big(&big, 60)),
            &[Stat::FlowMissSyn, Stat::IcmpPacketTooBig],
        ),
        Case::new(
            "ICMP fragmentation needed carrying MTU 100 - 40",
            big4.clone(),
            XdpAction::Tx,
            Expect::Bytes(frag_needed(&big4, 60)),
            &[Stat::FlowMissSyn, Stat::IcmpTooBig],
        ),
    ];
    check(&mut h, &cases);
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
    let big = |src: Ipv6Addr| udp(src, 44000, VIP6, UDP_PORT, &[0u8; 100]);
    let mut group_mac = big(CLIENT6);
    group_mac[0] |= 1;
    // A hop-by-hop header (PadN) in front of the UDP header.
    let mut hop_by_hop = vec![0u8; 8];
    hop_by_hop[2..4].copy_from_slice(&[1, 4]);
    let extension = with_ipv6_extensions(&big(CLIENT6), &[(0, hop_by_hop)]);
    let on = config(|v| v);
    let cases = [
        (
            "icmp_too_big: false",
            config(|v| v.setting("icmp_too_big", false)),
            big(CLIENT6),
        ),
        ("an extension header", on.clone(), extension),
        (
            "from multicast",
            on.clone(),
            big("ff02::1".parse().unwrap()),
        ),
        (
            "from the unspecified address",
            on.clone(),
            big(Ipv6Addr::UNSPECIFIED),
        ),
        ("from loopback", on.clone(), big(Ipv6Addr::LOCALHOST)),
        ("to a group MAC", on, group_mac),
    ];
    for (what, text, packet) in cases {
        let mut h = Harness::new(&text, &routed(100)).unwrap();
        check(
            &mut h,
            &[Case::dropped(
                what,
                packet,
                &[Stat::FlowMissSyn, Stat::DropTooBig],
            )],
        );
    }
}

#[test]
fn an_ipv6_payload_length_that_is_not_the_packets_is_a_counted_drop() {
    let Some(mut h) = Harness::for_test(
        "an_ipv6_payload_length_that_is_not_the_packets_is_a_counted_drop",
        &config(|v| v),
        &routed(100),
    ) else {
        return;
    };
    // 13 bytes of UDP claiming 2000 (would be "too big").
    let mut packet = udp(CLIENT6, 45000, VIP6, UDP_PORT, b"hello");
    packet[14 + 4..14 + 6].copy_from_slice(&2000u16.to_be_bytes());
    check(
        &mut h,
        &[Case::dropped(
            "payload length 2000",
            packet,
            &[Stat::FlowMissSyn, Stat::DropTruncatedIp],
        )],
    );
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
