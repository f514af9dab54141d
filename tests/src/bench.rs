//! `cargo xtask bench`: what a packet costs, measured the way the kernel lets
//! us measure it exactly (BPF_PROG_TEST_RUN), always next to trivial programs
//! run in the same round, so the ratios survive a noisy shared machine.
//!
//! Method A: one call per packet (repeat = 1), the kernel's per-call duration
//! averaged over many calls; valid for every path, including new flows that
//! need a new packet each time. Method B: one call with a large repeat count,
//! for paths that leave the packet reusable.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, AsRawFd as _},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Map, MapData, PerCpuArray},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use lb_common::map_names;
use lb_userspace::{
    config::Config,
    dataplane::aya::AyaDataplane,
    loader::{self, BASELINE_OBJECT, Sizes},
    maglev::{self, Weighted},
    model::{Health, Neighbour, Neighbours},
    reconcile::Reconciler,
};
use serde::Serialize;

use crate::{
    netns::Netns,
    packet::{LB_MAC, backend_mac, tcp_ack, tcp_syn, udp},
};

/// How much work each part does.
#[derive(Debug, Clone)]
pub struct Settings {
    pub rounds: usize,
    /// Method A: calls per case per round.
    pub calls: u32,
    /// Method B: repeat count per case per round.
    pub repeat: u32,
    /// Flows in the "full table" instance, and its capacity.
    pub many_flows: u32,
    pub many_flows_capacity: u32,
    /// Flow-table capacity of the regular instance (new-flow inserts of all
    /// rounds must fit, so that "new flow" never meets a full table).
    pub flows_capacity: u32,
    pub throughput_frames: u32,
    pub maglev_runs: usize,
    /// Measure the largest supported config's maps (allocates gigabytes).
    pub largest_memory: bool,
}

impl Settings {
    pub fn full() -> Self {
        Self {
            rounds: 5,
            calls: 200_000,
            repeat: 2_000_000,
            many_flows: 1_000_000,
            many_flows_capacity: 1 << 20,
            flows_capacity: 1 << 21,
            throughput_frames: 5_000_000,
            maglev_runs: 5,
            largest_memory: true,
        }
    }

    /// A few iterations of everything: proves the bench still runs.
    pub fn smoke() -> Self {
        Self {
            rounds: 2,
            calls: 500,
            repeat: 1000,
            many_flows: 4000,
            many_flows_capacity: 4096,
            flows_capacity: 1 << 14,
            throughput_frames: 20_000,
            maglev_runs: 1,
            largest_memory: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
}

impl Stats {
    fn of(mut v: Vec<f64>) -> Stats {
        v.sort_by(f64::total_cmp);
        Stats {
            median: v[v.len() / 2],
            min: v[0],
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PacketCase {
    pub case: String,
    /// ns per packet, method A.
    pub a_ns: Stats,
    /// Ratio to the trivial XDP_TX program in the same round, method A.
    pub a_ratio: Stats,
    pub b_ns: Option<Stats>,
    pub b_ratio: Option<Stats>,
    /// Method A target for the median ratio, if the issue set one.
    pub target: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub lb_pps: Stats,
    pub trivial_tx_pps: Stats,
    pub ratio: Stats,
    pub frames_per_round: u32,
    pub cpu: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct MaglevBuild {
    pub backends: usize,
    pub table_size: u32,
    pub ms: Stats,
}

#[derive(Debug, Clone, Serialize)]
pub struct MapMemory {
    pub config: String,
    /// Bytes the kernel charges for each map (`memlock` in fdinfo).
    pub maps: BTreeMap<String, u64>,
    pub total: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: String,
    pub per_packet: Vec<PacketCase>,
    pub throughput: Throughput,
    pub maglev_build: Vec<MaglevBuild>,
    /// Reconciler::apply after one backend's health flips: rebuild the VIP's
    /// table (M = 65537, 100 backends), write it, swap it (ms).
    pub health_transition_to_swap_ms: Stats,
    pub memory: Vec<MapMemory>,
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 77, 0, 11),
    Ipv4Addr::new(10, 77, 0, 12),
    Ipv4Addr::new(10, 77, 0, 13),
];
/// Backends of the `ipip` VIP (port 8080), behind a router.
const ROUTED_BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 99, 0, 11),
    Ipv4Addr::new(10, 99, 0, 12),
    Ipv4Addr::new(10, 99, 0, 13),
];
const IPIP_PORT: u16 = 8080;
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x100);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2);
const BACKENDS6: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x12),
    Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x13),
];
/// Backends of the IPv6 `ipip` VIP (IP6IP6, port 8080), behind a router.
const ROUTED_BACKENDS6: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x12),
    Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x13),
];

