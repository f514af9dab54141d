//! Packet tier for `forwarding: ipip`: exact outer header bytes, the inner
//! packet unchanged, and the no-neighbour and too-big paths, through
//! BPF_PROG_TEST_RUN. Needs root.

use std::net::{IpAddr, Ipv4Addr};

use etherparse::{IpNumber, Ipv4Header};
use lb_common::{ICMP_BURST, ICMP_NS_PER_TOKEN, Stat};
use lb_tests::{
    addresses::{CLIENT, LB, TCP_PORT, UDP_PORT, VIP, routed_backend_address},
    config_yaml::{ConfigYaml, VipYaml, dns, web},
    fixture::{Case, Expect, check},
    packet::{
        Harness, LB_MAC, ROUTER_MAC, frag_needed, routed_neighbours, tcp_syn,
        tcp_syn_with_ip_options, udp,
    },
    root::root_or_skip,
    xdp::XdpAction,
};
use lb_userspace::model::Neighbours;

/// The source address of the route to the backends: another address of the
/// load balancer's than `LB`, so a test tells which of the two was used.
const ROUTE_SRC: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 33);

/// The three backends behind the router.
fn backends() -> impl Iterator<Item = Ipv4Addr> {
    (0..3).map(routed_backend_address)
}

/// web and dns on the VIP, `forwarding: ipip` to the routed backends, each
/// VIP adjusted by `with`.
fn config(with: impl Fn(VipYaml) -> VipYaml) -> String {
    ConfigYaml::new([web(VIP), dns(VIP)].map(|v| with(v.ipip()).backends(backends()))).to_string()
}

/// `encap_source: LB`.
fn from_lb(v: VipYaml) -> VipYaml {
    v.setting("encap_source", LB)
}

/// Every backend reached through the router, with `mtu`.
fn routed(mtu: u32) -> Neighbours {
    routed_neighbours(backends(), ROUTE_SRC, mtu)
}

/// `input` sent with XDP_TX to `backend` from `src`, as a fixture.
fn encapsulated(name: String, input: Vec<u8>, src: Ipv4Addr, backend: IpAddr, flow: Stat) -> Case {
    let output = Expect::Encapsulated(backend, expected(&input, src, backend));
    Case::new(name, input, XdpAction::Tx, output, &[flow])
}

/// What the program must produce for `input` sent to `backend` from `src`.
fn expected(input: &[u8], src: Ipv4Addr, backend: IpAddr) -> Vec<u8> {
    let IpAddr::V4(backend) = backend else {
        panic!("{backend} is not an IPv4 backend");
    };
    let inner = &input[14..];
    let mut outer = Ipv4Header::new(
        inner.len() as u16,
        64,
        IpNumber::IPV4,
        src.octets(),
        backend.octets(),
    )
    .unwrap();
    outer.dont_fragment = true;
    outer.identification = 0;
    outer.dscp = etherparse::IpDscp::try_new(inner[1] >> 2).unwrap();
    outer.ecn = etherparse::IpEcn::try_new(inner[1] & 3).unwrap();
    outer.header_checksum = outer.calc_header_checksum();
    let mut p = Vec::new();
    p.extend_from_slice(&ROUTER_MAC);
    p.extend_from_slice(&LB_MAC);
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    p.extend_from_slice(&outer.to_bytes());
    p.extend_from_slice(inner);
    p
}

#[test]
fn tcp_and_udp_are_encapsulated_byte_for_byte() {
    let Some(mut h) = Harness::for_test(
        "tcp_and_udp_are_encapsulated_byte_for_byte",
        &config(from_lb),
        &routed(1500),
    ) else {
        return;
    };
    let (web, dns) = (h.config.vips[0].clone(), h.config.vips[1].clone());
    let mut seen = std::collections::BTreeSet::new();
    let mut cases = Vec::new();
    for sport in 40000..40100u16 {
        let backend = h.expected_backend(&web, CLIENT, sport);
        seen.insert(backend);
        cases.push(encapsulated(
            format!("SYN from port {sport}"),
            tcp_syn(CLIENT, sport, VIP, TCP_PORT),
            LB,
            backend,
            Stat::FlowMissSyn,
        ));
        cases.push(encapsulated(
            format!("datagram from port {sport}"),
            udp(CLIENT, sport, VIP, UDP_PORT, b"query"),
            LB,
            h.expected_backend(&dns, CLIENT, sport),
            Stat::FlowMissSyn,
        ));
    }
    check(&mut h, &cases);
    assert_eq!(seen.len(), 3);
    let c = h.counters().unwrap();
    assert_eq!(c.stat(Stat::ActionTx), 200);
}

