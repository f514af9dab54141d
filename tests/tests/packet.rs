//! Packet tier: the verifier-loaded XDP program run with BPF_PROG_TEST_RUN,
//! asserting verdicts, exact output bytes and exact counters. Needs root.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
};

use lb_common::{STAT_COUNT, Stat};
use lb_tests::{
    addresses::{
        CLIENT, CLIENT6, LB, LB6, TCP_PORT, UDP_PORT, VIP, VIP6, backend_address, backend_address6,
    },
    config_yaml::{ConfigYaml, dns, web},
    fixture::{Case, Expect, check},
    packet::{
        Harness, LB_MAC, TEST_RUN_IFINDEX, arp_request, fix_ipv4_checksum, neighbours, tcp_ack,
        tcp_syn, tcp_syn_with_ip_options, udp, with_ipv6_extensions,
    },
    root::root_or_skip,
    xdp::XdpAction,
};
use lb_userspace::status;

/// The three IPv4 backends.
fn b(i: usize) -> IpAddr {
    backend_address(i).into()
}

/// The three IPv6 backends.
fn b6(i: usize) -> IpAddr {
    backend_address6(i).into()
}

/// web and dns on the IPv4 VIP, web6 and dns6 on the IPv6 one; the third
/// web backend weighs twice the others.
fn config() -> String {
    ConfigYaml::new([
        web(VIP).backends([b(0), b(1)]).backend(b(2), 2, None),
        dns(VIP).backends([b(0), b(1)]),
        web(VIP6).backends([b6(0), b6(1)]).backend(b6(2), 2, None),
        dns(VIP6).backends([b6(0), b6(1)]),
    ])
    .max_vips(4)
    .to_string()
}

fn harness(test: &str) -> Option<Harness> {
    let all = (0..3).map(b).chain((0..3).map(b6));
    Harness::for_test(test, &config(), &neighbours(all, TEST_RUN_IFINDEX))
}