fn lb_config(max_flows: u32) -> String {
    let vip = |name: &str,
               address: IpAddr,
               port: u16,
               proto: &str,
               forwarding: &str,
               backends: &[IpAddr]| {
        let backends: String = backends
            .iter()
            .map(|b| format!("      - {{ address: \"{b}\", weight: 1 }}\n"))
            .collect();
        format!(
            "  - name: {name}\n    address: \"{address}\"\n    port: {port}\n    protocol: {proto}\n    forwarding: {forwarding}\n    backends:\n{backends}"
        )
    };
    let v4 = |list: &[Ipv4Addr]| list.iter().map(|&a| IpAddr::from(a)).collect::<Vec<_>>();
    let v6 = |list: &[Ipv6Addr]| list.iter().map(|&a| IpAddr::from(a)).collect::<Vec<_>>();
    format!(
        "interface: lo\nmaglev: {{ table_size: 65537, seed: 0x5eed }}\nmax_vips: 8\n\
         flow_table: {{ max_flows: {max_flows} }}\nvips:\n{}{}{}{}{}",
        vip("web", VIP.into(), 80, "tcp", "l2", &v4(&BACKENDS)),
        vip("dns", VIP.into(), 53, "udp", "l2", &v4(&BACKENDS)),
        vip(
            "tunnel",
            VIP.into(),
            IPIP_PORT,
            "tcp",
            "ipip",
            &v4(&ROUTED_BACKENDS)
        ),
        vip("web6", VIP6.into(), 80, "tcp", "l2", &v6(&BACKENDS6)),
        vip(
            "tunnel6",
            VIP6.into(),
            IPIP_PORT,
            "tcp",
            "ipip",
            &v6(&ROUTED_BACKENDS6)
        ),
    )
}

/// An lb instance whose maps are filled by the real reconciler; backends are
/// "reached" through loopback, the ingress of BPF_PROG_TEST_RUN, so forwarded
/// packets are XDP_TX.
struct LbInstance {
    ebpf: Ebpf,
    _reconciler: Reconciler<AyaDataplane>,
}

impl LbInstance {
    fn new(max_flows: u32) -> anyhow::Result<LbInstance> {
        let config = Config::parse(&lb_config(max_flows), std::path::Path::new("bench.yaml"))?;
        let mut ebpf = loader::load(lb_userspace::run::sizes(&config), None)?;
        let mut reconciler = Reconciler::new(
            AyaDataplane::new(&mut ebpf)?,
            config.table_size,
            config.max_vips,
        );
        let l2 = BACKENDS
            .map(IpAddr::from)
            .into_iter()
            .chain(BACKENDS6.map(IpAddr::from))
            .map(|b| (b, backend_mac(b), None));
        // IPIP backends: next hop's MAC, the route's source, MTU 1500.
        let routed = ROUTED_BACKENDS
            .map(|b| (IpAddr::from(b), IpAddr::from(OTHER)))
            .into_iter()
            .chain(ROUTED_BACKENDS6.map(|b| (b.into(), CLIENT6.into())))
            .map(|(b, src)| (b, [2, 0, 0, 0, 0, 1], Some(src)));
        let neighbours: Neighbours = l2
            .chain(routed)
            .map(|(b, mac, src_addr)| {
                (
                    b,
                    Neighbour {
                        ifindex: 1,
                        mac,
                        src_mac: LB_MAC,
                        src_addr,
                        mtu: if src_addr.is_some() { 1500 } else { 0 },
                    },
                )
            })
            .collect();
        reconciler.apply(&config, &Health::new(), &neighbours)?;
        Ok(LbInstance {
            ebpf,
            _reconciler: reconciler,
        })
    }

