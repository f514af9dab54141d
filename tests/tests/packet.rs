//! Packet tier: the verifier-loaded XDP program run with BPF_PROG_TEST_RUN,
//! asserting verdicts, exact output bytes and exact counters. Needs root.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use lb_common::{STAT_COUNT, Stat};
use lb_tests::{
    packet::{
        Harness, LB_MAC, arp_request, backend_mac, fix_ipv4_checksum, neighbours, tcp_ack, tcp_syn,
        tcp_syn_with_ip_options, udp, with_ipv6_extensions,
    },
    root::root_or_skip,
};
use lb_userspace::status;

// enum xdp_action in include/uapi/linux/bpf.h.
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const B: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 77, 0, 11),
    Ipv4Addr::new(10, 77, 0, 12),
    Ipv4Addr::new(10, 77, 0, 13),
];
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x100);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2);
const B6: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x12),
    Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x13),
];
/// BPF_PROG_TEST_RUN runs the program as if received on loopback (ifindex 1).
const TEST_RUN_IFINDEX: u32 = 1;

const CONFIG: &str = r#"
interface: lo
maglev: { table_size: 65537, seed: 0x5eed }
max_vips: 4
vips:
  - name: web
    address: 10.77.0.100
    port: 80
    protocol: tcp
    forwarding: l2
    backends:
      - { address: 10.77.0.11, weight: 1 }
      - { address: 10.77.0.12, weight: 1 }
      - { address: 10.77.0.13, weight: 2 }
  - name: dns
    address: 10.77.0.100
    port: 53
    protocol: udp
    forwarding: l2
    backends:
      - { address: 10.77.0.11, weight: 1 }
      - { address: 10.77.0.12, weight: 1 }
  - name: web6
    address: fd00:77::100
    port: 80
    protocol: tcp
    forwarding: l2
    backends:
      - { address: "fd00:77::11", weight: 1 }
      - { address: "fd00:77::12", weight: 1 }
      - { address: "fd00:77::13", weight: 2 }
  - name: dns6
    address: fd00:77::100
    port: 53
    protocol: udp
    forwarding: l2
    backends:
      - { address: "fd00:77::11", weight: 1 }
      - { address: "fd00:77::12", weight: 1 }
"#;

fn harness(test: &str) -> Option<Harness> {
    if !root_or_skip(test) {
        return None;
    }
    let all = B.map(IpAddr::from).into_iter().chain(B6.map(IpAddr::from));
    Some(Harness::new(CONFIG, &neighbours(all, TEST_RUN_IFINDEX)).expect("load and configure"))
}

/// Counter values that must hold exactly: every `Stat` not listed must be 0.
fn assert_stats(h: &Harness, expected: &[(Stat, u64)]) {
    let c = h.counters().unwrap();
    let want: BTreeMap<&str, u64> = expected.iter().map(|&(s, v)| (s.name(), v)).collect();
    let got: BTreeMap<&str, u64> = c.nonzero_stats().into_iter().collect();
    assert_eq!(got, want);
    assert_eq!(c.stats.len(), STAT_COUNT as usize);
}

/// Asserts the program forwarded `input` with XDP_TX to `backend`: new
/// destination and source MACs, every other byte unchanged.
fn assert_forwarded(out: &lb_tests::packet::Outcome, input: &[u8], backend: IpAddr) {
    assert_eq!(out.action, XDP_TX, "verdict");
    assert_eq!(out.packet.len(), input.len());
    let mut expected = input.to_vec();
    expected[..6].copy_from_slice(&backend_mac(backend));
    expected[6..12].copy_from_slice(&LB_MAC);
    assert_eq!(out.packet, expected, "only the MACs change");
}

#[test]
fn tcp_syn_to_a_vip_goes_to_the_backend_the_userspace_table_names() {
    let Some(mut h) = harness("tcp_syn_to_a_vip") else {
        return;
    };
    syns_go_where_the_table_says(&mut h, "web", CLIENT.into());
}

#[test]
fn ipv6_tcp_syn_to_a_vip_goes_to_the_backend_the_userspace_table_names() {
    let Some(mut h) = harness("tcp6_syn_to_a_vip") else {
        return;
    };
    syns_go_where_the_table_says(&mut h, "web6", CLIENT6.into());
}

