//! `lb run`: load (or adopt) the pinned program and maps, fill the maps,
//! attach, then react to health transitions, config reloads (SIGHUP or a
//! changed file), neighbour changes and admin queries until SIGINT or SIGTERM.
//! Forwarding outlives the process unless `--detach-on-exit` is given.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use aya::programs::XdpMode;
use lb_common::VipKey;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use crate::{
    admin::{self, Admin, Query},
    config::{self, Config},
    dataplane::{Dataplane as _, aya::AyaDataplane},
    fd_limit,
    health::{Supervisor, Transition},
    loader::{self, Attached},
    metrics::Metrics,
    model::{Health, Neighbours},
    neighbour::{NeighbourTable, Wanted},
    reconcile::{Reconciler, Swap, backend_keys},
    status::{self, Status},
    xdp_owner,
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

/// Everything the loop owns. Only `reconciler` writes maps.
struct Daemon {
    config: Config,
    reconciler: Reconciler<AyaDataplane>,
    health: Health,
    neighbours: Neighbours,
    table: NeighbourTable,
    supervisor: Supervisor,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    attached: bool,
    /// New-flow counters at the previous scrape (the skew window's start).
    scraped_new_flows: BTreeMap<(VipKey, IpAddr), u64>,
}

pub async fn run(config: Config, ifindex: u32, options: Options) -> anyhow::Result<()> {
    match fd_limit::raise() {
        Ok((soft, _)) => debug!(open_files = soft, "open-file limit"),
        Err(e) => warn!(error = %e, "could not raise the open-file limit"),
    }
    // Held until exit: one control plane per pinned state (`lb stop` checks
    // it too).
    let _lock = loader::lock(&config.pin_path)?;
    // Until attached, a failure removes what this start pinned.
    let fresh = loader::FreshPins::watch(&config.pin_path);
    // The admin listener comes first, so `/ready` answers 503 while starting.
    let listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("admin.listen {}: cannot listen", config.admin_listen))?;
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let (queries, mut requests) = mpsc::channel::<Query>(16);
    Admin {
        ready: ready.clone(),
        queries,
        metrics: metrics.clone(),
    }
    .spawn(
        listener,
        admin::Limits::new(config.admin_max_connections as usize),
    );
    info!(listen = %config.admin_listen, "admin listener up");

    let pin = config.pin_path.clone();
    // Attaching would fail anyway, but only after pinning the maps.
    if !loader::link_is_pinned(&pin)
        && let Some(id) = xdp_owner::attached_program(ifindex).await?
    {
        anyhow::bail!(
            "{} already runs XDP program {id}, not attached through pin_path {}: \
             another lb (with another pin_path) or another XDP tool has it; detach that first",
            config.interface,
            pin.display()
        );
    }
    let adopting = loader::is_pinned(&pin);
    let mut ebpf = loader::load(config.sizes(), Some(&pin))?;
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
    let wanted = wanted(&config);
    let neighbours = table.resolve(&wanted, RESOLVE_PATIENCE).await?;
    for addr in wanted.all().filter(|a| !neighbours.contains_key(a)) {
        warn!(backend = %addr, "MAC not resolved yet; packets for it are dropped until it is");
    }

    let (events, mut transitions) = mpsc::channel(256);
    let mut d = Daemon {
        config,
        reconciler,
        health,
        neighbours,
        table,
        supervisor: Supervisor::new(events, metrics.clone()),
        metrics,
        ready,
        attached: false,
        scraped_new_flows: BTreeMap::new(),
    };
    let swaps = d.reconciler.apply(&d.config, &d.health, &d.neighbours)?;
    d.record(&swaps);
    d.metrics.reloaded(true);

    let mode = match d.config.xdp_mode {
        config::XdpMode::Native => XdpMode::Driver,
        config::XdpMode::Generic => XdpMode::Skb,
    };
    let attached = loader::attach(&mut ebpf, ifindex, mode, &pin).with_context(|| {
        format!(
            "attaching to {} in {} mode",
            d.config.interface, d.config.xdp_mode
        )
    })?;
    fresh.keep();
    d.attached = true;
    d.ready.store(true, Ordering::SeqCst);
    info!(
        interface = %d.config.interface,
        mode = %d.config.xdp_mode,
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
    // Set when a shutdown starts: the loop keeps serving until then.
    let mut leave_at: Option<tokio::time::Instant> = None;
    loop {
        // A VIP whose rebuild came within its retired half's grace is
        // applied again once the grace is over.
        let deferred = d
            .reconciler
            .next_deadline()
            .map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = sleep_until(leave_at) => break,
            _ = sleep_until(deferred) => d.apply_deferred(),
            _ = sigint.recv(), if leave_at.is_none() => leave_at = Some(d.begin_shutdown()),
            _ = sigterm.recv(), if leave_at.is_none() => leave_at = Some(d.begin_shutdown()),
            _ = sighup.recv() => d.reload(&options.config_path, "SIGHUP"),
            _ = config_poll.tick() => {
                let text = std::fs::read_to_string(&options.config_path).ok();
                if text != last_text {
                    last_text = text;
                    d.reload(&options.config_path, "file changed");
                }
            }
            Some(t) = transitions.recv() => d.on_transition(t),
            Some(q) = requests.recv() => {
                if let Some(s) = d.status(q.scrape) {
                    let _ = q.reply.send(s);
                }
            }
            _ = refresh.tick() => {
                d.refresh_neighbours().await;
                d.check_attachment(&pin, leave_at.is_some());
            }
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
    /// Notices an attachment removed behind our back (`lb stop`, or the
    /// interface deleted), so metrics and `/ready` tell the truth.
    fn check_attachment(&mut self, pin: &Path, shutting_down: bool) {
        let Some(exists) = interface_exists(&self.config.interface) else {
            return;
        };
        let attached = loader::link_is_pinned(pin) && exists;
        if attached != self.attached {
            if attached {
                info!(interface = %self.config.interface, "attachment is back");
            } else {
                error!(interface = %self.config.interface, "the XDP program is no longer attached");
            }
            self.attached = attached;
            // Once a shutdown started, /ready stays 503 whatever happens.
            if !shutting_down {
                self.ready.store(attached, Ordering::SeqCst);
            }
        }
    }

    /// Stops advertising readiness; returns when to leave.
    fn begin_shutdown(&mut self) -> tokio::time::Instant {
        self.ready.store(false, Ordering::SeqCst);
        info!(grace = ?self.config.shutdown_grace, "shutting down; /ready now answers 503");
        tokio::time::Instant::now() + self.config.shutdown_grace
    }

    fn sync_probes(&mut self) {
        let health = &self.health;
        self.supervisor.sync(&self.config, |vip, addr| {
            health.get(&(*vip, addr)).copied().unwrap_or(true)
        });
    }

    /// Counts table swaps in the metrics.
    fn record(&self, swaps: &[Swap]) {
        for s in swaps {
            let Some(v) = self.config.vips.iter().find(|v| v.key == s.vip) else {
                continue;
            };
            self.metrics
                .table_built(&v.endpoint().to_string(), v.protocol.as_str(), s.build);
        }
    }

    fn on_transition(&mut self, t: Transition) {
        if !self.supervisor.is_current(&t) {
            debug!(backend = %t.backend, "ignoring a transition from a stopped probe task");
            return;
        }
        self.health.insert((t.vip, t.backend), t.up);
        match self
            .reconciler
            .apply(&self.config, &self.health, &self.neighbours)
        {
            Ok(swaps) => {
                for s in &swaps {
                    info!(
                        vip = %s.name,
                        backend = %t.backend,
                        up = t.up,
                        members = s.members,
                        all_down = s.all_down,
                        detection_to_swap_us = t.at.elapsed().as_micros() as u64,
                        "table swapped"
                    );
                }
                self.record(&swaps);
            }
            Err(e) => error!(error = %e, "applying a health change failed"),
        }
    }

    /// Applies again once the grace of a deferred VIP's retired table half
    /// is over.
    fn apply_deferred(&mut self) {
        match self
            .reconciler
            .apply(&self.config, &self.health, &self.neighbours)
        {
            Ok(swaps) => {
                for s in &swaps {
                    info!(vip = %s.name, members = s.members, all_down = s.all_down, "deferred table swap done");
                }
                self.record(&swaps);
            }
            Err(e) => error!(error = %e, "applying a deferred table swap failed"),
        }
    }

    /// Loads the file again; applies it only if it is valid and changes
    /// nothing that is fixed at start-up. Otherwise the running state stays.
    fn reload(&mut self, path: &Path, trigger: &str) {
        let new = match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                error!(%trigger, error = %e, "reload rejected; the running config stays");
                self.metrics.reloaded(false);
                return;
            }
        };
        let changed = self.config.fixed().changed(&new.fixed());
        if !changed.is_empty() {
            error!(
                %trigger,
                "reload rejected: {} cannot change while lb runs; the running config stays",
                changed.join(", ")
            );
            self.metrics.reloaded(false);
            return;
        }
        match self.reconciler.apply(&new, &self.health, &self.neighbours) {
            Ok(swaps) => {
                let rebuilt: Vec<&str> = swaps.iter().map(|s| s.name.as_str()).collect();
                info!(%trigger, ?rebuilt, "config reloaded");
                // Health and metric series of backends and VIPs that are gone
                // are forgotten.
                let live = backend_keys(&new);
                self.health.retain(|k, _| live.contains(k));
                let gone = self
                    .config
                    .vips
                    .iter()
                    .filter(|v| !new.vips.iter().any(|n| n.key == v.key));
                for v in gone {
                    self.metrics
                        .forget_vip(&v.endpoint().to_string(), v.protocol.as_str());
                }
                self.config = new;
                self.record(&swaps);
                self.sync_probes();
                self.metrics.reloaded(true);
            }
            Err(e) => {
                error!(%trigger, error = %e, "reload failed while applying");
                self.metrics.reloaded(false);
            }
        }
    }

    /// A snapshot for the admin listener; a scrape also restarts the skew
    /// window. `None` when the counters cannot be read.
    fn status(&mut self, scrape: bool) -> Option<Status> {
        let counters = match self.reconciler.dataplane().counters() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "reading counters failed");
                return None;
            }
        };
        let s = status::build(&status::Inputs {
            config: &self.config,
            health: &self.health,
            counters: &counters,
            applied: self.reconciler.applied(),
            attached: self.attached,
            ready: self.ready.load(Ordering::SeqCst),
            previous_new_flows: &self.scraped_new_flows,
        });
        if scrape {
            self.scraped_new_flows = status::new_flows(&s, &self.config);
        }
        Some(s)
    }

    async fn refresh_neighbours(&mut self) {
        match self.table.refresh(&wanted(&self.config)).await {
            Ok(fresh) if fresh != self.neighbours => {
                log_changes(&self.neighbours, &fresh);
                match self.reconciler.apply(&self.config, &self.health, &fresh) {
                    Ok(swaps) => {
                        self.record(&swaps);
                        self.neighbours = fresh;
                    }
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
                for v in status::traffic(self.reconciler.applied(), &c) {
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

/// Sleeps until `at`; forever when `None`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether interface `name` exists; `None` when the kernel could not be
/// asked (the query needs a socket, and descriptors can run out).
fn interface_exists(name: &str) -> Option<bool> {
    let Ok(c) = std::ffi::CString::new(name) else {
        return Some(false);
    };
    // SAFETY: a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::if_nametoindex(c.as_ptr()) } != 0 {
        return Some(true);
    }
    (std::io::Error::last_os_error().raw_os_error() == Some(libc::ENODEV)).then_some(false)
}

/// The backends to resolve, by how they are reached.
fn wanted(config: &Config) -> Wanted {
    let mut w = Wanted::default();
    for v in &config.vips {
        let list = match v.forwarding {
            config::Forwarding::L2 => &mut w.direct,
            config::Forwarding::Ipip => &mut w.routed,
        };
        list.extend(v.backends.iter().map(|b| b.address));
    }
    for list in [&mut w.direct, &mut w.routed] {
        list.sort();
        list.dedup();
    }
    w
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
