//! Runs packets through the real, verifier-loaded XDP program with
//! BPF_PROG_TEST_RUN, with maps filled by the real control-plane code
//! (Reconciler over AyaDataplane), and builds the test packets.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use etherparse::{IpHeaders, PacketBuilder, PacketBuilderStep};
use lb_common::hash::{flow_hash_v4, flow_hash_v6};
use lb_userspace::{
    config::{Config, Vip},
    dataplane::{Counters, Dataplane as _, aya::AyaDataplane},
    loader,
    model::{Health, Neighbour, Neighbours},
    reconcile::{self, Reconciler, Swap},
};

use crate::xdp::XdpAction;

/// BPF_PROG_TEST_RUN runs a program as if the frame came in on loopback.
pub const TEST_RUN_IFINDEX: u32 = 1;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0x01];

/// The MAC the tests give backend `a` (derived from its last four bytes,
/// the family in the second).
pub fn backend_mac(a: impl Into<IpAddr>) -> [u8; 6] {
    let a = a.into();
    let o = lb_common::addr_key(a);
    let family = if a.is_ipv6() { 0xb6 } else { 0xbe };
    [0x02, family, o[12], o[13], o[14], o[15]]
}

/// Neighbour entries for `addrs`, all reached through `ifindex`.
pub fn neighbours<A: Into<IpAddr>>(addrs: impl IntoIterator<Item = A>, ifindex: u32) -> Neighbours {
    addrs
        .into_iter()
        .map(|a| {
            let a = a.into();
            (
                a,
                Neighbour {
                    ifindex,
                    mac: backend_mac(a),
                    src_mac: LB_MAC,
                    src_addr: None,
                    mtu: 0,
                },
            )
        })
        .collect()
}

/// The MAC the tests give the router in front of routed (`ipip`) backends.
pub const ROUTER_MAC: [u8; 6] = [2, 0x77, 0, 0, 0, 1];

/// Neighbour entries for `ipip` backends: each reached through the router,
/// on the loopback interface BPF_PROG_TEST_RUN runs on, with the route's
/// source address `src` and the egress `mtu`.
pub fn routed_neighbours<A: Into<IpAddr>>(
    backends: impl IntoIterator<Item = A>,
    src: impl Into<IpAddr>,
    mtu: u32,
) -> Neighbours {
    let src = src.into();
    backends
        .into_iter()
        .map(|b| {
            (
                b.into(),
                Neighbour {
                    ifindex: TEST_RUN_IFINDEX,
                    mac: ROUTER_MAC,
                    src_mac: LB_MAC,
                    src_addr: Some(src),
                    mtu,
                },
            )
        })
        .collect()
}

pub struct Harness {
    pub ebpf: Ebpf,
    pub reconciler: Reconciler<AyaDataplane>,
    pub config: Config,
    pub neighbours: Neighbours,
}

/// What the program did with one packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub action: XdpAction,
    pub packet: Vec<u8>,
}

impl Harness {
    /// Loads the program (maps not pinned) and applies `config` with every
    /// backend healthy and `neighbours`.
    pub fn new(config: &str, neighbours: &Neighbours) -> anyhow::Result<Harness> {
        Harness::load(config, neighbours, None)
    }

    /// [`Harness::new`] with the maps pinned under `pin_dir`: adopted, as a
    /// restarted `lb run` adopts them, when they are pinned there already.
    pub fn pinned(
        config: &str,
        neighbours: &Neighbours,
        pin_dir: &Path,
    ) -> anyhow::Result<Harness> {
        Harness::load(config, neighbours, Some(pin_dir))
    }

    fn load(
        config: &str,
        neighbours: &Neighbours,
        pin_dir: Option<&Path>,
    ) -> anyhow::Result<Harness> {
        let config = Config::parse(config, Path::new("packet-test.yaml"))?;
        let adopting = pin_dir.is_some_and(loader::is_pinned);
        let mut ebpf = loader::load(config.sizes(), pin_dir)?;
        let dp = AyaDataplane::new(&mut ebpf)?;
        let reconciler = if adopting {
            Reconciler::adopt(dp, config.table_size, config.max_vips)?.0
        } else {
            Reconciler::new(dp, config.table_size, config.max_vips)
        };
        let mut h = Harness {
            ebpf,
            reconciler,
            config,
            neighbours: neighbours.clone(),
        };
        h.apply(&Health::new())?;
        Ok(h)
    }

    /// [`Harness::new`] for the test named `test`, or `None` without root:
    /// the test is skipped (under CI it fails instead).
    pub fn for_test(test: &str, config: &str, neighbours: &Neighbours) -> Option<Harness> {
        crate::root::root_or_skip(test)
            .then(|| Harness::new(config, neighbours).expect("load and configure"))
    }

    /// Applies the harness's config with `health`.
    pub fn apply(&mut self, health: &Health) -> anyhow::Result<()> {
        apply_settled(&mut self.reconciler, &self.config, health, &self.neighbours)?;
        Ok(())
    }