/// 300 SYNs from `client` to VIP `name`: each goes to the backend the
/// userspace table names, and every counter agrees.
fn syns_go_where_the_table_says(h: &mut Harness, name: &str, client: IpAddr) {
    let web = h
        .config
        .vips
        .iter()
        .find(|v| v.name == name)
        .unwrap()
        .clone();
    let mut per_backend = BTreeMap::new();
    let n = 300u64;
    let mut bytes = 0;
    for sport in 40000..40000 + n as u16 {
        let input = tcp_syn(client, sport, web.address, 80);
        bytes += input.len() as u64;
        let expected = h.expected_backend(&web, client, sport);
        let out = h.run(&input).unwrap();
        assert_forwarded(&out, &input, expected);
        *per_backend.entry(expected).or_insert(0u64) += 1;
    }
    assert_eq!(
        per_backend.len(),
        3,
        "all three backends get flows: {per_backend:?}"
    );
    assert_stats(h, &[(Stat::ActionTx, n), (Stat::FlowMissSyn, n)]);
    let traffic = status::traffic(h.reconciler.applied(), &h.counters().unwrap());
    let web_traffic = traffic.iter().find(|v| v.name == name).unwrap();
    assert_eq!(
        (web_traffic.total.packets, web_traffic.total.bytes),
        (n, bytes)
    );
    for (addr, t) in &web_traffic.backends {
        assert_eq!(
            t.packets, per_backend[addr],
            "backend {addr} packet counter"
        );
        assert_eq!(
            t.new_flows, per_backend[addr],
            "every SYN was a new flow for {addr}"
        );
        assert_eq!(
            t.bytes,
            per_backend[addr] * (bytes / n),
            "backend {addr} byte counter"
        );
    }
}

#[test]
fn udp_to_a_vip_goes_to_the_backend_the_userspace_table_names() {
    let Some(mut h) = harness("udp_to_a_vip") else {
        return;
    };
    let dns = h.config.vips[1].clone();
    let mut seen = std::collections::BTreeSet::new();
    for sport in 1024..1224u16 {
        let input = udp(CLIENT, sport, VIP, 53, b"query");
        let expected = h.expected_backend(&dns, CLIENT, sport);
        assert!(expected == B[0] || expected == B[1]);
        assert_forwarded(&h.run(&input).unwrap(), &input, expected);
        seen.insert(expected);
    }
    assert_eq!(seen.len(), 2);
    assert_stats(&h, &[(Stat::ActionTx, 200), (Stat::FlowMissSyn, 200)]);
}

/// IPv6 UDP goes where the table says, and the rest of an IPv6 TCP
/// connection follows its SYN through the IPv6 flow table.
#[test]
fn ipv6_udp_and_established_tcp_follow_the_table_and_the_flow_table() {
    let Some(mut h) = harness("udp6_and_established") else {
        return;
    };
    let dns6 = h.config.vips[3].clone();
    let web6 = h.config.vips[2].clone();
    assert_eq!((dns6.name.as_str(), web6.name.as_str()), ("dns6", "web6"));
    let mut seen = std::collections::BTreeSet::new();
    for sport in 1024..1124u16 {
        let input = udp(CLIENT6, sport, VIP6, 53, b"query");
        let expected = h.expected_backend(&dns6, CLIENT6, sport);
        assert_forwarded(&h.run(&input).unwrap(), &input, expected);
        seen.insert(expected);
    }
    assert_eq!(seen, B6[..2].iter().map(|&b| IpAddr::from(b)).collect());
    for sport in 50000..50050u16 {
        let syn = tcp_syn(CLIENT6, sport, VIP6, 80);
        let backend = h.expected_backend(&web6, CLIENT6, sport);
        assert_forwarded(&h.run(&syn).unwrap(), &syn, backend);
        let ack = tcp_ack(CLIENT6, sport, VIP6, 80);
        assert_forwarded(&h.run(&ack).unwrap(), &ack, backend);
    }
    assert_stats(
        &h,
        &[
            (Stat::ActionTx, 200),
            (Stat::FlowMissSyn, 150),
            (Stat::FlowHit, 50),
        ],
    );
}

