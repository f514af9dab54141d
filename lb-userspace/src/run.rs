//! `lb run`: load (or adopt) the pinned program and maps, fill the maps,
//! attach, then react to health transitions, config reloads (SIGHUP or a
//! changed file) and neighbour changes until SIGINT or SIGTERM. Forwarding
//! outlives the process unless `--detach-on-exit` is given.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use aya::programs::XdpMode;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use crate::{
    config::{self, Config},
    dataplane::{Dataplane as _, aya::AyaDataplane},
    health::{Supervisor, Transition},
    loader::{self, Attached, Sizes},
    neighbour::NeighbourTable,
    reconcile::{Health, Neighbours, Reconciler, vip_key},
};

/// How long start-up waits for backend MACs before attaching anyway (the
/// program drops packets for unresolved backends, counted, until they resolve).
const RESOLVE_PATIENCE: Duration = Duration::from_secs(3);
/// How often the neighbour table is re-read and stale entries re-probed.
const NEIGHBOUR_REFRESH: Duration = Duration::from_secs(1);
/// How often the config file is checked for changes.
const CONFIG_POLL: Duration = Duration::from_secs(1);
/// How often the counters are written to the debug log.
const COUNTER_LOG: Duration = Duration::from_secs(10);

pub struct Options {
    pub config_path: PathBuf,
    /// Remove the attachment and the pinned maps on SIGINT/SIGTERM.
    pub detach_on_exit: bool,
}

pub fn sizes(config: &Config) -> Sizes {
    Sizes {
        table_size: config.table_size,
        max_vips: config.max_vips,
        max_flows: config.max_flows,
    }
}

/// Everything the loop owns. Only `reconciler` writes maps.
struct Daemon {
    config: Config,
    reconciler: Reconciler<AyaDataplane>,
    health: Health,
    neighbours: Neighbours,
    table: NeighbourTable,
    supervisor: Supervisor,
}

pub async fn run(config: Config, ifindex: u32, options: Options) -> anyhow::Result<()> {
    let pin = config.pin_path.clone();
    let adopting = loader::is_pinned(&pin);
    let mut ebpf = loader::load(sizes(&config), Some(&pin))?;
    let dp = AyaDataplane::new(&mut ebpf)?;
    let (reconciler, health) = if adopting {
        info!(pin_path = %pin.display(), "adopting the pinned program state of a previous run");
        Reconciler::adopt(dp, config.table_size, config.max_vips)?
    } else {
        (
            Reconciler::new(dp, config.table_size, config.max_vips),
            Health::new(),
        )
    };

    let table = NeighbourTable::connect().context("opening netlink")?;
    let wanted = backend_addresses(&config);
    let neighbours = table.resolve(&wanted, RESOLVE_PATIENCE).await?;
    for addr in wanted.iter().filter(|a| !neighbours.contains_key(a)) {
        warn!(backend = %addr, "MAC not resolved yet; packets for it are dropped until it is");
    }

    let (events, mut transitions) = mpsc::channel(256);
    let mut d = Daemon {
        config,
        reconciler,
        health,
        neighbours,
        table,
        supervisor: Supervisor::new(events),
    };
    d.reconciler.apply(&d.config, &d.health, &d.neighbours)?;

    let mode = match d.config.xdp_mode {
        config::XdpMode::Native => XdpMode::Driver,
        config::XdpMode::Generic => XdpMode::Skb,
    };
    let attached = loader::attach(&mut ebpf, ifindex, mode, &pin).with_context(|| {
        format!(
            "attaching to {} in {:?} mode",
            d.config.interface, d.config.xdp_mode
        )
    })?;
    info!(
        interface = %d.config.interface,
        mode = ?d.config.xdp_mode,
        vips = d.config.vips.len(),
        adopted = (attached == Attached::Replaced),
        "attached"
    );
    d.sync_probes();

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut last_text = std::fs::read_to_string(&options.config_path).ok();
    let mut config_poll = tokio::time::interval(CONFIG_POLL);
    let mut refresh = tokio::time::interval(NEIGHBOUR_REFRESH);
    let mut counters = tokio::time::interval(COUNTER_LOG);
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => d.reload(&options.config_path, "SIGHUP"),
            _ = config_poll.tick() => {
                let text = std::fs::read_to_string(&options.config_path).ok();
                if text != last_text {
                    last_text = text;
                    d.reload(&options.config_path, "file changed");
                }
            }
            Some(t) = transitions.recv() => d.on_transition(t),
            _ = refresh.tick() => d.refresh_neighbours().await,
            _ = counters.tick() => d.log_counters(),
        }
    }

    d.log_counters();
    if options.detach_on_exit {
        loader::remove_pins(&pin)?;
        info!(interface = %d.config.interface, "detached and removed the pinned state");
    } else {
        info!(
            pin_path = %pin.display(),
            "exiting; the XDP program keeps forwarding (`lb stop` detaches it)"
        );
    }
    Ok(())
}

