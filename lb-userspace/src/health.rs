//! Backend health: one probe task per (VIP, backend), a rise/fall state
//! machine so a single blip does not flap a backend, and transitions sent to
//! the reconcile loop (which alone turns them into map writes).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use lb_common::VipKey;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
    time::Instant,
};
use tracing::{info, warn};

use crate::{
    config::{Config, HealthCheck, HealthKind},
    metrics::{Metrics, ProbeResult},
};

/// How soon a probe that could not run here is tried again (at most its
/// interval).
const LOCAL_RETRY: Duration = Duration::from_millis(250);

/// Consecutive-result state of one backend. Starts up (optimistically, like
/// HAProxy): a backend listed in the config takes traffic until `fall`
/// consecutive probes fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthState {
    up: bool,
    /// Consecutive results contradicting `up`.
    streak: u32,
}

impl HealthState {
    pub fn new(up: bool) -> Self {
        Self { up, streak: 0 }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Feeds one probe result; returns the new state when it flips.
    pub fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { fall } else { rise };
        if self.streak < needed {
            return None;
        }
        self.up = ok;
        self.streak = 0;
        Some(ok)
    }
}

/// Why a probe failed, for the transition log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    Refused,
    Timeout,
    BadStatus(String),
    Error(String),
    /// This host could not run the probe (out of file descriptors or
    /// memory): says nothing about the backend.
    Local(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused => f.write_str("connection refused"),
            Failure::Timeout => f.write_str("timeout"),
            Failure::BadStatus(s) => write!(f, "bad status: {s}"),
            Failure::Error(e) | Failure::Local(e) => f.write_str(e),
        }
    }
}

/// One probe of `addr` as `check` says, bounded by its timeout.
pub async fn probe(check: &HealthCheck, addr: IpAddr) -> Result<(), Failure> {
    let target = SocketAddr::from((addr, check.port));
    let attempt = async {
        let mut stream =
            TcpStream::connect(target)
                .await
                .map_err(|e| match (e.kind(), e.raw_os_error()) {
                    (std::io::ErrorKind::ConnectionRefused, _) => Failure::Refused,
                    (_, Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) => {
                        Failure::Local(e.to_string())
                    }
                    _ => Failure::Error(e.to_string()),
                })?;
        if check.kind == HealthKind::Http {
            http_get(&mut stream, &check.path, addr).await?;
        }
        Ok(())
    };
    tokio::time::timeout(check.timeout, attempt)
        .await
        .unwrap_or(Err(Failure::Timeout))
}

/// Sends `GET path` and accepts a 2xx status line.
async fn http_get(stream: &mut TcpStream, path: &str, host: IpAddr) -> Result<(), Failure> {
    // An IPv6 literal host is bracketed (RFC 3986).
    let host = match host {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-health\r\nConnection: close\r\n\r\n"
    );
    let io = |e: std::io::Error| Failure::Error(e.to_string());
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    // The status line fits in the first read of any real server's answer;
    // read until it is complete or the server closes.
    let mut buf = Vec::with_capacity(256);
    while !buf.contains(&b'\n') && buf.len() < 1024 {
        if stream.read_buf(&mut buf).await.map_err(io)? == 0 {
            break;
        }
    }
    let line = String::from_utf8_lossy(&buf);
    let line = line.lines().next().unwrap_or("").trim();
    match line.split_whitespace().nth(1) {
        Some(code) if line.starts_with("HTTP/") && code.len() == 3 && code.starts_with('2') => {
            Ok(())
        }
        _ => Err(Failure::BadStatus(if line.is_empty() {
            "no answer".into()
        } else {
            line.into()
        })),
    }
}

/// A backend's health flipped.
#[derive(Clone, Debug)]
pub struct Transition {
    pub vip: VipKey,
    pub backend: IpAddr,
    /// The probe task that saw it; see [`Supervisor::is_current`].
    pub task: u64,
    pub up: bool,
    /// When the deciding probe finished (for detection-to-swap latency).
    pub at: Instant,
}

/// Runs one probe task per (VIP, backend) of the current config.
pub struct Supervisor {
    tasks: BTreeMap<(VipKey, IpAddr), Task>,
    events: mpsc::Sender<Transition>,
    metrics: Arc<Metrics>,
    next_task: u64,
}