/// Counter values that must hold exactly: every `Stat` not listed must be 0.
fn assert_stats(h: &Harness, expected: &[(Stat, u64)]) {
    let c = h.counters().unwrap();
    let want: BTreeMap<&str, u64> = expected.iter().map(|&(s, v)| (s.name(), v)).collect();
    let got: BTreeMap<&str, u64> = c.nonzero_stats().into_iter().collect();
    assert_eq!(got, want);
    assert_eq!(c.stats.len(), STAT_COUNT as usize);
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
    let mut cases = Vec::new();
    for sport in 40000..40000 + n as u16 {
        let input = tcp_syn(client, sport, web.address, TCP_PORT);
        bytes += input.len() as u64;
        let expected = h.expected_backend(&web, client, sport);
        *per_backend.entry(expected).or_insert(0u64) += 1;
        cases.push(Case::to_backend(
            format!("SYN from port {sport}"),
            input,
            expected,
            &[Stat::FlowMissSyn],
        ));
    }
    check(h, &cases);
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
    let mut cases = Vec::new();
    for sport in 1024..1224u16 {
        let input = udp(CLIENT, sport, VIP, UDP_PORT, b"query");
        let expected = h.expected_backend(&dns, CLIENT, sport);
        assert!(expected == b(0) || expected == b(1));
        seen.insert(expected);
        cases.push(Case::to_backend(
            format!("datagram from port {sport}"),
            input,
            expected,
            &[Stat::FlowMissSyn],
        ));
    }
    check(&mut h, &cases);
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
    let mut cases = Vec::new();
    for sport in 1024..1124u16 {
        let input = udp(CLIENT6, sport, VIP6, UDP_PORT, b"query");
        let expected = h.expected_backend(&dns6, CLIENT6, sport);
        seen.insert(expected);
        cases.push(Case::to_backend(
            format!("datagram from port {sport}"),
            input,
            expected,
            &[Stat::FlowMissSyn],
        ));
    }
    assert_eq!(seen, [b6(0), b6(1)].into());
    for sport in 50000..50050u16 {
        let backend = h.expected_backend(&web6, CLIENT6, sport);
        cases.push(Case::to_backend(
            format!("SYN from port {sport}"),
            tcp_syn(CLIENT6, sport, VIP6, TCP_PORT),
            backend,
            &[Stat::FlowMissSyn],
        ));
        cases.push(Case::to_backend(
            format!("ACK from port {sport}"),
            tcp_ack(CLIENT6, sport, VIP6, TCP_PORT),
            backend,
            &[Stat::FlowHit],
        ));
    }
    check(&mut h, &cases);
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
    let syn = |sport| tcp_syn(CLIENT6, sport, VIP6, TCP_PORT);
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
    let walked: Vec<Case> = walked
        .iter()
        .map(|(sport, headers)| {
            Case::to_backend(
                format!("{} extension headers, port {sport}", headers.len()),
                with_ipv6_extensions(&syn(*sport), headers),
                h.expected_backend(&web6, CLIENT6, *sport),
                &[Stat::FlowMissSyn],
            )
        })
        .collect();
    check(&mut h, &walked);
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
    let passed: Vec<Case> = passed
        .into_iter()
        .map(|(what, input, reason)| Case::passed(what, input, &[reason]))
        .collect();
    check(&mut h, &passed);
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
    let web6 = h.config.vips[2].clone();
    let syn = with_ipv6_extensions(
        &tcp_syn(CLIENT6, 40000, VIP6, TCP_PORT),
        &[ext(HOP_BY_HOP, PADN, 1)],
    );
    assert_eq!(syn.len(), 14 + 40 + 16 + 20);
    let mut expected: BTreeMap<Stat, u64> = BTreeMap::new();
    let mut cases = Vec::new();
    for cut in 14..syn.len() {
        let reason = if cut < 14 + 40 + 8 {
            Stat::DropTruncatedIp
        } else {
            Stat::DropTruncatedL4
        };
        *expected.entry(reason).or_default() += 1;
        cases.push(Case::dropped(
            format!("cut at {cut}"),
            syn[..cut].to_vec(),
            &[reason],
        ));
    }
    let mut version4 = syn.clone();
    version4[14] = 0x40;
    cases.push(Case::dropped(
        "version 4 in an IPv6 EtherType",
        version4,
        &[Stat::DropBadIpHeader],
    ));
    cases.push(Case::to_backend(
        "the whole packet",
        syn.clone(),
        h.expected_backend(&web6, CLIENT6, 40000),
        &[Stat::FlowMissSyn],
    ));
    check(&mut h, &cases);
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
    let input = tcp_syn(CLIENT, 51515, VIP, TCP_PORT);
    let first = h.run(&input).unwrap();
    assert_eq!(first.action, XdpAction::Tx);
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
    let cases: Vec<Case> = [1111u16, 2222, 3333, 4444]
        .into_iter()
        .map(|sport| {
            let input = tcp_syn_with_ip_options(CLIENT, sport, VIP, TCP_PORT);
            assert_eq!(input[14] & 0x0f, 7, "IHL 7");
            Case::to_backend(
                format!("SYN with options from port {sport}"),
                input,
                h.expected_backend(&web, CLIENT, sport),
                &[Stat::FlowMissSyn],
            )
        })
        .collect();
    check(&mut h, &cases);
}

#[test]
fn a_backend_behind_another_interface_is_redirected() {
    if !root_or_skip("redirect") {
        return;
    }
    let mut h = Harness::new(&config(), &neighbours((0..3).map(b), 4242)).unwrap();
    let web = h.config.vips[0].clone();
    let input = tcp_syn(CLIENT, 40000, VIP, TCP_PORT);
    // Redirected with the same rewrite as XDP_TX: the backend's MAC and
    // the load balancer's.
    let case = Case::new(
        "SYN to a backend behind interface 4242",
        input,
        XdpAction::Redirect,
        Expect::Backend(h.expected_backend(&web, CLIENT, 40000)),
        &[Stat::FlowMissSyn],
    );
    check(&mut h, &[case]);
    assert_stats(&h, &[(Stat::ActionRedirect, 1), (Stat::FlowMissSyn, 1)]);
}

