//! Packet tier: the verifier-loaded XDP program run with BPF_PROG_TEST_RUN,
//! asserting verdicts, exact output bytes and exact counters. Needs root.

use std::{collections::BTreeMap, net::Ipv4Addr};

use lb_common::{STAT_COUNT, Stat};
use lb_tests::{
    packet::{
        Harness, LB_MAC, arp_request, backend_mac, neighbours, tcp_syn, tcp_syn_with_ip_options,
        tcp6_syn, udp,
    },
    root::root_or_skip,
};

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
"#;

fn harness(test: &str) -> Option<Harness> {
    if !root_or_skip(test) {
        return None;
    }
    Some(Harness::new(CONFIG, &neighbours(B, TEST_RUN_IFINDEX)).expect("load and configure"))
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
fn assert_forwarded(out: &lb_tests::packet::Outcome, input: &[u8], backend: Ipv4Addr) {
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
    let web = h.config.vips[0].clone();
    let mut per_backend = BTreeMap::new();
    let n = 300u64;
    let mut bytes = 0;
    for sport in 40000..40000 + n as u16 {
        let input = tcp_syn(CLIENT, sport, VIP, 80);
        bytes += input.len() as u64;
        let expected = h.expected_backend(&web, CLIENT, sport);
        let out = h.run(&input).unwrap();
        assert_forwarded(&out, &input, expected);
        *per_backend.entry(expected).or_insert(0u64) += 1;
    }
    assert_eq!(
        per_backend.len(),
        3,
        "all three backends get flows: {per_backend:?}"
    );
    assert_stats(&h, &[(Stat::ActionTx, n), (Stat::FlowMissSyn, n)]);
    let traffic = h.reconciler.traffic(&h.counters().unwrap());
    let web_traffic = traffic.iter().find(|v| v.name == "web").unwrap();
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
            assert_forwarded(&out, &input, B[0]);
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
        ("ARP", arp_request(CLIENT, VIP), Stat::PassNotIpv4),
        ("IPv6", tcp6_syn(40000, 80), Stat::PassNotIpv4),
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
            (Stat::PassNotVip, 3),
            (Stat::PassNotIpv4, 2),
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

fn fix_ipv4_checksum(p: &mut [u8]) {
    p[24] = 0;
    p[25] = 0;
    let mut sum: u32 = p[14..34]
        .chunks(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}