    fn prog(&mut self) -> anyhow::Result<&mut Xdp> {
        Ok(loader::program(&mut self.ebpf)?)
    }
}

fn baseline(name: &str) -> anyhow::Result<(Ebpf, &'static str)> {
    let mut ebpf = Ebpf::load(BASELINE_OBJECT)?;
    let name: &'static str = match name {
        "xdp_tx_swap" => "xdp_tx_swap",
        "xdp_pass" => "xdp_pass",
        other => bail!("no baseline program {other}"),
    };
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .context("baseline program")?
        .try_into()?;
    prog.load()?;
    Ok((ebpf, name))
}

/// Method A: mean of the kernel's per-call duration over `calls` calls, the
/// i-th call running `packet(i)`.
fn method_a(
    prog: &mut Xdp,
    calls: u32,
    mut packet: impl FnMut(u32) -> Vec<u8>,
) -> anyhow::Result<f64> {
    let mut total = Duration::ZERO;
    for i in 0..calls {
        let data = packet(i);
        let r = prog.test_run(TestRunOptions {
            data_in: Some(&data),
            ..TestRunOptions::default()
        })?;
        total += r.duration;
    }
    Ok(total.as_nanos() as f64 / calls as f64)
}

/// Method B: one call repeating `packet` `repeat` times; the kernel's mean.
fn method_b(prog: &mut Xdp, repeat: u32, packet: &[u8]) -> anyhow::Result<f64> {
    let r = prog.test_run(TestRunOptions {
        data_in: Some(packet),
        repeat,
        ..TestRunOptions::default()
    })?;
    Ok(r.duration.as_nanos() as f64)
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

fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// CPUs online (not this thread's affinity, which pinning narrows).
fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).max(1) as usize
}

fn bench_cpu() -> usize {
    // The last CPU: on a 2-CPU machine, CPU 1, leaving CPU 0 to the rest.
    online_cpus() - 1
}

struct Case {
    name: &'static str,
    target: Option<f64>,
}

/// Inserts `n` distinct flows (TCP SYNs from 11.x.y.z), an equal share from
/// each CPU.
fn fill_flows(inst: &mut LbInstance, n: u32) -> anyhow::Result<()> {
    let cpus = online_cpus() as u64;
    let prog = inst.prog()?;
    for cpu in 0..cpus {
        pin_to_cpu(cpu as usize)?;
        for n in (cpu..n as u64).step_by(cpus as usize) {
            let p = tcp_syn(
                Ipv4Addr::from(0x0b00_0000u32 + (n / 64512) as u32),
                1024 + (n % 64512) as u16,
                VIP,
                80,
            );
            prog.test_run(TestRunOptions {
                data_in: Some(&p),
                ..TestRunOptions::default()
            })?;
        }
    }
    Ok(())
}

pub fn per_packet(s: &Settings) -> anyhow::Result<Vec<PacketCase>> {
    let before = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
    let cases = per_packet_pinned(s);
    // The rest of the benchmark (Maglev builds, swaps) runs unpinned again.
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &before)?;
    cases
}

