//! The per-packet cases: what each sends, to which program, and how it may
//! be measured.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::instance::IPIP_PORT;
use crate::{
    addresses::{CLIENT, CLIENT6, LB, VIP, VIP6},
    packet::{tcp_ack, tcp_syn, udp},
};

/// The program a case runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Instance {
    /// The trivial MAC-swap XDP_TX program: every ratio is to this one.
    Ceiling,
    /// The trivial XDP_PASS program.
    Pass,
    /// The load balancer, its flow table holding only what the cases add.
    Lb,
    /// Another load balancer whose flow table was filled with
    /// `Settings::many_flows` single-packet flows (SYNs) first.
    LbFullTable,
    /// Another one filled with as many established flows (SYN and ACK).
    LbEstablishedTable,
}

/// What a case sends.
pub(super) enum Packets {
    /// The same packet on every call.
    Same(Vec<u8>),
    /// A fresh flow on every call of every round: `make(n)` for n = `next`,
    /// `next + 1`, ...
    NewFlows { make: fn(u64) -> Vec<u8>, next: u64 },
}

impl Packets {
    /// The packet of this round's `i`-th call.
    pub(super) fn nth(&self, i: u32) -> Vec<u8> {
        match self {
            Packets::Same(p) => p.clone(),
            Packets::NewFlows { make, next } => make(next + u64::from(i)),
        }
    }

    /// Moves past the `calls` packets of a round, so no flow comes twice.
    pub(super) fn advance(&mut self, calls: u32) {
        if let Packets::NewFlows { next, .. } = self {
            *next += u64::from(calls);
        }
    }
}

pub(super) struct Case {
    pub name: &'static str,
    /// Method A target for the median ratio, if the issue set one.
    pub target: Option<f64>,
    pub instance: Instance,
    pub packets: Packets,
    /// Sent once before measuring: opens the flow the case's packets hit.
    pub opens_with: Option<Vec<u8>>,
    /// Tunnel cases: the outer header's size. Checked once before
    /// measuring, so the case measures what it says: an established flow,
    /// encapsulated and sent back out.
    pub encapsulates: Option<usize>,
    /// Whether BPF_PROG_TEST_RUN may repeat the packet in one call (method
    /// B). Not for new flows (every repeat after the first hits the flow
    /// the first one opened) nor for tunnels (every repeat would
    /// encapsulate the same, already grown, buffer again).
    pub repeatable: bool,
}

impl Case {
    /// A case whose packet is the same on every call.
    fn same(name: &'static str, target: Option<f64>, instance: Instance, packet: Vec<u8>) -> Case {
        Case {
            name,
            target,
            instance,
            packets: Packets::Same(packet),
            opens_with: None,
            encapsulates: None,
            repeatable: true,
        }
    }

    /// A case that sends a new flow on every call, method A only.
    fn new_flows(
        name: &'static str,
        target: Option<f64>,
        instance: Instance,
        make: fn(u64) -> Vec<u8>,
        first: u64,
    ) -> Case {
        Case {
            packets: Packets::NewFlows { make, next: first },
            repeatable: false,
            ..Case::same(name, target, instance, Vec::new())
        }
    }

    /// This case after `syn` opened its flow.
    fn opened_by(self, syn: Vec<u8>) -> Case {
        Case {
            opens_with: Some(syn),
            ..self
        }
    }

    /// This tunnel case: `outer` bytes of outer header, method A only.
    fn encapsulating(self, outer: usize) -> Case {
        Case {
            encapsulates: Some(outer),
            repeatable: false,
            ..self
        }
    }
}

/// A fresh 5-tuple for every call of every round: `n`-th SYN from
/// 10.128.x.y:port.
fn new_flow_packet(n: u64) -> Vec<u8> {
    let src = Ipv4Addr::from(0x0a80_0000u32 + (n / 64512) as u32);
    tcp_syn(src, 1024 + (n % 64512) as u16, VIP, 80)
}

/// The same for IPv6: the `n`-th SYN from fd00:128::x:port.
fn new_flow_packet6(n: u64) -> Vec<u8> {
    let src = Ipv6Addr::from_bits((0xfd00_0128u128 << 96) + (n / 64512) as u128);
    tcp_syn(src, 1024 + (n % 64512) as u16, VIP6, 80)
}

/// Every case, in the order of the report.
pub(super) fn all() -> Vec<Case> {
    use Instance::*;
    let tcp_est = tcp_ack(CLIENT, 40000, VIP, 80);
    let udp_est = udp(CLIENT, 40001, VIP, 53, &[0; 18]);
    vec![
        Case::same(
            "ceiling: trivial XDP_TX (MAC swap)",
            None,
            Ceiling,
            tcp_est.clone(),
        ),
        Case::same("trivial XDP_PASS", None, Pass, tcp_est.clone()),
        Case::same(
            "non-VIP packet (pass)",
            Some(1.3),
            Lb,
            tcp_syn(CLIENT, 40002, LB, 80),
        ),
        Case::same(
            "TCP established (flow hit), L2",
            Some(2.0),
            Lb,
            tcp_est.clone(),
        )
        .opened_by(tcp_syn(CLIENT, 40000, VIP, 80)),
        Case::new_flows(
            "TCP SYN, new flow (miss + Maglev + insert), L2",
            Some(4.0),
            Lb,
            new_flow_packet,
            0,
        ),
        // A UDP flow is opened by its first datagram, this one.
        Case::same("UDP established, L2", Some(2.0), Lb, udp_est.clone()).opened_by(udp_est),
        Case::same(
            "TCP established, 1M flows in table, L2",
            Some(2.0),
            LbFullTable,
            tcp_est,
        )
        .opened_by(tcp_syn(CLIENT, 40000, VIP, 80)),
        // Its own range of sources, apart from the other instance's.
        Case::new_flows(
            "TCP SYN, new flow, full flow table, L2",
            Some(6.0),
            LbFullTable,
            new_flow_packet,
            1 << 32,
        ),
        // New flows meeting only established flows: the eviction path.
        Case::new_flows(
            "TCP SYN, new flow, table full of established flows, L2",
            Some(5.5),
            LbEstablishedTable,
            new_flow_packet,
            2 << 32,
        ),
        Case::same(
            "TCP established (flow hit), IPIP",
            None,
            Lb,
            tcp_ack(CLIENT, 40003, VIP, IPIP_PORT),
        )
        .opened_by(tcp_syn(CLIENT, 40003, VIP, IPIP_PORT))
        .encapsulating(20),
        Case::same(
            "TCP established (flow hit), IPv6, L2",
            None,
            Lb,
            tcp_ack(CLIENT6, 40004, VIP6, 80),
        )
        .opened_by(tcp_syn(CLIENT6, 40004, VIP6, 80)),
        Case::new_flows("TCP SYN, new flow, IPv6, L2", None, Lb, new_flow_packet6, 0),
        Case::same(
            "TCP established (flow hit), IP6IP6",
            None,
            Lb,
            tcp_ack(CLIENT6, 40005, VIP6, IPIP_PORT),
        )
        .opened_by(tcp_syn(CLIENT6, 40005, VIP6, IPIP_PORT))
        .encapsulating(40),
    ]
}
