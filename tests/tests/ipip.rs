//! Packet tier for `forwarding: ipip`: exact outer header bytes, the inner
//! packet unchanged, and the no-neighbour and too-big paths, through
//! BPF_PROG_TEST_RUN. Needs root.

use std::net::{IpAddr, Ipv4Addr};

use etherparse::{IpNumber, Ipv4Header};
use lb_common::{ICMP_BURST, ICMP_NS_PER_TOKEN, Stat};
use lb_tests::{
    packet::{
        Harness, LB_MAC, ROUTER_MAC, frag_needed, routed_neighbours, tcp_syn,
        tcp_syn_with_ip_options, udp,
    },
    root::root_or_skip,
};
use lb_userspace::model::Neighbours;

const XDP_DROP: u32 = 1;
const XDP_TX: u32 = 3;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const LB: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
const ROUTE_SRC: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 33);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 99, 0, 11),
    Ipv4Addr::new(10, 99, 0, 12),
    Ipv4Addr::new(10, 99, 0, 13),
];

fn config(encap_source: Option<Ipv4Addr>) -> String {
    let backends: String = BACKENDS
        .iter()
        .map(|b| format!("      - {{ address: {b}, weight: 1 }}\n"))
        .collect();
    let source = encap_source.map_or(String::new(), |s| format!("    encap_source: {s}\n"));
    format!(
        "interface: lo\nmaglev: {{ table_size: 65537, seed: 0x5eed }}\nvips:\n\
         \x20 - name: web\n    address: {VIP}\n    port: 80\n    protocol: tcp\n    forwarding: ipip\n{source}    backends:\n{backends}\
         \x20 - name: dns\n    address: {VIP}\n    port: 53\n    protocol: udp\n    forwarding: ipip\n{source}    backends:\n{backends}"
    )
}

/// Every backend reached through the router, with `mtu`.
fn routed(mtu: u32) -> Neighbours {
    routed_neighbours(BACKENDS, ROUTE_SRC, mtu)
}

fn harness(test: &str, encap_source: Option<Ipv4Addr>, neighbours: &Neighbours) -> Option<Harness> {
    if !root_or_skip(test) {
        return None;
    }
    Some(Harness::new(&config(encap_source), neighbours).expect("load"))
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
    let Some(mut h) = harness(
        "tcp_and_udp_are_encapsulated_byte_for_byte",
        Some(LB),
        &routed(1500),
    ) else {
        return;
    };
    let (web, dns) = (h.config.vips[0].clone(), h.config.vips[1].clone());
    let mut seen = std::collections::BTreeSet::new();
    for sport in 40000..40100u16 {
        let syn = tcp_syn(CLIENT, sport, VIP, 80);
        let out = h.run(&syn).unwrap();
        let backend = h.expected_backend(&web, CLIENT, sport);
        assert_eq!(out.action, XDP_TX);
        assert_eq!(
            out.packet,
            expected(&syn, LB, backend),
            "SYN from port {sport}"
        );
        seen.insert(backend);
        let dgram = udp(CLIENT, sport, VIP, 53, b"query");
        let out = h.run(&dgram).unwrap();
        assert_eq!(
            out.packet,
            expected(&dgram, LB, h.expected_backend(&dns, CLIENT, sport))
        );
    }
    assert_eq!(seen.len(), 3);
    let c = h.counters().unwrap();
    assert_eq!(c.stat(Stat::ActionTx), 200);
}

#[test]
fn the_inner_tos_is_copied_and_the_route_source_is_the_default() {
    let Some(mut h) = harness(
        "the_inner_tos_is_copied_and_the_route_source_is_the_default",
        None,
        &routed(1500),
    ) else {
        return;
    };
    let web = h.config.vips[0].clone();
    let mut syn = tcp_syn(CLIENT, 41000, VIP, 80);
    syn[15] = 0xb9; // DSCP EF, ECN 01
    let out = h.run(&syn).unwrap();
    assert_eq!(
        out.packet,
        expected(&syn, ROUTE_SRC, h.expected_backend(&web, CLIENT, 41000))
    );
    assert_eq!(out.packet[15], 0xb9, "outer TOS");
}