fn per_packet_pinned(s: &Settings) -> anyhow::Result<Vec<PacketCase>> {
    pin_to_cpu(bench_cpu())?;
    let (mut tx, tx_name) = baseline("xdp_tx_swap")?;
    let (mut pass, pass_name) = baseline("xdp_pass")?;
    let mut lb = LbInstance::new(s.flows_capacity)?;
    let mut full = LbInstance::new(s.many_flows_capacity)?;

    // Established flows: one packet each opens them.
    let tcp_est = tcp_ack(Ipv4Addr::new(10, 77, 0, 2), 40000, VIP, 80);
    let udp_est = udp(Ipv4Addr::new(10, 77, 0, 2), 40001, VIP, 53, &[0; 18]);
    let non_vip = tcp_syn(Ipv4Addr::new(10, 77, 0, 2), 40002, OTHER, 80);
    let ipip_est = tcp_ack(Ipv4Addr::new(10, 77, 0, 2), 40003, VIP, IPIP_PORT);
    let tcp6_est = tcp_ack(CLIENT6, 40004, VIP6, 80);
    let ip6ip6_est = tcp_ack(CLIENT6, 40005, VIP6, IPIP_PORT);
    for inst in [&mut lb, &mut full] {
        let prog = inst.prog()?;
        for p in [
            &tcp_syn(Ipv4Addr::new(10, 77, 0, 2), 40000, VIP, 80),
            &udp_est,
            &tcp_syn(Ipv4Addr::new(10, 77, 0, 2), 40003, VIP, IPIP_PORT),
            &tcp_syn(CLIENT6, 40004, VIP6, 80),
            &tcp_syn(CLIENT6, 40005, VIP6, IPIP_PORT),
        ] {
            prog.test_run(TestRunOptions {
                data_in: Some(p),
                ..TestRunOptions::default()
            })?;
        }
    }
    // The tunnel cases measure what they say: an established flow,
    // encapsulated (the frame grows by the outer header) and sent back out.
    for (packet, outer) in [(&ipip_est, 20), (&ip6ip6_est, 40)] {
        let r = lb.prog()?.test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut vec![0u8; packet.len() + 64]),
            ..TestRunOptions::default()
        })?;
        const XDP_TX: u32 = 3;
        if r.return_value != XDP_TX || r.data_size_out as usize != packet.len() + outer {
            bail!("a tunnel case is not encapsulated ({outer}-byte outer header): {r:?}");
        }
    }
    // Fill the second instance's flow table. Each CPU owns its share of the
    // LRU's capacity, so every CPU inserts its share of the flows.
    fill_flows(&mut full, s.many_flows)?;
    pin_to_cpu(bench_cpu())?;

    let cases = [
        Case {
            name: "ceiling: trivial XDP_TX (MAC swap)",
            target: None,
        },
        Case {
            name: "trivial XDP_PASS",
            target: None,
        },
        Case {
            name: "non-VIP packet (pass)",
            target: Some(1.3),
        },
        Case {
            name: "TCP established (flow hit), L2",
            target: Some(2.0),
        },
        Case {
            name: "TCP SYN, new flow (miss + Maglev + insert), L2",
            target: Some(4.0),
        },
        Case {
            name: "UDP established, L2",
            target: Some(2.0),
        },
        Case {
            name: "TCP established, 1M flows in table, L2",
            target: Some(2.0),
        },
        Case {
            name: "TCP SYN, new flow, full flow table, L2",
            target: Some(6.0),
        },
        // Method A only: a repeated run would encapsulate the same buffer
        // again and again.
        Case {
            name: "TCP established (flow hit), IPIP",
            target: None,
        },
        Case {
            name: "TCP established (flow hit), IPv6, L2",
            target: None,
        },
        Case {
            name: "TCP SYN, new flow, IPv6, L2",
            target: None,
        },
        Case {
            name: "TCP established (flow hit), IP6IP6",
            target: None,
        },
    ];
    let mut a: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut b: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut new_flows = 0u64;
    let mut full_new_flows = 1u64 << 32;
    for _round in 0..s.rounds {
        let fixed = |p: &[u8]| {
            let p = p.to_vec();
            move |_| p.clone()
        };
        let txp: &mut Xdp = tx.program_mut(tx_name).context("tx")?.try_into()?;
        a[0].push(method_a(txp, s.calls, fixed(&tcp_est))?);
        b[0].push(method_b(txp, s.repeat, &tcp_est)?);
        let passp: &mut Xdp = pass.program_mut(pass_name).context("pass")?.try_into()?;
        a[1].push(method_a(passp, s.calls, fixed(&tcp_est))?);
        b[1].push(method_b(passp, s.repeat, &tcp_est)?);
        let p = lb.prog()?;
        a[2].push(method_a(p, s.calls, fixed(&non_vip))?);
        b[2].push(method_b(p, s.repeat, &non_vip)?);
        a[3].push(method_a(p, s.calls, fixed(&tcp_est))?);
        b[3].push(method_b(p, s.repeat, &tcp_est)?);
        let base = new_flows;
        a[4].push(method_a(p, s.calls, |i| new_flow_packet(base + i as u64))?);
        new_flows += s.calls as u64;
        a[5].push(method_a(p, s.calls, fixed(&udp_est))?);
        b[5].push(method_b(p, s.repeat, &udp_est)?);
        let p = full.prog()?;
        a[6].push(method_a(p, s.calls, fixed(&tcp_est))?);
        b[6].push(method_b(p, s.repeat, &tcp_est)?);
        let base = full_new_flows;
        a[7].push(method_a(p, s.calls, |i| new_flow_packet(base + i as u64))?);
        full_new_flows += s.calls as u64;
        let p = lb.prog()?;
        a[8].push(method_a(p, s.calls, fixed(&ipip_est))?);
        a[9].push(method_a(p, s.calls, fixed(&tcp6_est))?);
        b[9].push(method_b(p, s.repeat, &tcp6_est)?);
        let base = new_flows;
        a[10].push(method_a(p, s.calls, |i| new_flow_packet6(base + i as u64))?);
        new_flows += s.calls as u64;
        a[11].push(method_a(p, s.calls, fixed(&ip6ip6_est))?);
    }
    let ratio =
        |v: &[f64], ceiling: &[f64]| Stats::of(v.iter().zip(ceiling).map(|(x, c)| x / c).collect());
    Ok(cases
        .iter()
        .enumerate()
        .map(|(i, c)| PacketCase {
            case: c.name.to_string(),
            a_ns: Stats::of(a[i].clone()),
            a_ratio: ratio(&a[i], &a[0]),
            b_ns: (!b[i].is_empty()).then(|| Stats::of(b[i].clone())),
            b_ratio: (!b[i].is_empty()).then(|| ratio(&b[i], &b[0])),
            target: c.target,
        })
        .collect())
}

