//! Packet tier for `lb decap`'s program: exact output bytes and counters
//! through BPF_PROG_TEST_RUN. Needs root.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    Ebpf,
    maps::{HashMap, PerCpuArray},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use etherparse::{IpNumber, PacketBuilder};
use lb_common::{
    addr_key,
    decap::{DECAP_PROGRAM, DecapStat, DecapStats, map_names},
};
use lb_tests::root::root_or_skip;
use lb_userspace::loader::DECAP_OBJECT;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const HOST: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
const LB: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
const MACS: ([u8; 6], [u8; 6]) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
const HOST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x88, 0, 0, 0, 0, 0, 2);
const LB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x88, 0, 0, 0, 0, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x100);
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];

/// The decap program with `HOST` and `HOST6` as its local addresses.
fn program(test: &str) -> Option<Ebpf> {
    if !root_or_skip(test) {
        return None;
    }
    let mut ebpf = Ebpf::load(DECAP_OBJECT).unwrap();
    let prog: &mut Xdp = ebpf.program_mut(DECAP_PROGRAM).unwrap().try_into().unwrap();
    prog.load().unwrap();
    let mut addrs: HashMap<_, [u8; 16], u8> =
        HashMap::try_from(ebpf.map_mut(map_names::DECAP_ADDRS).unwrap()).unwrap();
    for a in [IpAddr::V4(HOST), IpAddr::V6(HOST6)] {
        addrs.insert(addr_key(a), 1, 0).unwrap();
    }
    Some(ebpf)
}

