//! `cargo xtask demo`: builds the L2 direct-server-return topology in fresh
//! network namespaces, runs `lb run` with config/demo.yaml, sends TCP and UDP
//! traffic from the client to the IPv4 and the IPv6 VIP, prints how it was
//! spread, and removes everything, also when interrupted with Ctrl-C.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::{Context as _, bail};
use lb_tests::{
    addresses::{
        CLIENT, CLIENT6, LB, LB6, TCP_PORT, UDP_PORT, VIP, VIP6, backend_address, backend_address6,
    },
    topology::L2Topology,
    traffic::{Tally, tcp_connections, udp_exchanges},
};
use lb_userspace::config::Config;

/// The embedded default configuration; its addresses match the topology.
const DEMO_CONFIG: &str = include_str!("../../../config/demo.yaml");
const FLOWS: usize = 1500;
/// The i-th backend's address in one family.
type BackendAddress = fn(usize) -> IpAddr;
/// Traffic is sent in batches so Ctrl-C is noticed within one batch.
const BATCH: usize = 100;

fn main() -> ExitCode {
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    if let Err(e) = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)) {
        eprintln!("demo: cannot handle Ctrl-C: {e}");
        return ExitCode::FAILURE;
    }
    // Everything the demo creates lives inside `demo()` and is removed when it
    // returns, whichever way it returns.
    let result = demo(&interrupted);
    println!("Removed the demo's namespaces and stopped lb.");
    match result {
        Ok(()) if interrupted.load(Ordering::SeqCst) => ExitCode::from(130),
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo(interrupted: &AtomicBool) -> anyhow::Result<()> {
    let config = Config::parse(DEMO_CONFIG, Path::new("config/demo.yaml"))?;
    // Both families: the VIP and the i-th backend's address in each.
    let families: [(IpAddr, BackendAddress); 2] = [
        (VIP.into(), |i| backend_address(i).into()),
        (VIP6.into(), |i| backend_address6(i).into()),
    ];
    let mut weights: Vec<(String, u32)> = Vec::new();
    for (vip, backend) in families {
        let web = config
            .vips
            .iter()
            .find(|v| v.port == TCP_PORT && v.address == vip)
            .with_context(|| format!("config/demo.yaml needs a TCP VIP on {vip}"))?;
        weights = web
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| (format!("b{}", i + 1), b.weight))
            .collect();
        for (i, b) in web.backends.iter().enumerate() {
            if b.address != backend(i) {
                bail!(
                    "config/demo.yaml backend {i} of {vip} must be {}",
                    backend(i)
                );
            }
        }
    }

    let names: Vec<&str> = weights.iter().map(|w| w.0.as_str()).collect();
    println!(
        "Building the topology: client {CLIENT} / {CLIENT6}, load balancer {LB} / {LB6}, \
         backends {names:?}, VIPs {VIP} and {VIP6}"
    );
    let topo = L2Topology::new(&names)?;
    let mut lb = topo.start_lb(DEMO_CONFIG)?;
    println!(
        "lb attached (native XDP on eth0 in namespace {}).",
        topo.lb.name()
    );

    for (vip, backend) in families {
        let (tcp, udp) = send(&topo, vip, interrupted)?;
        if interrupted.load(Ordering::SeqCst) {
            println!("Interrupted; cleaning up.");
            return Ok(());
        }
        print_spread(&weights, backend, &tcp, &udp);
    }
    println!(
        "Every answer came straight from a backend (direct server return): the load balancer's namespace forwards neither IPv4 nor IPv6."
    );

    let (status, log) = lb.terminate()?;
    lb.lb_stop()?;
    println!("lb stopped on SIGTERM ({status}); `lb stop` detached the program.");
    // lb logs its counters (per VIP, per backend, per verdict) at debug level,
    // last of all as it shuts down.
    println!("\nThe XDP program's own counters, as lb logged them on shutdown:");
    for line in log
        .lines()
        .filter(|l| l.contains("counters"))
        .rev()
        .take(config.vips.len() + 1)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        println!(
            "  {}",
            line.split_once("run: ").map_or(line, |(_, rest)| rest)
        );
    }
    Ok(())
}

/// FLOWS TCP connections and FLOWS UDP exchanges from the client to `vip`.
fn send(
    topo: &L2Topology,
    vip: IpAddr,
    interrupted: &AtomicBool,
) -> anyhow::Result<(Tally, Tally)> {
    println!(
        "\nSending {FLOWS} TCP connections to {} and {FLOWS} UDP exchanges with {}...",
        SocketAddr::new(vip, TCP_PORT),
        SocketAddr::new(vip, UDP_PORT)
    );
    let mut tcp = Tally::default();
    let mut udp = Tally::default();
    while tcp.attempts() < FLOWS && !interrupted.load(Ordering::SeqCst) {
        merge(
            &mut tcp,
            topo.client
                .enter(move || tcp_connections(SocketAddr::new(vip, TCP_PORT), BATCH))?,
        );
        merge(
            &mut udp,
            topo.client
                .enter(move || udp_exchanges(SocketAddr::new(vip, UDP_PORT), BATCH))?,
        );
    }
    Ok((tcp, udp))
}

/// Each backend's share of `tcp` and `udp` next to its weight's share.
fn print_spread(weights: &[(String, u32)], address: BackendAddress, tcp: &Tally, udp: &Tally) {
    let total_weight: u32 = weights.iter().map(|w| w.1).sum();
    println!(
        "{:<8} {:<12} {:>6} {:>9} {:>10} {:>9} {:>12} {:>9}",
        "backend",
        "address",
        "weight",
        "expected",
        "tcp conns",
        "tcp share",
        "udp answers",
        "udp share"
    );
    let answered = |t: &Tally| t.by_backend.values().sum::<usize>().max(1) as f64;
    for (i, (name, w)) in weights.iter().enumerate() {
        let (t, u) = (
            tcp.by_backend.get(name).copied().unwrap_or(0),
            udp.by_backend.get(name).copied().unwrap_or(0),
        );
        println!(
            "{:<8} {:<12} {:>6} {:>8.1}% {:>10} {:>8.1}% {:>12} {:>8.1}%",
            name,
            address(i).to_string(),
            w,
            100.0 * *w as f64 / total_weight as f64,
            t,
            100.0 * t as f64 / answered(tcp),
            u,
            100.0 * u as f64 / answered(udp),
        );
    }
    println!(
        "failed: tcp {} of {}, udp {} of {}",
        tcp.failures,
        tcp.attempts(),
        udp.failures,
        udp.attempts()
    );
}

fn merge(into: &mut Tally, batch: Tally) {
    into.failures += batch.failures;
    for (k, v) in batch.by_backend {
        *into.by_backend.entry(k).or_default() += v;
    }
}