/// Packets per second through a veth pair: a generator namespace sends 60-byte
/// UDP frames (varied source ports) with BPF_PROG_TEST_RUN live frames; the
/// program under test on the other end sends them back with XDP_TX, and the
/// generator's interface counts what returns. Rounds alternate between the
/// load balancer and the trivial XDP_TX program on the same topology.
pub fn throughput(s: &Settings) -> anyhow::Result<Throughput> {
    let gen_ns = Netns::new("bench-gen")?;
    let lb_ns = Netns::new("bench-lb")?;
    crate::netns::veth(&gen_ns, "g0", &lb_ns, "eth0")?;
    gen_ns.ip(&["link", "set", "g0", "up"])?;
    lb_ns.ip(&["link", "set", "eth0", "up"])?;
    let gen_mac = link_mac(&gen_ns, "g0")?;
    let lb_mac = link_mac(&lb_ns, "eth0")?;
    let gen_addr = Ipv4Addr::new(10, 99, 0, 1);

    // The load balancer: one UDP VIP whose single backend is the generator.
    let config_text = format!(
        "interface: eth0\nmaglev: {{ table_size: 65537 }}\nvips:\n  - name: bench\n    address: {VIP}\n    port: 5353\n    \
         protocol: udp\n    forwarding: l2\n    backends:\n      - {{ address: {gen_addr}, weight: 1 }}\n"
    );
    // Loaded (not attached) in the load balancer's namespace; the reconciler
    // keeps the maps' control-plane view alive for the whole benchmark.
    let (lb, _reconciler, trivial) = lb_ns.enter(move || -> anyhow::Result<_> {
        let config = Config::parse(&config_text, std::path::Path::new("bench.yaml"))?;
        let ifindex = nix::net::if_::if_nametoindex("eth0")?;
        let mut ebpf = loader::load(lb_userspace::run::sizes(&config), None)?;
        let mut reconciler = Reconciler::new(
            AyaDataplane::new(&mut ebpf)?,
            config.table_size,
            config.max_vips,
        );
        let neighbours = Neighbours::from([(
            gen_addr.into(),
            Neighbour {
                ifindex,
                mac: gen_mac,
                src_mac: lb_mac,
                src_addr: None,
                mtu: 0,
            },
        )]);
        reconciler.apply(&config, &Health::new(), &neighbours)?;
        let (trivial, _) = baseline("xdp_tx_swap")?;
        Ok((ebpf, reconciler, trivial))
    })??;

    // The generator's programs; the receiver counts on g0.
    let (mut generator, gen_ifindex) = gen_ns.enter(|| -> anyhow::Result<_> {
        let mut ebpf = Ebpf::load(BASELINE_OBJECT)?;
        for name in ["xdp_gen", "xdp_count_drop"] {
            let p: &mut Xdp = ebpf.program_mut(name).context(name)?.try_into()?;
            p.load()?;
        }
        let count: &mut Xdp = ebpf
            .program_mut("xdp_count_drop")
            .context("count")?
            .try_into()?;
        count.attach("g0", XdpMode::Driver)?;
        Ok((ebpf, nix::net::if_::if_nametoindex("g0")?))
    })??;

    let mut frame = Vec::new();
    etherparse::PacketBuilder::ethernet2(gen_mac, lb_mac)
        .ipv4(gen_addr.octets(), VIP.octets(), 64)
        .udp(1024, 5353)
        .write(&mut frame, &[0u8; 18])?;

    let cpu = bench_cpu();
    let frames = s.throughput_frames;
    // The two programs under test, and the pps each achieved per round.
    let mut under = [
        (Some(lb), lb_common::PROGRAM_NAME, Vec::new()),
        (Some(trivial), "xdp_tx_swap", Vec::new()),
    ];
    for _round in 0..s.rounds {
        for (slot, name, pps_per_round) in under.iter_mut() {
            let name: &'static str = name;
            let under_test = slot.take().context("program object")?;
            // Attaching resolves the interface in the caller's namespace, so
            // the object travels to a thread there and back.
            let (mut under_test, link) = lb_ns.enter(move || -> anyhow::Result<_> {
                let mut ebpf = under_test;
                let p: &mut Xdp = ebpf.program_mut(name).context("program")?.try_into()?;
                let link = p.attach("eth0", XdpMode::Driver)?;
                Ok((ebpf, link))
            })??;
            let before = received(&generator)?;
            let frame = frame.clone();
            let (gen_back, elapsed) =
                gen_ns.enter(move || -> anyhow::Result<(Ebpf, Duration)> {
                    pin_to_cpu(cpu)?;
                    let mut ebpf = generator;
                    let p: &mut Xdp = ebpf.program_mut("xdp_gen").context("gen")?.try_into()?;
                    // struct xdp_md: the frames enter on g0, so XDP_TX sends them out of it.
                    let md: Vec<u8> = [0u32, frame.len() as u32, 0, gen_ifindex, 0, 0]
                        .iter()
                        .flat_map(|w| w.to_ne_bytes())
                        .collect();
                    let start = Instant::now();
                    p.test_run(TestRunOptions {
                        data_in: Some(&frame),
                        ctx_in: Some(&md),
                        repeat: frames,
                        attrs: TestRunAttrs::new().xdp_live_frames(64),
                        ..TestRunOptions::default()
                    })?;
                    let elapsed = start.elapsed();
                    Ok((ebpf, elapsed))
                })??;
            generator = gen_back;
            // Let the last batch drain through both veth queues.
            std::thread::sleep(Duration::from_millis(50));
            let pps = (received(&generator)? - before) as f64 / elapsed.as_secs_f64();
            let p: &mut Xdp = under_test
                .program_mut(name)
                .context("program")?
                .try_into()?;
            p.detach(link)?;
            pps_per_round.push(pps);
            *slot = Some(under_test);
        }
    }
    let [(_, _, lb_pps), (_, _, tx_pps)] = under;
    let ratios = lb_pps.iter().zip(&tx_pps).map(|(l, t)| l / t).collect();
    Ok(Throughput {
        lb_pps: Stats::of(lb_pps),
        trivial_tx_pps: Stats::of(tx_pps),
        ratio: Stats::of(ratios),
        frames_per_round: s.throughput_frames,
        cpu: format!(
            "generator, program under test and receiver all on CPU {cpu} (veth runs XDP in the sender's NAPI context)"
        ),
    })
}