struct Task {
    id: u64,
    check: HealthCheck,
    labels: Labels,
    handle: JoinHandle<()>,
}

impl Supervisor {
    pub fn new(events: mpsc::Sender<Transition>, metrics: Arc<Metrics>) -> Self {
        Self {
            tasks: BTreeMap::new(),
            events,
            metrics,
            next_task: 0,
        }
    }

    /// Whether a transition comes from the task now probing its backend (a
    /// task stopped by [`sync`](Self::sync) may have queued one before).
    pub fn is_current(&self, t: &Transition) -> bool {
        self.tasks
            .get(&(t.vip, t.backend))
            .is_some_and(|task| task.id == t.task)
    }

    /// Starts tasks for new backends (in state `initial(vip, backend)`), stops
    /// those of removed backends, and restarts those whose check changed.
    /// Within a VIP, tasks start spread evenly over the interval so probes do
    /// not arrive in bursts.
    pub fn sync(&mut self, config: &Config, initial: impl Fn(&VipKey, IpAddr) -> bool) {
        let mut wanted: BTreeMap<(VipKey, IpAddr), (HealthCheck, Duration, Labels)> =
            BTreeMap::new();
        for vip in &config.vips {
            let key = vip.key;
            let n = vip.backends.len().max(1) as u32;
            for (i, b) in vip.backends.iter().enumerate() {
                let offset = vip.health_check.interval * i as u32 / n;
                let labels = Labels {
                    vip: vip.endpoint().to_string(),
                    proto: vip.protocol.to_string(),
                    backend: b.address.to_string(),
                };
                wanted.insert((key, b.address), (vip.health_check.clone(), offset, labels));
            }
        }
        let metrics = &self.metrics;
        self.tasks.retain(|k, task| {
            let keep = wanted.get(k).is_some_and(|(c, _, _)| *c == task.check);
            if !keep {
                task.handle.abort();
                let l = &task.labels;
                metrics.forget_probe(&l.vip, &l.proto, &l.backend);
            }
            keep
        });
        for (k, (check, offset, labels)) in wanted {
            if self.tasks.contains_key(&k) {
                continue;
            }
            self.next_task += 1;
            let probe = Probe {
                vip: k.0,
                backend: k.1,
                task: self.next_task,
                check: check.clone(),
                labels: labels.clone(),
                events: self.events.clone(),
                metrics: self.metrics.clone(),
            };
            let handle = tokio::spawn(probe.run(HealthState::new(initial(&k.0, k.1)), offset));
            self.tasks.insert(
                k,
                Task {
                    id: self.next_task,
                    check,
                    labels,
                    handle,
                },
            );
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.handle.abort();
        }
    }
}

/// Metric labels of one probe task.
#[derive(Clone)]
struct Labels {
    vip: String,
    proto: String,
    backend: String,
}

/// One backend's probe task.
struct Probe {
    vip: VipKey,
    backend: IpAddr,
    task: u64,
    check: HealthCheck,
    labels: Labels,
    events: mpsc::Sender<Transition>,
    metrics: Arc<Metrics>,
}