    /// Replaces the config (parsed from `text`) and applies it, all healthy.
    pub fn reconfigure(&mut self, text: &str) -> anyhow::Result<()> {
        self.config = Config::parse(text, Path::new("packet-test.yaml"))?;
        self.apply(&Health::new())
    }

    /// Runs one packet once.
    pub fn run(&mut self, packet: &[u8]) -> anyhow::Result<Outcome> {
        run_packet(&mut self.ebpf, packet)
    }

    /// The backend a packet forwarded by the program was sent to, read back
    /// from its destination MAC.
    pub fn backend_of(&self, out: &Outcome) -> Option<IpAddr> {
        self.neighbours
            .iter()
            .find(|(_, n)| out.packet.get(..6) == Some(&n.mac[..]))
            .map(|(a, _)| *a)
    }

    pub fn counters(&self) -> anyhow::Result<Counters> {
        Ok(self.reconciler.dataplane().counters()?)
    }

    /// The backend the userspace-built table gives the flow, computed without
    /// the program: the flow hash from lb-common, the table from the Maglev
    /// builder.
    pub fn expected_backend(&self, vip: &Vip, src: impl Into<IpAddr>, sport: u16) -> IpAddr {
        expected_backend(&self.config, vip, src, sport)
    }
}

/// Applies, then again at each deadline the reconciler gives until no VIP's
/// rebuild waits for the grace of its retired table half, so a test sees the
/// state it asked for. (The daemon does not wait: its loop re-applies at the
/// deadline.)
pub fn apply_settled(
    r: &mut Reconciler<AyaDataplane>,
    config: &Config,
    health: &Health,
    neighbours: &Neighbours,
) -> anyhow::Result<Vec<Swap>> {
    let mut swaps = r.apply(config, health, neighbours)?;
    while let Some(at) = r.next_deadline() {
        std::thread::sleep(at.saturating_duration_since(std::time::Instant::now()));
        swaps.extend(r.apply(config, health, neighbours)?);
    }
    Ok(swaps)
}

/// Runs one packet once through the load balancer program in `ebpf`.
pub fn run_packet(ebpf: &mut Ebpf, packet: &[u8]) -> anyhow::Result<Outcome> {
    test_run(loader::program(ebpf)?, packet)
}

/// Runs one packet once through `prog` with BPF_PROG_TEST_RUN, with room
/// for any header the program may add.
pub fn test_run(prog: &mut Xdp, packet: &[u8]) -> anyhow::Result<Outcome> {
    let mut out = vec![0u8; packet.len() + 256];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(result.data_size_out as usize);
    Ok(Outcome {
        action: XdpAction::from_raw(result.return_value)
            .with_context(|| format!("verdict {}", result.return_value))?,
        packet: out,
    })
}

/// The backend `config`'s table for `vip` (all backends healthy) gives a new
/// flow from `src:sport`, computed without the program: the flow hash from
/// lb-common, the table from the Maglev builder.
pub fn expected_backend(config: &Config, vip: &Vip, src: impl Into<IpAddr>, sport: u16) -> IpAddr {
    let hash = flow_hash(
        src.into(),
        vip.address,
        sport,
        vip.port,
        vip.protocol.number(),
        config.seed,
    );
    let (_, table) = reconcile::plan(config)
        .into_iter()
        .find(|(v, _)| v.name == vip.name)
        .expect("VIP is in the config");
    let slot = table.slots[(hash % config.table_size) as usize];
    table.backends[slot as usize].address
}

/// The flow hash of a 5-tuple of either family, from lb-common.
pub fn flow_hash(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8, seed: u32) -> u32 {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            flow_hash_v4(s.to_bits(), d.to_bits(), sport, dport, proto, seed)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            flow_hash_v6(&s.octets(), &d.octets(), sport, dport, proto, seed)
        }
        _ => panic!("{src} and {dst} are of different families"),
    }
}

/// Ethernet from the client MAC to the load balancer's, then an IPv4 or IPv6
/// header (TTL / hop limit 64) by the addresses' family.
fn ip(src: impl Into<IpAddr>, dst: impl Into<IpAddr>) -> PacketBuilderStep<IpHeaders> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC);
    match (src.into(), dst.into()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        (s, d) => panic!("{s} and {d} are of different families"),
    }
}