fn received(generator: &Ebpf) -> anyhow::Result<u64> {
    let map = generator.map("BENCH_COUNTS").context("BENCH_COUNTS")?;
    let counts = PerCpuArray::<_, u64>::try_from(map)?;
    Ok(counts.get(&1, 0)?.iter().sum())
}

fn link_mac(ns: &Netns, dev: &str) -> anyhow::Result<[u8; 6]> {
    let out = ns.ip(&["-o", "link", "show", dev])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .context("no MAC")?;
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("bad MAC {mac}"))
}

pub fn maglev_builds(s: &Settings) -> Vec<MaglevBuild> {
    let mut out = Vec::new();
    for table_size in [65537u32, 655373] {
        for n in [10usize, 100, 1000] {
            let backends: Vec<Weighted> = (0..n)
                .map(|i| Weighted {
                    address: Ipv4Addr::from(0x0a00_0000 + i as u32 * 7919).into(),
                    weight: 1,
                })
                .collect();
            let runs = (0..s.maglev_runs)
                .map(|_| {
                    let start = Instant::now();
                    let t = maglev::build(&backends, table_size, 0x5eed);
                    let ms = start.elapsed().as_secs_f64() * 1e3;
                    std::hint::black_box(t);
                    ms
                })
                .collect();
            out.push(MaglevBuild {
                backends: n,
                table_size,
                ms: Stats::of(runs),
            });
        }
    }
    out
}