/// An IPv6 extension header: (its type, its bytes).
type Extension = (u8, Vec<u8>);

/// An 8-byte IPv6 extension header of type `kind` (its next-header byte is
/// filled in by `with_ipv6_extensions`), followed by `extra` 8-byte units.
fn ext(kind: u8, bytes: [u8; 7], extra: u8) -> Extension {
    let mut h = vec![0u8; 8 + 8 * extra as usize];
    h[1..8].copy_from_slice(&bytes);
    if kind != 44 {
        h[1] = extra;
    }
    (kind, h)
}

const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DEST_OPTIONS: u8 = 60;
/// PadN option covering the rest of an 8-byte options header.
const PADN: [u8; 7] = [0, 1, 4, 0, 0, 0, 0];

#[test]
fn ipv6_extension_headers_are_walked_up_to_five() {
    let Some(mut h) = harness("ipv6_extensions") else {
        return;
    };
    let web6 = h.config.vips[2].clone();
    let syn = |sport| tcp_syn(CLIENT6, sport, VIP6, 80);
    let routing_done = [0, 4, 0, 0, 0, 0, 0]; // type 4, no segments left
    let atomic_fragment = [0, 0, 0, 0, 0, 0, 1]; // offset 0, M clear
    let walked: [(u16, Vec<Extension>); 5] = [
        (41001, vec![ext(HOP_BY_HOP, PADN, 0)]),
        (41002, vec![ext(DEST_OPTIONS, PADN, 2)]),
        (41003, vec![ext(FRAGMENT, atomic_fragment, 0)]),
        (
            41004,
            vec![
                ext(HOP_BY_HOP, PADN, 0),
                ext(DEST_OPTIONS, PADN, 1),
                ext(ROUTING, routing_done, 0),
                ext(FRAGMENT, atomic_fragment, 0),
            ],
        ),
        // RFC 8200's recommended order at its longest.
        (
            41005,
            vec![
                ext(HOP_BY_HOP, PADN, 0),
                ext(DEST_OPTIONS, PADN, 0),
                ext(ROUTING, routing_done, 0),
                ext(FRAGMENT, atomic_fragment, 0),
                ext(DEST_OPTIONS, PADN, 1),
            ],
        ),
    ];
    for (sport, headers) in &walked {
        let input = with_ipv6_extensions(&syn(*sport), headers);
        let expected = h.expected_backend(&web6, CLIENT6, *sport);
        assert_forwarded(&h.run(&input).unwrap(), &input, expected);
    }
    let six = vec![
        ext(HOP_BY_HOP, PADN, 0),
        ext(DEST_OPTIONS, PADN, 0),
        ext(ROUTING, routing_done, 0),
        ext(FRAGMENT, atomic_fragment, 0),
        ext(DEST_OPTIONS, PADN, 0),
        ext(DEST_OPTIONS, PADN, 0),
    ];
    let mut icmp6 = Vec::new();
    etherparse::PacketBuilder::ethernet2([2; 6], LB_MAC)
        .ipv6(CLIENT6.octets(), VIP6.octets(), 64)
        .icmpv6_echo_request(1, 1)
        .write(&mut icmp6, b"ping")
        .unwrap();
    let passed: [(&str, Vec<u8>, Stat); 6] = [
        (
            "six extension headers",
            with_ipv6_extensions(&syn(42001), &six),
            Stat::PassIpv6ExtHeaders,
        ),
        (
            "a routing header with segments left",
            with_ipv6_extensions(&syn(42002), &[ext(ROUTING, [0, 4, 1, 0, 0, 0, 0], 0)]),
            Stat::PassIpv6ExtHeaders,
        ),
        (
            "a first fragment",
            with_ipv6_extensions(&syn(42003), &[ext(FRAGMENT, [0, 0, 1, 0, 0, 0, 1], 0)]),
            Stat::PassFragment,
        ),
        (
            "a later fragment",
            with_ipv6_extensions(
                &syn(42004),
                &[ext(FRAGMENT, [0, 0x05, 0x08, 0, 0, 0, 1], 0)],
            ),
            Stat::PassFragment,
        ),
        ("ICMPv6", icmp6, Stat::PassNotTcpUdp),
        (
            "ESP after a hop-by-hop header",
            {
                let mut p = with_ipv6_extensions(&syn(42005), &[ext(HOP_BY_HOP, PADN, 0)]);
                p[14 + 40] = 50;
                p
            },
            Stat::PassNotTcpUdp,
        ),
    ];
    for (what, input, _) in &passed {
        let out = h.run(input).unwrap();
        assert_eq!(out.action, XDP_PASS, "{what}");
        assert_eq!(&out.packet, input, "{what} must be untouched");
    }
    assert_stats(
        &h,
        &[
            (Stat::ActionTx, 5),
            (Stat::FlowMissSyn, 5),
            (Stat::ActionPass, 6),
            (Stat::PassIpv6ExtHeaders, 2),
            (Stat::PassFragment, 2),
            (Stat::PassNotTcpUdp, 2),
        ],
    );
}