#[test]
fn no_next_hop_or_no_source_is_a_counted_drop_never_a_zero_mac() {
    if !root_or_skip("no_next_hop_or_no_source_is_a_counted_drop_never_a_zero_mac") {
        return;
    }
    // No neighbour entries at all.
    let mut h = Harness::new(&config(Some(LB)), &Neighbours::new()).unwrap();
    assert_eq!(
        h.run(&tcp_syn(CLIENT, 42000, VIP, 80)).unwrap().action,
        XDP_DROP
    );
    // A next hop, but neither an encap_source nor a route source.
    let mut no_src = routed(1500);
    for n in no_src.values_mut() {
        n.src_addr = None;
    }
    let mut h2 = Harness::new(&config(None), &no_src).unwrap();
    assert_eq!(
        h2.run(&tcp_syn(CLIENT, 42001, VIP, 80)).unwrap().action,
        XDP_DROP
    );
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
    let Some(mut h) = harness(
        "a_df_packet_too_big_once_encapsulated_is_answered_with_fragmentation_needed",
        Some(LB),
        &routed(100),
    ) else {
        return;
    };
    assert_eq!(
        h.run(&tcp_syn(CLIENT, 43000, VIP, 80)).unwrap().action,
        XDP_TX
    );
    let big = udp(CLIENT, 43001, VIP, 53, &[0u8; 100]);
    assert_ne!(big[14 + 6] & 0x40, 0, "Don't Fragment set");
    let out = h.run(&big).unwrap();
    assert_eq!(out.action, XDP_TX, "sent back to the client");
    assert_eq!(
        out.packet,
        frag_needed(&big, 80),
        "ICMP 3/4 carrying MTU 100 - 20"
    );
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
    let big = |src: Ipv4Addr| udp(src, 44000, VIP, 53, &[0u8; 100]);
    let mut no_df = big(CLIENT);
    no_df[14 + 6] &= !0x40;
    let mut group_mac = big(CLIENT);
    group_mac[0] |= 1;
    // 48 bytes of IP (8 of options), 68 encapsulated: too big for MTU 60.
    let options = tcp_syn_with_ip_options(CLIENT, 44001, VIP, 80);
    assert_ne!(options[14 + 6] & 0x40, 0, "Don't Fragment set");
    let off = config(Some(LB)).replace(
        "    encap_source:",
        "    icmp_too_big: false\n    encap_source:",
    );
    let on = config(Some(LB));
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
        h.assert_too_big_dropped(&packet, Stat::IcmpTooBig, what);
    }
}

#[test]
fn a_total_length_that_is_not_the_packets_is_a_counted_drop() {
    let Some(mut h) = harness(
        "a_total_length_that_is_not_the_packets_is_a_counted_drop",
        Some(LB),
        &routed(100),
    ) else {
        return;
    };
    // 33 bytes of IP claiming 2000 (would be "too big"), or less than a header.
    for (claimed, reason) in [
        (2000u16, Stat::DropTruncatedIp),
        (19, Stat::DropBadIpHeader),
    ] {
        let mut packet = udp(CLIENT, 45000, VIP, 53, b"hello");
        packet[14 + 2..14 + 4].copy_from_slice(&claimed.to_be_bytes());
        let out = h.run(&packet).unwrap();
        assert_eq!((out.action, &out.packet), (XDP_DROP, &packet), "{claimed}");
        let c = h.counters().unwrap();
        assert_eq!(c.stat(reason), 1, "{claimed}: {}", reason.name());
    }
    let c = h.counters().unwrap();
    assert_eq!((c.stat(Stat::IcmpTooBig), c.stat(Stat::DropTooBig)), (0, 0));
}

#[test]
fn icmp_answers_are_rate_limited_per_cpu() {
    let Some(mut h) = harness(
        "icmp_answers_are_rate_limited_per_cpu",
        Some(LB),
        &routed(100),
    ) else {
        return;
    };
    // Far more too-big packets than the bucket holds, faster than it refills
    // (each test run takes microseconds; a token takes a millisecond).
    let sent = 3 * ICMP_BURST;
    let started = std::time::Instant::now();
    for i in 0..sent {
        let out = h.run(&udp(CLIENT, 46000, VIP, 53, &[0u8; 100])).unwrap();
        assert!(out.action == XDP_TX || out.action == XDP_DROP, "packet {i}");
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