/// The reconcile step a health transition triggers, on real maps.
pub fn transition_to_swap(s: &Settings) -> anyhow::Result<Stats> {
    let backends: String = (0..100u32)
        .map(|i| {
            format!(
                "      - {{ address: {}, weight: 1 }}\n",
                Ipv4Addr::from(0x0a01_0000 + i)
            )
        })
        .collect();
    let text = format!(
        "interface: lo\nmaglev: {{ table_size: 65537 }}\nmax_vips: 1\nvips:\n  - name: web\n    address: {VIP}\n    port: 80\n    \
         protocol: tcp\n    forwarding: l2\n    backends:\n{backends}"
    );
    let config = Config::parse(&text, std::path::Path::new("bench.yaml"))?;
    let mut ebpf = loader::load(lb_userspace::run::sizes(&config), None)?;
    let mut r = Reconciler::new(
        AyaDataplane::new(&mut ebpf)?,
        config.table_size,
        config.max_vips,
    );
    let neighbours = Neighbours::new();
    r.apply(&config, &Health::new(), &neighbours)?;
    let key = config.vips[0].key;
    let down = Health::from([((key, Ipv4Addr::from(0x0a01_0000u32 + 7).into()), false)]);
    let mut ms = Vec::new();
    for i in 0..(4 * s.maglev_runs + 1) {
        let health = if i % 2 == 0 { &down } else { &Health::new() };
        // Back-to-back swaps would otherwise time the grace period that keeps
        // a just-retired table half untouched, not the swap.
        std::thread::sleep(Duration::from_millis(5));
        let start = Instant::now();
        let swaps = r.apply(&config, health, &neighbours)?;
        ms.push(start.elapsed().as_secs_f64() * 1e3);
        if swaps.len() != 1 {
            bail!("expected one table swap, got {swaps:?}");
        }
    }
    Ok(Stats::of(ms))
}

/// What the kernel charges for every map of an lb instance with these sizes.
pub fn memory(label: &str, sizes: Sizes) -> anyhow::Result<MapMemory> {
    let mut ebpf = loader::load(sizes, None)?;
    let mut maps = BTreeMap::new();
    for name in map_names::ALL {
        let map = ebpf.take_map(name).with_context(|| format!("map {name}"))?;
        let data = map_data(map).with_context(|| format!("map {name} type"))?;
        maps.insert(name.to_string(), memlock(&data)?);
    }
    let total = maps.values().sum();
    Ok(MapMemory {
        config: format!(
            "{label}: max_vips {}, table_size {}, max_flows {}",
            sizes.max_vips, sizes.table_size, sizes.max_flows
        ),
        maps,
        total,
    })
}

fn map_data(map: Map) -> Option<MapData> {
    match map {
        Map::Array(d) | Map::PerCpuArray(d) | Map::HashMap(d) | Map::LruHashMap(d) => Some(d),
        _ => None,
    }
}