#[test]
fn the_inner_tos_is_copied_and_the_route_source_is_the_default() {
    let Some(mut h) = Harness::for_test(
        "the_inner_tos_is_copied_and_the_route_source_is_the_default",
        &config(|v| v),
        &routed(1500),
    ) else {
        return;
    };
    let web = h.config.vips[0].clone();
    let mut syn = tcp_syn(CLIENT, 41000, VIP, TCP_PORT);
    syn[15] = 0xb9; // DSCP EF, ECN 01
    let case = encapsulated(
        "SYN with DSCP EF, ECN 01".into(),
        syn,
        ROUTE_SRC,
        h.expected_backend(&web, CLIENT, 41000),
        Stat::FlowMissSyn,
    );
    let Expect::Encapsulated(_, output) = &case.output else {
        unreachable!()
    };
    assert_eq!(output[15], 0xb9, "outer TOS");
    check(&mut h, &[case]);
}

#[test]
fn no_next_hop_or_no_source_is_a_counted_drop_never_a_zero_mac() {
    if !root_or_skip("no_next_hop_or_no_source_is_a_counted_drop_never_a_zero_mac") {
        return;
    }
    let dropped = |name: &str, sport| {
        Case::dropped(
            name,
            tcp_syn(CLIENT, sport, VIP, TCP_PORT),
            &[Stat::FlowMissSyn, Stat::DropNoNeighbour],
        )
    };
    // No neighbour entries at all.
    let mut h = Harness::new(&config(from_lb), &Neighbours::new()).unwrap();
    check(&mut h, &[dropped("no next hop", 42000)]);
    // A next hop, but neither an encap_source nor a route source.
    let mut no_src = routed(1500);
    for n in no_src.values_mut() {
        n.src_addr = None;
    }
    let mut h2 = Harness::new(&config(|v| v), &no_src).unwrap();
    check(&mut h2, &[dropped("no source address", 42001)]);
    for h in [&h, &h2] {
        let c = h.counters().unwrap();
        assert_eq!(
            (c.stat(Stat::DropNoNeighbour), c.stat(Stat::ActionTx)),
            (1, 0)
        );
    }
}

#[test]
fn a_df_packet_too_big_once_encapsulated_is_answered_with_fragmentation_needed() {
    // MTU 100: a SYN (40 bytes of IP, 60 encapsulated) fits; 100 bytes of
    // UDP payload (128 bytes of IP, Don't Fragment set) do not.
    let Some(mut h) = Harness::for_test(
        "a_df_packet_too_big_once_encapsulated_is_answered_with_fragmentation_needed",
        &config(from_lb),
        &routed(100),
    ) else {
        return;
    };
    let web = h.config.vips[0].clone();
    let big = udp(CLIENT, 43001, VIP, UDP_PORT, &[0u8; 100]);
    assert_ne!(big[14 + 6] & 0x40, 0, "Don't Fragment set");
    let cases = [
        encapsulated(
            "a SYN fits".into(),
            tcp_syn(CLIENT, 43000, VIP, TCP_PORT),
            LB,
            h.expected_backend(&web, CLIENT, 43000),
            Stat::FlowMissSyn,
        ),
        Case::new(
            "ICMP 3/4 carrying MTU 100 - 20, sent back to the client",
            big.clone(),
            XdpAction::Tx,
            Expect::Bytes(frag_needed(&big, 80)),
            &[Stat::FlowMissSyn, Stat::IcmpTooBig],
        ),
    ];
    check(&mut h, &cases);
    let c = h.counters().unwrap();
    assert_eq!(
        (
            c.stat(Stat::IcmpTooBig),
            c.stat(Stat::ActionTx),
            c.stat(Stat::DropTooBig)
        ),
        (1, 2, 0)
    );
}

