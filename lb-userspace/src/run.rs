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
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::programs::XdpMode;
use lb_common::VipKey;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

mod bgp;
mod config_change;

use config_change::Pending;

use crate::{
    admin::{self, Admin, Query},
    bgp::{
        Decider,
        shutdown::{Shutdown, Step},
    },
    config::{self, Config},
    dataplane::{Dataplane as _, aya::AyaDataplane},
    fd_limit,
    health::{Supervisor, Transition},
    loader::{self, Attached},
    metrics::Metrics,
    model::{Health, Neighbours},
    neighbour::{self, NeighbourTable, Wanted},
    reconcile::{Reconciler, Swap, TableJob},
    reload::{self, ConfigStatus, Watch},
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
/// How often the BGP decisions are taken again (`announce_after` ends
/// between events too).
const BGP_DECIDE: Duration = Duration::from_millis(100);
/// How often the counters are written to the debug log.
const COUNTER_LOG: Duration = Duration::from_secs(10);

pub struct Options {
    pub config_path: PathBuf,
    /// Remove the attachment and the pinned maps on SIGINT/SIGTERM.
    pub detach_on_exit: bool,
}

/// Longest wait between attempts to apply a change that failed.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Everything the loop owns. Only `reconciler` writes maps.
struct Daemon {
    /// The config the maps express (applied whole).
    config: Config,
    /// A valid config taken up but not yet applied whole, retried.
    pending: Option<Pending>,
    /// When to apply again after a failed apply.
    retry_at: Option<Instant>,
    /// Failed applies in a row (the retry backoff).
    failures_in_a_row: u32,
    config_status: ConfigStatus,
    reconciler: Reconciler<AyaDataplane>,
    health: Health,
    neighbours: Neighbours,
    table: NeighbourTable,
    supervisor: Supervisor,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    attached: bool,
    /// Per VIP: announce over BGP or not.
    bgp: Decider,
    /// New-flow counters at the previous scrape (the skew window's start).
    scraped_new_flows: BTreeMap<(VipKey, IpAddr), u64>,
}

pub async fn run(config: Config, mut ifindex: u32, options: Options) -> anyhow::Result<()> {
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
    let wanted = Wanted::of(&config);
    let neighbours = table.resolve(&wanted, RESOLVE_PATIENCE).await?;
    for addr in wanted.all().filter(|a| !neighbours.contains_key(a)) {
        warn!(backend = %addr, "MAC not resolved yet; packets for it are dropped until it is");
    }

    // Room for a transition of every backend, so a burst of failures never
    // makes probes wait to report.
    let (events, mut transitions) = mpsc::channel(2 * lb_common::MAX_BACKENDS as usize);
    let started_with = reload::read(&options.config_path).await.ok();
    let mut d = Daemon {
        config,
        pending: None,
        retry_at: None,
        failures_in_a_row: 0,
        config_status: ConfigStatus {
            applied_sha256: started_with
                .as_deref()
                .map(reload::digest)
                .unwrap_or_default(),
            ..ConfigStatus::default()
        },
        reconciler,
        health,
        neighbours,
        table,
        supervisor: Supervisor::new(events, metrics.clone()),
        metrics,
        ready,
        attached: false,
        bgp: Decider::default(),
        scraped_new_flows: BTreeMap::new(),
    };
    d.build_tables().await;
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
    let mut watch = Watch::new(options.config_path.clone(), started_with);
    let mut config_poll = tokio::time::interval(CONFIG_POLL);
    let mut refresh = tokio::time::interval(NEIGHBOUR_REFRESH);
    let mut counters = tokio::time::interval(COUNTER_LOG);
    let mut bgp_decide = tokio::time::interval(BGP_DECIDE);
    // Set when a shutdown starts: the loop keeps serving until it exits.
    let mut shutdown: Option<Shutdown> = None;
    loop {
        let next_step = shutdown.map(|s| s.next());
        // Apply again when a VIP whose rebuild came within its retired
        // half's grace may be rebuilt, or when a failed apply is retried.
        let again = [d.reconciler.next_deadline(), d.retry_at]
            .into_iter()
            .flatten()
            .min()
            .map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = sleep_until(next_step.map(|(at, _)| tokio::time::Instant::from_std(at))) => {
                match (shutdown.as_mut(), next_step) {
                    (Some(s), Some((_, Step::Withdraw))) => {
                        d.withdraw_all();
                        s.done(Step::Withdraw);
                    }
                    _ => break,
                }
            }
            _ = sleep_until(again) => {
                d.retry_at = None;
                d.converge(&[]).await;
            }
            _ = sigint.recv(), if shutdown.is_none() => shutdown = Some(d.begin_shutdown()),
            _ = sigterm.recv(), if shutdown.is_none() => shutdown = Some(d.begin_shutdown()),
            _ = sighup.recv() => match watch.read_now().await {
                Ok(text) => d.reload(text, watch.path(), "SIGHUP").await,
                Err(e) => d.reject("SIGHUP", e),
            },
            _ = config_poll.tick() => {
                if let Some(text) = watch.poll().await {
                    d.reload(text, watch.path(), "file changed").await;
                }
            }
            Some(t) = transitions.recv() => {
                // Everything that arrived together is one change: each VIP
                // is rebuilt at most once per burst.
                let mut burst = vec![t];
                while let Ok(t) = transitions.try_recv() {
                    burst.push(t);
                }
                d.on_transitions(burst).await;
            }
            Some(q) = requests.recv() => {
                if let Some(s) = d.status(q.scrape) {
                    let _ = q.reply.send(s);
                }
            }
            _ = refresh.tick() => {
                d.refresh_neighbours().await;
                if let Some(index) = d.check_attachment(&pin, ifindex, shutdown.is_some()) {
                    match loader::attach(&mut ebpf, index, mode, &pin) {
                        Ok(how) => {
                            info!(interface = %d.config.interface, ifindex = index, ?how, "attached to the re-created interface; maps and flows kept");
                            ifindex = index;
                            d.set_attached(true, false);
                        }
                        Err(e) => error!(interface = %d.config.interface, error = %e, "attaching to the re-created interface failed; retrying"),
                    }
                }
            }
            _ = counters.tick() => d.log_counters(),
            // The decisions are taken below, after every event.
            _ = bgp_decide.tick() => {}
        }
        d.decide_bgp();
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
    ///
    /// An interface of the same name that came back under another index
    /// (a re-created veth, a driver reload) needs a new link: its index is
    /// returned for the caller to attach to.
    fn check_attachment(&mut self, pin: &Path, ifindex: u32, shutting_down: bool) -> Option<u32> {
        // Unknown (no descriptor to ask with): keep the last state.
        let index = interface_index(&self.config.interface)?;
        let attached = loader::link_is_pinned(pin) && index == Some(ifindex);
        self.set_attached(attached, shutting_down);
        index.filter(|&i| i != ifindex && !shutting_down)
    }

    fn set_attached(&mut self, attached: bool, shutting_down: bool) {
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

    /// Health transitions that arrived together: recorded, then applied in
    /// one go. Each swap is logged once per transition it carries, with the
    /// time from that transition's deciding probe to the swap.
    async fn on_transitions(&mut self, burst: Vec<Transition>) {
        let burst: Vec<Transition> = burst
            .into_iter()
            .filter(|t| {
                let current = self.supervisor.is_current(t);
                if !current {
                    debug!(backend = %t.backend, "ignoring a transition from a stopped probe task");
                }
                current
            })
            .collect();
        for t in &burst {
            self.health.insert((t.vip, t.backend), t.up);
        }
        let Some(swaps) = self.converge(&burst).await else {
            return;
        };
        for s in &swaps {
            for t in burst.iter().filter(|t| t.vip == s.vip) {
                info!(
                    vip = %s.name,
                    backend = %t.backend,
                    up = t.up,
                    members = s.members,
                    all_down = s.all_down,
                    transitions = burst.len(),
                    detection_to_swap_us = t.at.elapsed().as_micros() as u64,
                    "table swapped"
                );
            }
        }
    }

    /// The config the maps should express: a pending one, else the applied.
    fn target(&self) -> &Config {
        self.pending.as_ref().map_or(&self.config, |p| &p.config)
    }

    /// Builds the tables the next apply needs on blocking threads, so the
    /// event loop only writes them. One core is left to the runtime's
    /// workers (probes, `/ready`): a burst that needs every VIP's table
    /// must not starve them.
    async fn build_tables(&mut self) {
        let jobs = self.reconciler.tables_needed(self.target(), &self.health);
        let builders = std::thread::available_parallelism()
            .map_or(1, |n| n.get().saturating_sub(1))
            .clamp(1, jobs.len().max(1));
        let mut shares: Vec<Vec<TableJob>> = vec![Vec::new(); builders];
        for (i, job) in jobs.into_iter().enumerate() {
            shares[i % builders].push(job);
        }
        let builds = shares.into_iter().map(|share| {
            tokio::task::spawn_blocking(move || {
                share
                    .into_iter()
                    .map(|job| {
                        let (table, took) = job.build();
                        (job, table, took)
                    })
                    .collect::<Vec<_>>()
            })
        });
        let built = futures::future::join_all(builds).await;
        self.reconciler
            .provide_tables(built.into_iter().filter_map(Result::ok).flatten());
    }

    /// Makes the maps express the target config with the current health and
    /// neighbours. A pending config that applies becomes the running one; a
    /// failure is retried with backoff, or, when the change can never apply
    /// (it needs more ids than exist), the pending config is dropped. `None`
    /// when the apply failed.
    async fn converge(&mut self, burst: &[Transition]) -> Option<Vec<Swap>> {
        self.build_tables().await;
        let target = self.pending.as_ref().map_or(&self.config, |p| &p.config);
        match self
            .reconciler
            .apply(target, &self.health, &self.neighbours)
        {
            Ok(swaps) => {
                self.failures_in_a_row = 0;
                self.retry_at = None;
                if let Some(p) = self.pending.take() {
                    self.take_up(p, &swaps);
                } else if burst.is_empty() {
                    for s in &swaps {
                        info!(vip = %s.name, members = s.members, all_down = s.all_down, "deferred table swap done");
                    }
                }
                self.record(&swaps);
                Some(swaps)
            }
            Err(e) => {
                self.apply_failed(e);
                None
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
            config_status: &self.config_status,
            bgp: &self.bgp,
            previous_new_flows: &self.scraped_new_flows,
        });
        if scrape {
            self.scraped_new_flows = status::new_flows(&s, &self.config);
        }
        Some(s)
    }

    async fn refresh_neighbours(&mut self) {
        match self.table.refresh(&Wanted::of(self.target())).await {
            Ok(fresh) if fresh != self.neighbours => {
                neighbour::log_changes(&self.neighbours, &fresh);
                self.neighbours = fresh;
                self.converge(&[]).await;
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

/// The index of interface `name` (`Some(None)` when there is none); `None`
/// when the kernel could not be asked (the query needs a socket, and
/// descriptors can run out).
fn interface_index(name: &str) -> Option<Option<u32>> {
    let Ok(c) = std::ffi::CString::new(name) else {
        return Some(None);
    };
    // SAFETY: a valid NUL-terminated string for the duration of the call.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => (std::io::Error::last_os_error().raw_os_error() == Some(libc::ENODEV)).then_some(None),
        index => Some(Some(index)),
    }
}