/// Every prefix of an IPv6 TCP SYN carrying a hop-by-hop header: cut inside
/// the IPv6 header or the extension header's first 8 bytes is
/// `drop_truncated_ip`, later cuts `drop_truncated_l4`; a wrong version is
/// `drop_bad_ip_header`.
#[test]
fn truncated_and_malformed_ipv6_headers_are_dropped_and_counted() {
    let Some(mut h) = harness("truncated_ipv6") else {
        return;
    };
    let syn = with_ipv6_extensions(
        &tcp_syn(CLIENT6, 40000, VIP6, 80),
        &[ext(HOP_BY_HOP, PADN, 1)],
    );
    assert_eq!(syn.len(), 14 + 40 + 16 + 20);
    let mut expected: BTreeMap<Stat, u64> = BTreeMap::new();
    for cut in 14..syn.len() {
        let out = h.run(&syn[..cut]).unwrap();
        assert_eq!(out.action, XDP_DROP, "cut at {cut}");
        assert_eq!(out.packet, &syn[..cut], "a dropped frame is not modified");
        let reason = if cut < 14 + 40 + 8 {
            Stat::DropTruncatedIp
        } else {
            Stat::DropTruncatedL4
        };
        *expected.entry(reason).or_default() += 1;
    }
    let mut version4 = syn.clone();
    version4[14] = 0x40;
    assert_eq!(h.run(&version4).unwrap().action, XDP_DROP);
    assert_eq!(h.run(&syn).unwrap().action, XDP_TX, "the whole packet goes");
    expected.insert(Stat::DropBadIpHeader, 1);
    expected.insert(Stat::ActionDrop, (syn.len() - 14) as u64 + 1);
    expected.insert(Stat::ActionTx, 1);
    expected.insert(Stat::FlowMissSyn, 1);
    let expected: Vec<(Stat, u64)> = expected.into_iter().collect();
    assert_stats(&h, &expected);
}

#[test]
fn the_same_five_tuple_always_picks_the_same_backend() {
    let Some(mut h) = harness("same_five_tuple") else {
        return;
    };
    let input = tcp_syn(Ipv4Addr::new(10, 77, 0, 9), 51515, VIP, 80);
    let first = h.run(&input).unwrap();
    assert_eq!(first.action, XDP_TX);
    for _ in 0..100 {
        assert_eq!(h.run(&input).unwrap(), first);
    }
}

#[test]
fn ip_options_are_skipped_using_the_ihl() {
    let Some(mut h) = harness("ip_options") else {
        return;
    };
    let web = h.config.vips[0].clone();
    for sport in [1111u16, 2222, 3333, 4444] {
        let input = tcp_syn_with_ip_options(CLIENT, sport, VIP, 80);
        assert_eq!(input[14] & 0x0f, 7, "IHL 7");
        assert_forwarded(
            &h.run(&input).unwrap(),
            &input,
            h.expected_backend(&web, CLIENT, sport),
        );
    }
}