impl Daemon {
    fn sync_probes(&mut self) {
        let health = &self.health;
        self.supervisor.sync(&self.config, |vip, addr| {
            health.get(&(*vip, addr)).copied().unwrap_or(true)
        });
    }

    fn on_transition(&mut self, t: Transition) {
        self.health.insert((t.vip, t.backend), t.up);
        match self
            .reconciler
            .apply(&self.config, &self.health, &self.neighbours)
        {
            Ok(swaps) => {
                for s in swaps {
                    info!(
                        vip = %s.vip,
                        backend = %t.backend,
                        up = t.up,
                        members = s.members,
                        all_down = s.all_down,
                        detection_to_swap_us = t.at.elapsed().as_micros() as u64,
                        "table swapped"
                    );
                }
            }
            Err(e) => error!(error = %e, "applying a health change failed"),
        }
    }

    /// Loads the file again; applies it only if it is valid and changes
    /// nothing that is fixed at start-up. Otherwise the running state stays.
    fn reload(&mut self, path: &Path, trigger: &str) {
        let new = match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                error!(%trigger, error = %e, "reload rejected; the running config stays");
                return;
            }
        };
        if new.fixed() != self.config.fixed() {
            error!(
                %trigger,
                "reload rejected: interface, xdp_mode, table_size, max_vips, flow_table.max_flows \
                 and pin_path are fixed while lb runs; the running config stays"
            );
            return;
        }
        // Health of backends that are gone is forgotten.
        let live: std::collections::BTreeSet<_> = new
            .vips
            .iter()
            .flat_map(|v| v.backends.iter().map(move |b| (vip_key(v), b.address)))
            .collect();
        self.health.retain(|k, _| live.contains(k));
        match self.reconciler.apply(&new, &self.health, &self.neighbours) {
            Ok(swaps) => {
                let rebuilt: Vec<&str> = swaps.iter().map(|s| s.vip.as_str()).collect();
                info!(%trigger, ?rebuilt, "config reloaded");
                self.config = new;
                self.sync_probes();
            }
            Err(e) => error!(%trigger, error = %e, "reload failed while applying"),
        }
    }

    async fn refresh_neighbours(&mut self) {
        let wanted = backend_addresses(&self.config);
        match self.table.refresh(&wanted).await {
            Ok(fresh) if fresh != self.neighbours => {
                log_changes(&self.neighbours, &fresh);
                match self.reconciler.apply(&self.config, &self.health, &fresh) {
                    Ok(_) => self.neighbours = fresh,
                    Err(e) => warn!(error = %e, "applying neighbour change failed; will retry"),
                }
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "reading the neighbour table failed"),
        }
    }

    fn log_counters(&self) {
        match self.reconciler.dataplane().counters() {
            Ok(c) => {
                for v in self.reconciler.traffic(&c) {
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

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