fn memlock(map: &MapData) -> anyhow::Result<u64> {
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .context("no memlock in fdinfo")?
        .trim()
        .parse()
        .context("memlock")
}

pub fn run(s: &Settings) -> anyhow::Result<Report> {
    let per_packet = per_packet(s)?;
    let throughput = throughput(s)?;
    let maglev_build = maglev_builds(s);
    let health_transition_to_swap_ms = transition_to_swap(s)?;
    let default_sizes = Sizes {
        table_size: 65537,
        max_vips: 16,
        max_flows: 262_144,
        max_flows_v6: 262_144,
    };
    let mut memory = vec![self::memory("default", default_sizes)?];
    if s.largest_memory {
        let largest = Sizes {
            table_size: 655_373,
            max_vips: lb_common::MAX_VIPS,
            max_flows: 16_777_216,
            max_flows_v6: 16_777_216,
        };
        memory.push(self::memory("largest", largest)?);
    }
    Ok(Report {
        machine: machine(),
        per_packet,
        throughput,
        maglev_build,
        health_transition_to_swap_ms,
        memory,
    })
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = online_cpus();
    format!("{cpu}, {cpus} CPUs, Linux {}", kernel.trim())
}

/// The report as the table `cargo xtask bench` prints.
pub fn render(r: &Report) -> String {
    let mut out = format!(
        "Machine: {}\n\nPer-packet cost (BPF_PROG_TEST_RUN; ratios to the trivial XDP_TX program in the same round; median / min of rounds)\n",
        r.machine
    );
    out += &format!(
        "{:<48} {:>14} {:>9} {:>8} {:>14} {:>9}\n",
        "case", "A ratio", "A ns", "target", "B ratio", "B ns"
    );
    for c in &r.per_packet {
        let target = match c.target {
            Some(t) if c.a_ratio.median <= t => format!("<={t} ok"),
            Some(t) => format!("<={t} MISS"),
            None => String::new(),
        };
        let b = match (&c.b_ratio, &c.b_ns) {
            (Some(r), Some(ns)) => (
                format!("{:.2}x / {:.2}x", r.median, r.min),
                format!("{:.1}", ns.median),
            ),
            _ => ("n/a".into(), "n/a".into()),
        };
        out += &format!(
            "{:<48} {:>14} {:>9.1} {:>8} {:>14} {:>9}\n",
            c.case,
            format!("{:.2}x / {:.2}x", c.a_ratio.median, c.a_ratio.min),
            c.a_ns.median,
            target,
            b.0,
            b.1
        );
    }
    let t = &r.throughput;
    out += &format!(
        "\nveth throughput ({} frames of 60 bytes per round; {}):\n  lb {:.0} pps, trivial XDP_TX {:.0} pps, ratio {:.2}x (min {:.2}x), target >= 0.6x {}\n",
        t.frames_per_round,
        t.cpu,
        t.lb_pps.median,
        t.trivial_tx_pps.median,
        t.ratio.median,
        t.ratio.min,
        if t.ratio.median >= 0.6 { "ok" } else { "MISS" }
    );
    out += "\nMaglev table build (median / min ms):\n";
    for m in &r.maglev_build {
        let target = if m.backends == 1000 && m.table_size == 65537 {
            if m.ms.median <= 2.0 {
                "  target <= 2 ms ok"
            } else {
                "  target <= 2 ms MISS"
            }
        } else {
            ""
        };
        out += &format!(
            "  N = {:>4}, M = {:>6}: {:>8.3} / {:>8.3}{target}\n",
            m.backends, m.table_size, m.ms.median, m.ms.min
        );
    }
    out += &format!(
        "\nHealth transition to table swap (rebuild + write + swap, M = 65537, 100 backends): median {:.3} ms, min {:.3} ms\n",
        r.health_transition_to_swap_ms.median, r.health_transition_to_swap_ms.min
    );
    for m in &r.memory {
        out += &format!("\nMap memory, {} (kernel memlock):\n", m.config);
        for (name, bytes) in &m.maps {
            out += &format!("  {name:<14} {:>14}\n", human(*bytes));
        }
        out += &format!("  {:<14} {:>14}\n", "total", human(m.total));
    }
    out
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
