//! `cargo xtask demo`: builds the L2 direct-server-return topology in fresh
//! network namespaces, runs `lb run` with config/demo.yaml, sends TCP and UDP
//! traffic from the client, prints how it was spread, and removes everything,
//! also when interrupted with Ctrl-C.

use std::{
    net::SocketAddr,
    path::Path,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::{Context as _, bail};
use lb_tests::{
    topology::{CLIENT, L2Topology, LB, TCP_PORT, UDP_PORT, VIP},
    traffic::{Tally, tcp_connections, udp_exchanges},
};
use lb_userspace::config::Config;

/// The embedded default configuration; its addresses match the topology.
const DEMO_CONFIG: &str = include_str!("../../../config/demo.yaml");
const FLOWS: usize = 1500;
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
    let web = config
        .vips
        .iter()
        .find(|v| v.port == TCP_PORT)
        .context("demo config: no TCP VIP")?;
    if web.address != VIP {
        bail!("config/demo.yaml must use the topology's VIP {VIP}");
    }
    let weights: Vec<(String, u32)> = web
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| (format!("b{}", i + 1), b.weight))
        .collect();
    for (i, b) in web.backends.iter().enumerate() {
        if b.address != lb_tests::topology::backend_address(i) {
            bail!(
                "config/demo.yaml backend {} must be {}",
                i,
                lb_tests::topology::backend_address(i)
            );
        }
    }

    let names: Vec<&str> = weights.iter().map(|w| w.0.as_str()).collect();
    println!(
        "Building the topology: client {CLIENT}, load balancer {LB}, backends {names:?}, VIP {VIP}"
    );
    let topo = L2Topology::new(&names)?;
    let mut lb = topo.start_lb(DEMO_CONFIG)?;
    println!(
        "lb attached (native XDP on eth0 in namespace {}).",
        topo.lb.name()
    );

    println!(
        "Sending {FLOWS} TCP connections to {VIP}:{TCP_PORT} and {FLOWS} UDP exchanges with {VIP}:{UDP_PORT}..."
    );
    let mut tcp = Tally::default();
    let mut udp = Tally::default();
    while tcp.attempts() < FLOWS && !interrupted.load(Ordering::SeqCst) {
        merge(
            &mut tcp,
            topo.client
                .enter(|| tcp_connections(SocketAddr::from((VIP, TCP_PORT)), BATCH))?,
        );
        merge(
            &mut udp,
            topo.client
                .enter(|| udp_exchanges(SocketAddr::from((VIP, UDP_PORT)), BATCH))?,
        );
    }
    if interrupted.load(Ordering::SeqCst) {
        println!("Interrupted; cleaning up.");
        return Ok(());
    }

    let total_weight: u32 = weights.iter().map(|w| w.1).sum();
    println!();
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
            lb_tests::topology::backend_address(i).to_string(),
            w,
            100.0 * *w as f64 / total_weight as f64,
            t,
            100.0 * t as f64 / answered(&tcp),
            u,
            100.0 * u as f64 / answered(&udp),
        );
    }
    println!(
        "failed: tcp {} of {}, udp {} of {}",
        tcp.failures,
        tcp.attempts(),
        udp.failures,
        udp.attempts()
    );
    println!(
        "Every answer came straight from a backend (direct server return): the load balancer's namespace does not forward IP."
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
        .take(3)
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

fn merge(into: &mut Tally, batch: Tally) {
    into.failures += batch.failures;
    for (k, v) in batch.by_backend {
        *into.by_backend.entry(k).or_default() += v;
    }
}