#[test]
fn an_unresolved_backend_is_dropped_never_sent_to_a_zero_mac() {
    if !root_or_skip("unresolved") {
        return;
    }
    // Only the first backend has a MAC.
    let mut h = Harness::new(&config(), &neighbours([b(0)], TEST_RUN_IFINDEX)).unwrap();
    let web = h.config.vips[0].clone();
    let (mut tx, mut dropped) = (0, 0);
    let mut cases = Vec::new();
    for sport in 20000..20100u16 {
        let input = tcp_syn(CLIENT, sport, VIP, TCP_PORT);
        let backend = h.expected_backend(&web, CLIENT, sport);
        cases.push(if backend == b(0) {
            tx += 1;
            Case::to_backend(
                format!("SYN from port {sport}, to {backend}"),
                input,
                backend,
                &[Stat::FlowMissSyn],
            )
        } else {
            dropped += 1;
            Case::dropped(
                format!("SYN from port {sport}, to {backend} without a MAC"),
                input,
                &[Stat::FlowMissSyn, Stat::DropNoNeighbour],
            )
        });
    }
    check(&mut h, &cases);
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
    let mut icmp = Vec::new();
    etherparse::PacketBuilder::ethernet2([2; 6], LB_MAC)
        .ipv4(CLIENT.octets(), VIP.octets(), 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut icmp, b"ping")
        .unwrap();
    let mut fragment = udp(CLIENT, 5000, VIP, UDP_PORT, b"first fragment");
    fragment[14 + 6] = 0x20; // more fragments
    fix_ipv4_checksum(&mut fragment);
    let cases = [
        Case::passed(
            "another address",
            tcp_syn(CLIENT, 40000, LB, TCP_PORT),
            &[Stat::PassNotVip],
        ),
        Case::passed(
            "VIP, another port",
            tcp_syn(CLIENT, 40000, VIP, 8080),
            &[Stat::PassNotVip],
        ),
        Case::passed(
            "VIP port, other protocol",
            udp(CLIENT, 40000, VIP, TCP_PORT, b"x"),
            &[Stat::PassNotVip],
        ),
        Case::passed("ARP", arp_request(CLIENT, VIP), &[Stat::PassNotIp]),
        Case::passed(
            "IPv6, another address",
            tcp_syn(CLIENT6, 40000, LB6, TCP_PORT),
            &[Stat::PassNotVip],
        ),
        Case::passed("ICMP", icmp, &[Stat::PassNotTcpUdp]),
        Case::passed("fragment", fragment, &[Stat::PassFragment]),
    ];
    check(&mut h, &cases);
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
    let (web, dns) = (h.config.vips[0].clone(), h.config.vips[1].clone());
    let tcp = tcp_syn(CLIENT, 40000, VIP, TCP_PORT);
    let udp = udp(CLIENT, 40000, VIP, UDP_PORT, b"");
    assert_eq!((tcp.len(), udp.len()), (54, 42));
    let mut expected: BTreeMap<Stat, u64> = BTreeMap::new();
    for (packet, vip) in [(&tcp, &web), (&udp, &dns)] {
        for cut in 0..14 {
            assert!(
                h.run(&packet[..cut]).is_err(),
                "the kernel refuses a {cut}-byte frame"
            );
        }
        let mut cases = Vec::new();
        for cut in 14..packet.len() {
            let reason = if cut < 34 {
                Stat::DropTruncatedIp
            } else {
                Stat::DropTruncatedL4
            };
            *expected.entry(reason).or_default() += 1;
            cases.push(Case::dropped(
                format!("{} cut at {cut} of {}", vip.name, packet.len()),
                packet[..cut].to_vec(),
                &[reason],
            ));
        }
        cases.push(Case::to_backend(
            format!("the whole {} packet is forwarded", vip.name),
            packet.clone(),
            h.expected_backend(vip, CLIENT, 40000),
            &[Stat::FlowMissSyn],
        ));
        check(&mut h, &cases);
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
    let good = tcp_syn(CLIENT, 40000, VIP, TCP_PORT);
    let mut short_ihl = good.clone();
    short_ihl[14] = 0x44; // IHL 4 < 5
    let mut wrong_version = good.clone();
    wrong_version[14] = 0x65; // version 6 in an IPv4 EtherType
    check(
        &mut h,
        &[
            Case::dropped("IHL 4", short_ihl, &[Stat::DropBadIpHeader]),
            Case::dropped(
                "version 6 in an IPv4 EtherType",
                wrong_version,
                &[Stat::DropBadIpHeader],
            ),
        ],
    );
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
    let config = ConfigYaml::new([
        web(VIP).backends([b(0)]),
        web(decoy).named("decoy").backends([b(1)]),
    ])
    .table_size(251)
    .to_string();
    let mut h = Harness::new(&config, &neighbours((0..3).map(b), TEST_RUN_IFINDEX)).unwrap();
    check(
        &mut h,
        &[Case::passed(
            "IPv6 to the IPv4-mapped VIP address",
            tcp_syn(CLIENT6, 40000, mapped, TCP_PORT),
            &[Stat::PassNotVip],
        )],
    );
    assert_stats(&h, &[(Stat::ActionPass, 1), (Stat::PassNotVip, 1)]);
}