#[test]
fn a_backend_behind_another_interface_is_redirected() {
    if !root_or_skip("redirect") {
        return;
    }
    let mut h = Harness::new(CONFIG, &neighbours(B, 4242)).unwrap();
    let input = tcp_syn(CLIENT, 40000, VIP, 80);
    let out = h.run(&input).unwrap();
    assert_eq!(out.action, XDP_REDIRECT);
    assert_eq!(&out.packet[6..12], &LB_MAC);
    assert_stats(&h, &[(Stat::ActionRedirect, 1), (Stat::FlowMissSyn, 1)]);
}

#[test]
fn an_unresolved_backend_is_dropped_never_sent_to_a_zero_mac() {
    if !root_or_skip("unresolved") {
        return;
    }
    // Only the first backend has a MAC.
    let mut h = Harness::new(CONFIG, &neighbours([B[0]], TEST_RUN_IFINDEX)).unwrap();
    let web = h.config.vips[0].clone();
    let (mut tx, mut dropped) = (0, 0);
    for sport in 20000..20100u16 {
        let input = tcp_syn(CLIENT, sport, VIP, 80);
        let out = h.run(&input).unwrap();
        if h.expected_backend(&web, CLIENT, sport) == B[0] {
            assert_forwarded(&out, &input, B[0].into());
            tx += 1;
        } else {
            assert_eq!(out.action, XDP_DROP);
            dropped += 1;
        }
    }
    assert!(tx > 0 && dropped > 0);
    assert_stats(
        &h,
        &[
            (Stat::ActionTx, tx),
            (Stat::ActionDrop, dropped),
            (Stat::DropNoNeighbour, dropped),
            (Stat::FlowMissSyn, 100),
        ],
    );
}

#[test]
fn traffic_that_is_not_for_a_vip_passes_untouched() {
    let Some(mut h) = harness("not_for_a_vip") else {
        return;
    };
    let other_host = Ipv4Addr::new(10, 77, 0, 3);
    let mut icmp = Vec::new();
    etherparse::PacketBuilder::ethernet2([2; 6], LB_MAC)
        .ipv4(CLIENT.octets(), VIP.octets(), 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut icmp, b"ping")
        .unwrap();
    let mut fragment = udp(CLIENT, 5000, VIP, 53, b"first fragment");
    fragment[14 + 6] = 0x20; // more fragments
    fix_ipv4_checksum(&mut fragment);
    let cases: [(&str, Vec<u8>, Stat); 7] = [
        (
            "another address",
            tcp_syn(CLIENT, 40000, other_host, 80),
            Stat::PassNotVip,
        ),
        (
            "VIP, another port",
            tcp_syn(CLIENT, 40000, VIP, 8080),
            Stat::PassNotVip,
        ),
        (
            "VIP port, other protocol",
            udp(CLIENT, 40000, VIP, 80, b"x"),
            Stat::PassNotVip,
        ),
        ("ARP", arp_request(CLIENT, VIP), Stat::PassNotIp),
        (
            "IPv6, another address",
            tcp_syn(
                CLIENT6,
                40000,
                Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 3),
                80,
            ),
            Stat::PassNotVip,
        ),
        ("ICMP", icmp, Stat::PassNotTcpUdp),
        ("fragment", fragment, Stat::PassFragment),
    ];
    for (what, input, _) in &cases {
        let out = h.run(input).unwrap();
        assert_eq!(out.action, XDP_PASS, "{what}");
        assert_eq!(&out.packet, input, "{what} must be untouched");
    }
    assert_stats(
        &h,
        &[
            (Stat::ActionPass, 7),
            (Stat::PassNotVip, 4),
            (Stat::PassNotIp, 1),
            (Stat::PassNotTcpUdp, 1),
            (Stat::PassFragment, 1),
        ],
    );
    let c = h.counters().unwrap();
    assert!(
        c.vips.iter().all(|t| t.packets == 0),
        "no VIP counted passed traffic"
    );
}

