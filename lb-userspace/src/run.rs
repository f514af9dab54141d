//! `lb run`: load, fill the maps, attach, keep backend MACs current, log
//! counters, and detach cleanly on SIGINT or SIGTERM.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::Context as _;
use aya::programs::XdpMode;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

use crate::{
    config::{self, Config},
    dataplane::{Dataplane as _, aya::AyaDataplane},
    loader,
    neighbour::NeighbourTable,
    reconcile::{Neighbours, Reconciler},
};

/// How long start-up waits for backend MACs before attaching anyway (the
/// program drops packets for unresolved backends, counted, until they resolve).
const RESOLVE_PATIENCE: Duration = Duration::from_secs(3);
/// How often the neighbour table is re-read and stale entries re-probed.
const NEIGHBOUR_REFRESH: Duration = Duration::from_secs(1);
/// How often the counters are written to the debug log.
const COUNTER_LOG: Duration = Duration::from_secs(10);

pub async fn run(config: Config, ifindex: u32) -> anyhow::Result<()> {
    let mut ebpf = loader::load(config.table_size, config.max_vips)?;
    let mut reconciler = Reconciler::new(
        AyaDataplane::new(&mut ebpf)?,
        config.table_size,
        config.max_vips,
    );

    let table = NeighbourTable::connect().context("opening netlink")?;
    let wanted = backend_addresses(&config);
    let mut neighbours = table.resolve(&wanted, RESOLVE_PATIENCE).await?;
    for addr in wanted.iter().filter(|a| !neighbours.contains_key(a)) {
        warn!(backend = %addr, "MAC not resolved yet; packets for it are dropped until it is");
    }
    reconciler.apply(&config, &neighbours)?;

    let mode = match config.xdp_mode {
        config::XdpMode::Native => XdpMode::Driver,
        config::XdpMode::Generic => XdpMode::Skb,
    };
    let link = loader::program(&mut ebpf)?
        .attach_to_if_index(ifindex, mode)
        .with_context(|| {
            format!(
                "attaching to {} in {:?} mode",
                config.interface, config.xdp_mode
            )
        })?;
    info!(interface = %config.interface, mode = ?config.xdp_mode, vips = config.vips.len(), "attached");

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut refresh = tokio::time::interval(NEIGHBOUR_REFRESH);
    let mut counters = tokio::time::interval(COUNTER_LOG);
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = refresh.tick() => match table.refresh(&wanted).await {
                Ok(fresh) if fresh != neighbours => {
                    log_changes(&neighbours, &fresh);
                    match reconciler.apply(&config, &fresh) {
                        Ok(()) => neighbours = fresh,
                        Err(e) => warn!(error = %e, "applying neighbour change failed; will retry"),
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "reading the neighbour table failed"),
            },
            _ = counters.tick() => log_counters(&reconciler),
        }
    }

    log_counters(&reconciler);
    loader::program(&mut ebpf)?.detach(link)?;
    info!(interface = %config.interface, "detached");
    Ok(())
}

fn backend_addresses(config: &Config) -> Vec<Ipv4Addr> {
    let mut all: Vec<Ipv4Addr> = config
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(|b| b.address))
        .collect();
    all.sort();
    all.dedup();
    all
}

fn log_changes(old: &Neighbours, new: &Neighbours) {
    for (addr, n) in new {
        if old.get(addr) != Some(n) {
            info!(backend = %addr, mac = %mac(&n.mac), ifindex = n.ifindex, "backend MAC resolved");
        }
    }
    for addr in old.keys().filter(|a| !new.contains_key(a)) {
        warn!(backend = %addr, "backend MAC lost");
    }
}

fn log_counters(reconciler: &Reconciler<AyaDataplane>) {
    match reconciler.dataplane().counters() {
        Ok(c) => {
            for v in reconciler.traffic(&c) {
                let backends: Vec<String> = v
                    .backends
                    .iter()
                    .map(|(a, t)| format!("{a}={}p/{}B", t.packets, t.bytes))
                    .collect();
                debug!(vip = %v.name, packets = v.total.packets, bytes = v.total.bytes, backends = %backends.join(" "), "vip counters");
            }
            debug!(counters = ?c.nonzero_stats(), "program counters");
        }
        Err(e) => warn!(error = %e, "reading counters failed"),
    }
}

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