#[test]
fn too_big_packets_icmp_may_not_answer_are_a_counted_drop() {
    if !root_or_skip("too_big_packets_icmp_may_not_answer_are_a_counted_drop") {
        return;
    }
    let big = |src: Ipv4Addr| udp(src, 44000, VIP, UDP_PORT, &[0u8; 100]);
    let mut no_df = big(CLIENT);
    no_df[14 + 6] &= !0x40;
    let mut group_mac = big(CLIENT);
    group_mac[0] |= 1;
    // 48 bytes of IP (8 of options), 68 encapsulated: too big for MTU 60.
    let options = tcp_syn_with_ip_options(CLIENT, 44001, VIP, TCP_PORT);
    assert_ne!(options[14 + 6] & 0x40, 0, "Don't Fragment set");
    let off = config(|v| from_lb(v).setting("icmp_too_big", false));
    let on = config(from_lb);
    let cases = [
        ("no Don't Fragment", &on, 100, no_df),
        ("icmp_too_big: false", &off, 100, big(CLIENT)),
        ("IP options", &on, 60, options),
        ("from 127/8", &on, 100, big(Ipv4Addr::new(127, 0, 0, 9))),
        ("from 0/8", &on, 100, big(Ipv4Addr::new(0, 1, 2, 3))),
        ("from multicast", &on, 100, big(Ipv4Addr::new(224, 0, 0, 9))),
        ("from broadcast", &on, 100, big(Ipv4Addr::BROADCAST)),
        ("to a group MAC", &on, 100, group_mac),
    ];
    for (what, text, mtu, packet) in cases {
        let mut h = Harness::new(text, &routed(mtu)).unwrap();
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
fn a_total_length_that_is_not_the_packets_is_a_counted_drop() {
    let Some(mut h) = Harness::for_test(
        "a_total_length_that_is_not_the_packets_is_a_counted_drop",
        &config(from_lb),
        &routed(100),
    ) else {
        return;
    };
    // 33 bytes of IP claiming 2000 (would be "too big"), or less than a
    // header. The first places the flow, the second finds it.
    for (claimed, flow, reason) in [
        (2000u16, Stat::FlowMissSyn, Stat::DropTruncatedIp),
        (19, Stat::FlowHit, Stat::DropBadIpHeader),
    ] {
        let mut packet = udp(CLIENT, 45000, VIP, UDP_PORT, b"hello");
        packet[14 + 2..14 + 4].copy_from_slice(&claimed.to_be_bytes());
        let name = format!("total length {claimed}");
        check(&mut h, &[Case::dropped(name, packet, &[flow, reason])]);
        let c = h.counters().unwrap();
        assert_eq!(c.stat(reason), 1, "{claimed}: {}", reason.name());
    }
    let c = h.counters().unwrap();
    assert_eq!((c.stat(Stat::IcmpTooBig), c.stat(Stat::DropTooBig)), (0, 0));
}

#[test]
fn icmp_answers_are_rate_limited_per_cpu() {
    let Some(mut h) = Harness::for_test(
        "icmp_answers_are_rate_limited_per_cpu",
        &config(from_lb),
        &routed(100),
    ) else {
        return;
    };
    // Far more too-big packets than the bucket holds, faster than it refills
    // (each test run takes microseconds; a token takes a millisecond).
    let sent = 3 * ICMP_BURST;
    let started = std::time::Instant::now();
    for i in 0..sent {
        let out = h
            .run(&udp(CLIENT, 46000, VIP, UDP_PORT, &[0u8; 100]))
            .unwrap();
        assert!(
            out.action == XdpAction::Tx || out.action == XdpAction::Drop,
            "packet {i}"
        );
    }
    let elapsed = started.elapsed();
    let refilled = elapsed.as_nanos() as u64 / ICMP_NS_PER_TOKEN;
    let c = h.counters().unwrap();
    let (answered, limited) = (c.stat(Stat::IcmpTooBig), c.stat(Stat::DropIcmpRateLimited));
    println!("answered {answered}, limited {limited} in {elapsed:?}");
    assert_eq!(answered + limited, sent, "every packet counted once");
    // Test runs may move between CPUs: each has its own bucket.
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    assert!(answered >= ICMP_BURST, "a full burst first: {answered}");
    assert!(
        answered <= cpus * ICMP_BURST + refilled,
        "no more than the buckets held and earned: {answered}"
    );
    assert_eq!(c.stat(Stat::DropTooBig), 0);
}