/// Every prefix of a TCP SYN and of a UDP datagram. Frames shorter than an
/// Ethernet header cannot reach an XDP program (drivers and veth discard
/// runts, and BPF_PROG_TEST_RUN refuses them, which is asserted here); every
/// longer cut is dropped and counted under the header it ends in.
#[test]
fn truncated_headers_at_every_cut_point_are_dropped_and_counted() {
    let Some(mut h) = harness("truncated_headers") else {
        return;
    };
    let tcp = tcp_syn(CLIENT, 40000, VIP, 80);
    let udp = udp(CLIENT, 40000, VIP, 53, b"");
    assert_eq!((tcp.len(), udp.len()), (54, 42));
    let mut expected: BTreeMap<Stat, u64> = BTreeMap::new();
    for packet in [&tcp, &udp] {
        for cut in 0..14 {
            assert!(
                h.run(&packet[..cut]).is_err(),
                "the kernel refuses a {cut}-byte frame"
            );
        }
        for cut in 14..packet.len() {
            let out = h.run(&packet[..cut]).unwrap();
            assert_eq!(out.action, XDP_DROP, "cut at {cut} of {}", packet.len());
            assert_eq!(
                out.packet,
                &packet[..cut],
                "a dropped frame is not modified"
            );
            let reason = if cut < 34 {
                Stat::DropTruncatedIp
            } else {
                Stat::DropTruncatedL4
            };
            *expected.entry(reason).or_default() += 1;
        }
        assert_eq!(
            h.run(packet).unwrap().action,
            XDP_TX,
            "the whole packet is forwarded"
        );
    }
    expected.insert(Stat::ActionDrop, (54 - 14) + (42 - 14));
    expected.insert(Stat::ActionTx, 2);
    expected.insert(Stat::FlowMissSyn, 2);
    let expected: Vec<(Stat, u64)> = expected.into_iter().collect();
    assert_stats(&h, &expected);
}

#[test]
fn a_malformed_ipv4_header_is_dropped_and_counted() {
    let Some(mut h) = harness("malformed_ipv4") else {
        return;
    };
    let good = tcp_syn(CLIENT, 40000, VIP, 80);
    let mut short_ihl = good.clone();
    short_ihl[14] = 0x44; // IHL 4 < 5
    let mut wrong_version = good.clone();
    wrong_version[14] = 0x65; // version 6 in an IPv4 EtherType
    for p in [&short_ihl, &wrong_version] {
        assert_eq!(h.run(p).unwrap().action, XDP_DROP);
    }
    assert_stats(&h, &[(Stat::ActionDrop, 2), (Stat::DropBadIpHeader, 2)]);
}

/// IPv4 VIPs sit in the VIP map under their IPv4-mapped IPv6 address; an
/// IPv6 packet to that address must not reach them. The decoy VIP shares the
/// mapped address's filter bit, so only the VIP lookup stands in the way.
#[test]
fn an_ipv6_packet_to_an_ipv4_mapped_address_never_reaches_an_ipv4_vip() {
    if !root_or_skip("ipv4_mapped_destination") {
        return;
    }
    let decoy: Ipv6Addr = "0:0:0:ffff::a4d:64".parse().unwrap();
    let mapped = VIP.to_ipv6_mapped();
    assert_eq!(
        lb_common::vip_filter_bit_of(mapped.into()),
        lb_common::vip_filter_bit_of(decoy.into()),
        "the decoy opens the filter for the mapped address"
    );
    let config = format!(
        "interface: lo\nmaglev: {{ table_size: 251 }}\nvips:\n\
         \x20 - {{ name: web, address: {VIP}, port: 80, protocol: tcp, forwarding: l2, \
         backends: [{{ address: {}, weight: 1 }}] }}\n\
         \x20 - {{ name: decoy, address: \"{decoy}\", port: 80, protocol: tcp, forwarding: l2, \
         backends: [{{ address: {}, weight: 1 }}] }}\n",
        B[0], B[1]
    );
    let mut h = Harness::new(&config, &neighbours(B, TEST_RUN_IFINDEX)).unwrap();
    let input = tcp_syn(CLIENT6, 40000, mapped, 80);
    let out = h.run(&input).unwrap();
    assert_eq!((out.action, &out.packet), (XDP_PASS, &input));
    assert_stats(&h, &[(Stat::ActionPass, 1), (Stat::PassNotVip, 1)]);
}