fn run(ebpf: &mut Ebpf, packet: &[u8]) -> (u32, Vec<u8>) {
    let prog: &mut Xdp = ebpf.program_mut(DECAP_PROGRAM).unwrap().try_into().unwrap();
    let mut out = vec![0u8; packet.len() + 64];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .unwrap();
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

fn counters(ebpf: &Ebpf) -> [u64; 3] {
    let stats: PerCpuArray<_, DecapStats> =
        PerCpuArray::try_from(ebpf.map(map_names::DECAP_STATS).unwrap()).unwrap();
    let per_cpu = stats.get(&0, 0).unwrap();
    DecapStat::ALL.map(|s| per_cpu.iter().map(|b| b[s as usize]).sum())
}

/// The inner packet: a UDP datagram from the client to the VIP.
fn inner() -> Vec<u8> {
    let mut p = Vec::new();
    PacketBuilder::ipv4(CLIENT.octets(), VIP.octets(), 63)
        .udp(40000, 5353)
        .write(&mut p, b"hello")
        .unwrap();
    p
}

/// The IPv6 inner packet: a UDP datagram from the client to the VIP.
fn inner6() -> Vec<u8> {
    let mut p = Vec::new();
    PacketBuilder::ipv6(CLIENT6.octets(), VIP6.octets(), 63)
        .udp(40000, 5353)
        .write(&mut p, b"hello")
        .unwrap();
    p
}

/// `inner` (IPv4 or IPv6, as `next` says) in an IPv6 packet from the load
/// balancer to `to`: IPv4-in-IPv6 or IP6IP6.
fn in_ipv6(to: Ipv6Addr, next: IpNumber, inner: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    PacketBuilder::ethernet2(MACS.0, MACS.1)
        .ipv6(LB6.octets(), to.octets(), 64)
        .write(&mut p, next, inner)
        .unwrap();
    p
}

/// `inner` in an IPIP packet from the load balancer to `to`.
fn ipip(to: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    PacketBuilder::ethernet2(MACS.0, MACS.1)
        .ipv4(LB.octets(), to.octets(), 64)
        .write(&mut p, IpNumber::IPV4, inner)
        .unwrap();
    p
}

#[test]
fn an_ipip_packet_for_this_host_loses_exactly_its_outer_header() {
    let Some(mut ebpf) = program("an_ipip_packet_for_this_host_loses_exactly_its_outer_header")
    else {
        return;
    };
    let inner = inner();
    let packet = ipip(HOST, &inner);
    assert_eq!(packet[14 + 9], 4, "outer protocol IPIP");
    let (action, out) = run(&mut ebpf, &packet);
    assert_eq!(action, XDP_PASS);
    assert_eq!(
        out,
        [&packet[..14], &inner[..]].concat(),
        "same Ethernet header, then the inner packet byte for byte"
    );
    assert_eq!(counters(&ebpf), [1, 0, 0]);
}

#[test]
fn ip6ip6_and_ipv4_in_ipv6_packets_for_this_host_lose_exactly_their_outer_header() {
    let Some(mut ebpf) =
        program("ip6ip6_and_ipv4_in_ipv6_packets_for_this_host_lose_exactly_their_outer_header")
    else {
        return;
    };
    for (next, inner, ether_type) in [
        (IpNumber::IPV6, inner6(), ETHERTYPE_IPV6),
        (IpNumber::IPV4, inner(), ETHERTYPE_IPV4),
    ] {
        let packet = in_ipv6(HOST6, next, &inner);
        assert_eq!(packet[12..14], ETHERTYPE_IPV6, "outer IPv6");
        let (action, out) = run(&mut ebpf, &packet);
        assert_eq!(action, XDP_PASS);
        assert_eq!(
            out,
            [&packet[..12], &ether_type[..], &inner[..]].concat(),
            "same MACs, the inner packet's EtherType, then the inner packet byte for byte"
        );
    }
    assert_eq!(counters(&ebpf), [2, 0, 0]);
}

#[test]
fn everything_else_passes_untouched() {
    let Some(mut ebpf) = program("everything_else_passes_untouched") else {
        return;
    };
    let mut with_options = ipip(HOST, &inner());
    with_options[14] = 0x46; // IHL 6: not opened, the kernel decides
    let mut fragment = ipip(HOST, &inner());
    fragment[14 + 6] = 0x20; // more fragments
    let mut plain = Vec::new();
    PacketBuilder::ethernet2(MACS.0, MACS.1)
        .ipv4(LB.octets(), HOST.octets(), 64)
        .udp(1, 2)
        .write(&mut plain, b"x")
        .unwrap();
    // A hop-by-hop options header in front of the tunnel: not opened.
    let mut extension = in_ipv6(HOST6, IpNumber::IPV6, &inner6());
    extension[14 + 6] = 0;
    let cases = [
        ipip(Ipv4Addr::new(10, 88, 0, 9), &inner()),
        with_options,
        fragment,
        plain,
        in_ipv6(
            Ipv6Addr::new(0xfd00, 0x88, 0, 0, 0, 0, 0, 9),
            IpNumber::IPV6,
            &inner6(),
        ),
        // The IPv4-mapped key of HOST is not an IPv6 address of this host.
        in_ipv6(HOST.to_ipv6_mapped(), IpNumber::IPV4, &inner()),
        extension,
    ];
    for packet in &cases {
        let (action, out) = run(&mut ebpf, packet);
        assert_eq!((action, &out), (XDP_PASS, packet));
    }
    assert_eq!(counters(&ebpf), [0, cases.len() as u64, 0]);
}

#[test]
fn a_tunnel_for_this_host_without_the_announced_inner_header_is_dropped() {
    let Some(mut ebpf) =
        program("a_tunnel_for_this_host_without_the_announced_inner_header_is_dropped")
    else {
        return;
    };
    let short = ipip(HOST, &inner()[..10]);
    let mut not_v4 = inner();
    not_v4[0] = 0x65;
    let cases = [
        short,
        ipip(HOST, &not_v4),
        // The outer header announces one family, the inner is the other.
        in_ipv6(HOST6, IpNumber::IPV6, &inner()),
        in_ipv6(HOST6, IpNumber::IPV4, &inner6()),
        in_ipv6(HOST6, IpNumber::IPV6, &[]),
        in_ipv6(HOST6, IpNumber::IPV6, &inner6()[..30]),
    ];
    for packet in &cases {
        assert_eq!(run(&mut ebpf, packet).0, XDP_DROP);
    }
    assert_eq!(counters(&ebpf), [0, 0, cases.len() as u64]);
}
