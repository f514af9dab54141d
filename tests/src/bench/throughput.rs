//! Packets per second through a veth pair, the load balancer against the
//! trivial XDP_TX program on the same rig.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, XdpMode, xdp::XdpLinkId},
};
use lb_userspace::{
    config::Config,
    dataplane::aya::AyaDataplane,
    loader::{self, BASELINE_OBJECT},
    model::{Health, Neighbour, Neighbours},
    reconcile::Reconciler,
};
use serde::Serialize;

use super::{
    Settings, Stats,
    cpu::{bench_cpu, pin_to_cpu},
    instance::{TRIVIAL_TX, baseline, xdp},
};
use crate::{addresses::VIP, netns::Netns};

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub lb_pps: Stats,
    pub trivial_tx_pps: Stats,
    pub ratio: Stats,
    pub frames_per_round: u32,
    pub cpu: String,
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

    // Loaded (not attached) in the load balancer's namespace; the reconciler
    // keeps the maps' control-plane view alive for the whole benchmark.
    let (lb, _reconciler) = lb_ns.enter(move || load_lb(gen_mac, lb_mac))??;
    let mut under = [
        UnderTest::new(lb, lb_common::PROGRAM_NAME),
        UnderTest::new(baseline(TRIVIAL_TX)?, TRIVIAL_TX),
    ];
    let mut generator = gen_ns.enter(Generator::load)??;

    let mut frame = Vec::new();
    etherparse::PacketBuilder::ethernet2(gen_mac, lb_mac)
        .ipv4(GENERATOR.octets(), VIP.octets(), 64)
        .udp(1024, 5353)
        .write(&mut frame, &[0u8; 18])?;

    let cpu = bench_cpu();
    for _round in 0..s.rounds {
        for program in under.iter_mut() {
            let link = program.attach(&lb_ns)?;
            let before = generator.received()?;
            let elapsed;
            (generator, elapsed) = generator.send(&gen_ns, &frame, s.throughput_frames, cpu)?;
            // Let the last batch drain through both veth queues.
            std::thread::sleep(Duration::from_millis(50));
            let pps = (generator.received()? - before) as f64 / elapsed.as_secs_f64();
            program.detach(link)?;
            program.pps.push(pps);
        }
    }
    let [lb, trivial] = under;
    let ratios = lb
        .pps
        .iter()
        .zip(&trivial.pps)
        .map(|(l, t)| l / t)
        .collect();
    Ok(Throughput {
        lb_pps: Stats::of(lb.pps),
        trivial_tx_pps: Stats::of(trivial.pps),
        ratio: Stats::of(ratios),
        frames_per_round: s.throughput_frames,
        cpu: format!(
            "generator, program under test and receiver all on CPU {cpu} (veth runs XDP in the sender's NAPI context)"
        ),
    })
}

/// The generator's address: the load balancer's single backend.
const GENERATOR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

/// The load balancer with one UDP VIP whose single backend is the
/// generator, loaded in the calling thread's namespace; and the reconciler
/// that filled its maps.
fn load_lb(gen_mac: [u8; 6], lb_mac: [u8; 6]) -> anyhow::Result<(Ebpf, Reconciler<AyaDataplane>)> {
    let text = format!(
        "interface: eth0\nmaglev: {{ table_size: 65537 }}\nvips:\n  - name: bench\n    address: {VIP}\n    port: 5353\n    \
         protocol: udp\n    forwarding: l2\n    backends:\n      - {{ address: {GENERATOR}, weight: 1 }}\n"
    );
    let config = Config::parse(&text, std::path::Path::new("bench.yaml"))?;
    let ifindex = nix::net::if_::if_nametoindex("eth0")?;
    let mut ebpf = loader::load(config.sizes(), None)?;
    let mut reconciler = Reconciler::new(
        AyaDataplane::new(&mut ebpf)?,
        config.table_size,
        config.max_vips,
    );
    let neighbours = Neighbours::from([(
        GENERATOR.into(),
        Neighbour {
            ifindex,
            mac: gen_mac,
            src_mac: lb_mac,
            src_addr: None,
            mtu: 0,
        },
    )]);
    reconciler.apply(&config, &Health::new(), &neighbours)?;
    Ok((ebpf, reconciler))
}