impl Probe {
    async fn run(self, mut state: HealthState, offset: Duration) {
        let (check, backend) = (&self.check, self.backend);
        let mut ticks = tokio::time::interval_at(Instant::now() + offset, check.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Probes in a row that could not run here.
        let mut local_errors = 0u32;
        loop {
            ticks.tick().await;
            let started = Instant::now();
            let result = probe(check, backend).await;
            if let Err(Failure::Local(error)) = &result {
                self.local_error(local_errors == 0, error);
                local_errors += 1;
                ticks.reset_after(check.interval.min(LOCAL_RETRY));
                continue;
            }
            if local_errors > 0 {
                info!(%backend, port = check.port, failed_probes = local_errors, "health probes run again");
                local_errors = 0;
            }
            self.record(&result, started.elapsed());
            let Some(up) = state.observe(result.is_ok(), check.rise, check.fall) else {
                continue;
            };
            match &result {
                Ok(()) => info!(%backend, port = check.port, rise = check.rise, "backend is up"),
                Err(reason) => {
                    warn!(%backend, port = check.port, fall = check.fall, %reason, "backend is down")
                }
            }
            let t = Transition {
                vip: self.vip,
                task: self.task,
                backend,
                up,
                at: Instant::now(),
            };
            if self.events.send(t).await.is_err() {
                return;
            }
        }
    }

    /// Counts a probe that could not run here (logged on the first of a
    /// series); it is not a result and feeds no rise/fall state.
    fn local_error(&self, first: bool, error: &str) {
        let l = &self.labels;
        self.metrics.probe_local_error(&l.vip, &l.proto, &l.backend);
        if first {
            warn!(
                backend = %self.backend,
                port = self.check.port,
                %error,
                "health probe could not run on this host; retrying, the backend's state stays"
            );
        }
    }

    fn record(&self, result: &Result<(), Failure>, took: Duration) {
        let result = match result {
            Ok(()) => ProbeResult::Success,
            Err(Failure::Refused) => ProbeResult::Refused,
            Err(Failure::Timeout) => ProbeResult::Timeout,
            Err(Failure::BadStatus(_)) => ProbeResult::BadStatus,
            Err(Failure::Error(_)) => ProbeResult::Error,
            Err(Failure::Local(_)) => return,
        };
        let l = &self.labels;
        self.metrics
            .probed(&l.vip, &l.proto, &l.backend, result, took);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(state: &mut HealthState, results: &[bool]) -> Vec<Option<bool>> {
        results.iter().map(|&r| state.observe(r, 2, 3)).collect()
    }

    #[test]
    fn goes_down_after_fall_consecutive_failures() {
        let mut s = HealthState::new(true);
        assert_eq!(
            feed(&mut s, &[false, false, false]),
            [None, None, Some(false)]
        );
        assert!(!s.is_up());
    }

    #[test]
    fn comes_back_after_rise_consecutive_successes() {
        let mut s = HealthState::new(false);
        assert_eq!(feed(&mut s, &[true, true]), [None, Some(true)]);
        assert!(s.is_up());
    }

    #[test]
    fn a_single_blip_does_not_flap() {
        let mut s = HealthState::new(true);
        // Two failures, a success, two failures: never three in a row.
        assert_eq!(
            feed(&mut s, &[false, false, true, false, false, true]),
            [None; 6]
        );
        assert!(s.is_up());
        let mut s = HealthState::new(false);
        assert_eq!(feed(&mut s, &[true, false, true, false]), [None; 4]);
        assert!(!s.is_up());
    }

    #[test]
    fn flapping_input_reports_each_transition_once() {
        let mut s = HealthState::new(true);
        let input = [
            false, false, false, false, true, true, true, false, false, false,
        ];
        let flips: Vec<bool> = feed(&mut s, &input).into_iter().flatten().collect();
        assert_eq!(flips, [false, true, false]);
    }

    fn check(kind: HealthKind, port: u16) -> HealthCheck {
        HealthCheck {
            kind,
            port,
            path: "/healthz".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 1,
            fall: 1,
        }
    }

    #[tokio::test]
    async fn tcp_probe_succeeds_on_a_listener_and_is_refused_without() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(
            probe(&check(HealthKind::Tcp, port), IpAddr::from([127, 0, 0, 1])).await,
            Ok(())
        );
        drop(l);
        assert_eq!(
            probe(&check(HealthKind::Tcp, port), IpAddr::from([127, 0, 0, 1])).await,
            Err(Failure::Refused)
        );
    }

    async fn http_server(answer: &'static str) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap_or(0);
                assert!(
                    String::from_utf8_lossy(&buf[..n]).starts_with("GET /healthz HTTP/1.1\r\n")
                );
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        port
    }

    #[tokio::test]
    async fn http_probe_wants_a_2xx_status() {
        let ok = http_server("HTTP/1.1 204 No Content\r\n\r\n").await;
        assert_eq!(
            probe(&check(HealthKind::Http, ok), IpAddr::from([127, 0, 0, 1])).await,
            Ok(())
        );
        let bad = http_server("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        assert_eq!(
            probe(&check(HealthKind::Http, bad), IpAddr::from([127, 0, 0, 1])).await,
            Err(Failure::BadStatus(
                "HTTP/1.1 503 Service Unavailable".into()
            ))
        );
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        // Accepts (the kernel completes the handshake) but never answers.
        assert_eq!(
            probe(&check(HealthKind::Http, port), IpAddr::from([127, 0, 0, 1])).await,
            Err(Failure::Timeout)
        );
        drop(l);
    }
}