/// A TCP SYN from the client MAC to the load balancer's MAC.
pub fn tcp_syn(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Vec<u8> {
    let mut p = Vec::new();
    ip(src, dst)
        .tcp(sport, dport, 1000, 64240)
        .syn()
        .write(&mut p, &[])
        .expect("build TCP");
    p
}

/// A TCP ACK carrying data: a packet in the middle of a connection.
pub fn tcp_ack(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Vec<u8> {
    let mut p = Vec::new();
    ip(src, dst)
        .tcp(sport, dport, 2000, 64240)
        .ack(7000)
        .write(&mut p, b"data")
        .expect("build TCP ACK");
    p
}

/// A UDP datagram from the client MAC to the load balancer's MAC.
pub fn udp(
    src: impl Into<IpAddr>,
    sport: u16,
    dst: impl Into<IpAddr>,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = Vec::new();
    ip(src, dst)
        .udp(sport, dport)
        .write(&mut p, payload)
        .expect("build UDP");
    p
}

/// A TCP SYN whose IPv4 header carries options (IHL > 5).
pub fn tcp_syn_with_ip_options(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut ip =
        etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber::TCP, src.octets(), dst.octets())
            .expect("IPv4 header");
    // Four NOPs and an end-of-options byte, padded: 8 bytes, IHL 7.
    ip.options = [1u8, 1, 1, 1, 0, 0, 0, 0][..].try_into().expect("options");
    let mut p = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .tcp(sport, dport, 1000, 64240)
        .syn()
        .write(&mut p, &[])
        .expect("build TCP with IP options");
    p
}

/// `packet` (Ethernet + IPv6) with `headers` inserted as IPv6 extension
/// headers between the IPv6 header and its payload: `(next header, bytes)`
/// pairs whose bytes start with a placeholder next-header byte, which is
/// chained here. The payload's checksum is not touched (the load balancer
/// never reads it).
pub fn with_ipv6_extensions(packet: &[u8], headers: &[(u8, Vec<u8>)]) -> Vec<u8> {
    const IP: usize = 14;
    let (front, payload) = packet.split_at(IP + 40);
    let mut out = front.to_vec();
    let mut next = out[IP + 6];
    for (kind, bytes) in headers.iter().rev() {
        let mut h = bytes.clone();
        h[0] = next;
        next = *kind;
        out.splice(IP + 40..IP + 40, h);
    }
    out[IP + 6] = next;
    out.extend_from_slice(payload);
    let payload_len = (out.len() - IP - 40) as u16;
    out[IP + 4..IP + 6].copy_from_slice(&payload_len.to_be_bytes());
    out
}

/// An ARP request from the client asking for `target`.
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut p = Vec::with_capacity(42);
    p.extend_from_slice(&[0xff; 6]);
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&0x0806u16.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet, IPv4, request
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&sender.octets());
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&target.octets());
    p
}

/// ICMP "fragmentation needed" carrying `mtu` that answers `packet`
/// (Ethernet + IPv4 without options), as the program must build it, built
/// independently with etherparse: back to the sender from the address it
/// wrote to, quoting the IPv4 header and 8 bytes.
pub fn frag_needed(packet: &[u8], mtu: u16) -> Vec<u8> {
    let quoted = &packet[14..14 + 28];
    let (to, from) = (&quoted[12..16], &quoted[16..20]);
    let icmp = etherparse::Icmpv4Header::with_checksum(
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
        ),
        quoted,
    );
    let mut ip = etherparse::Ipv4Header::new(
        (icmp.header_len() + quoted.len()) as u16,
        64,
        etherparse::IpNumber::ICMP,
        from.try_into().unwrap(),
        to.try_into().unwrap(),
    )
    .expect("IPv4 header");
    ip.dont_fragment = true;
    ip.identification = 0;
    ip.dscp = etherparse::IpDscp::try_new(0xc0 >> 2).unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    answer(packet, 0x0800, &ip.to_bytes(), &icmp.to_bytes(), quoted)
}

/// ICMPv6 "packet too big" carrying `mtu` that answers `packet` (Ethernet +
/// IPv6 without extension headers), built the same way: quoting the IPv6
/// header and 8 bytes.
pub fn packet_too_big(packet: &[u8], mtu: u32) -> Vec<u8> {
    let quoted = &packet[14..14 + 48];
    let to: [u8; 16] = quoted[8..24].try_into().unwrap();
    let from: [u8; 16] = quoted[24..40].try_into().unwrap();
    let icmp = etherparse::Icmpv6Header::with_checksum(
        etherparse::Icmpv6Type::PacketTooBig { mtu },
        from,
        to,
        quoted,
    )
    .expect("ICMPv6 header");
    let ip = etherparse::Ipv6Header {
        traffic_class: 0,
        flow_label: etherparse::Ipv6FlowLabel::ZERO,
        payload_length: (icmp.header_len() + quoted.len()) as u16,
        next_header: etherparse::IpNumber::IPV6_ICMP,
        hop_limit: 64,
        source: from,
        destination: to,
    };
    answer(packet, 0x86dd, &ip.to_bytes(), &icmp.to_bytes(), quoted)
}

/// An answer frame: Ethernet back to `packet`'s sender, then the parts.
fn answer(packet: &[u8], ether_type: u16, ip: &[u8], icmp: &[u8], quoted: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&packet[6..12]);
    p.extend_from_slice(&packet[..6]);
    p.extend_from_slice(&ether_type.to_be_bytes());
    p.extend_from_slice(ip);
    p.extend_from_slice(icmp);
    p.extend_from_slice(quoted);
    p
}

/// Recomputes the IPv4 header checksum of `p` (Ethernet + IPv4) after a
/// test edited the header.
pub fn fix_ipv4_checksum(p: &mut [u8]) {
    let (mut ip, _) = etherparse::Ipv4Header::from_slice(&p[14..]).expect("IPv4 header");
    ip.header_checksum = ip.calc_header_checksum();
    let len = ip.header_len();
    p[14..14 + len].copy_from_slice(&ip.to_bytes());
}