/// A program measured on the load balancer's end of the pair, and the pps
/// it achieved in each round.
struct UnderTest {
    /// Out only while it travels to the namespace's thread and back.
    ebpf: Option<Ebpf>,
    program: &'static str,
    pps: Vec<f64>,
}

impl UnderTest {
    fn new(ebpf: Ebpf, program: &'static str) -> UnderTest {
        UnderTest {
            ebpf: Some(ebpf),
            program,
            pps: Vec::new(),
        }
    }

    /// Attaches the program to `eth0` in `ns`.
    fn attach(&mut self, ns: &Netns) -> anyhow::Result<XdpLinkId> {
        let ebpf = self.ebpf.take().context("program object")?;
        let name = self.program;
        // Attaching resolves the interface in the caller's namespace, so
        // the object travels to a thread there and back.
        let (ebpf, link) = ns.enter(move || -> anyhow::Result<_> {
            let mut ebpf = ebpf;
            let link = xdp(&mut ebpf, name)?.attach("eth0", XdpMode::Driver)?;
            Ok((ebpf, link))
        })??;
        self.ebpf = Some(ebpf);
        Ok(link)
    }

    fn detach(&mut self, link: XdpLinkId) -> anyhow::Result<()> {
        let ebpf = self.ebpf.as_mut().context("program object")?;
        Ok(xdp(ebpf, self.program)?.detach(link)?)
    }
}

/// The generator's programs: `xdp_gen` sends, `xdp_count_drop` on g0
/// counts what comes back.
struct Generator {
    ebpf: Ebpf,
    ifindex: u32,
}

impl Generator {
    /// Loads both programs and attaches the counter; in the generator's
    /// namespace.
    fn load() -> anyhow::Result<Generator> {
        let mut ebpf = Ebpf::load(BASELINE_OBJECT)?;
        for name in ["xdp_gen", "xdp_count_drop"] {
            xdp(&mut ebpf, name)?.load()?;
        }
        xdp(&mut ebpf, "xdp_count_drop")?.attach("g0", XdpMode::Driver)?;
        Ok(Generator {
            ebpf,
            ifindex: nix::net::if_::if_nametoindex("g0")?,
        })
    }

    /// Sends `frames` copies of `frame` out of g0 from a thread in `ns`
    /// pinned to `cpu`; how long that took.
    fn send(
        self,
        ns: &Netns,
        frame: &[u8],
        frames: u32,
        cpu: usize,
    ) -> anyhow::Result<(Generator, Duration)> {
        let frame = frame.to_vec();
        ns.enter(move || -> anyhow::Result<(Generator, Duration)> {
            pin_to_cpu(cpu)?;
            let mut g = self;
            // struct xdp_md: the frames enter on g0, so XDP_TX sends them out of it.
            let md: Vec<u8> = [0u32, frame.len() as u32, 0, g.ifindex, 0, 0]
                .iter()
                .flat_map(|w| w.to_ne_bytes())
                .collect();
            let p = xdp(&mut g.ebpf, "xdp_gen")?;
            let start = Instant::now();
            p.test_run(TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(&md),
                repeat: frames,
                attrs: TestRunAttrs::new().xdp_live_frames(64),
                ..TestRunOptions::default()
            })?;
            let elapsed = start.elapsed();
            Ok((g, elapsed))
        })?
    }

    /// Frames counted on g0 so far.
    fn received(&self) -> anyhow::Result<u64> {
        let map = self.ebpf.map("BENCH_COUNTS").context("BENCH_COUNTS")?;
        let counts = PerCpuArray::<_, u64>::try_from(map)?;
        Ok(counts.get(&1, 0)?.iter().sum())
    }
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
