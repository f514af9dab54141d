//! `lb bgp-feed`: the program ExaBGP runs. It follows the running `lb`
//! through its admin listener's `/status` and prints ExaBGP API commands on
//! stdout; ExaBGP's acknowledgements arrive on stdin and are read on their
//! own thread, so ExaBGP never blocks writing them.
//!
//! At start it sends the whole desired state (ExaBGP keeps the routes of a
//! feed that died and was respawned, so nothing is withdrawn by a restart).
//! While `lb` is unreachable (a restart: XDP keeps forwarding) it keeps the
//! last state for `bgp.feed_grace`, then withdraws everything; an `lb` that
//! was shutting down is not waited for.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, Write as _},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use tracing::{debug, info, warn};

use super::{
    Phase,
    exabgp::{self, Route},
};
use crate::status::{self, Status};

/// How often `/status` is asked: a withdrawal reaches ExaBGP within this.
pub const POLL: Duration = Duration::from_millis(250);

/// `bgp.feed_grace` when neither lb nor a config says otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// What has been sent, and how long `lb` has been out of reach.
#[derive(Debug)]
pub struct Feed {
    sent: BTreeMap<IpAddr, Route>,
    /// Whether the first full state went out.
    started: bool,
    grace: Duration,
    /// The phase `lb` reported last.
    phase: Phase,
    unreachable_since: Option<Instant>,
}

impl Feed {
    /// `grace` until `lb` reports its own `feed_grace`.
    pub fn new(grace: Duration) -> Feed {
        Feed {
            sent: BTreeMap::new(),
            started: false,
            grace,
            phase: Phase::Serving,
            unreachable_since: None,
        }
    }

    /// `lb` answered: the lines that make ExaBGP announce what it wants.
    pub fn seen(&mut self, status: &Status) -> Vec<String> {
        self.unreachable_since = None;
        if let Some(bgp) = &status.bgp {
            self.grace = bgp.settings.feed_grace;
            self.phase = bgp.phase;
        }
        let wanted = exabgp::wanted(status);
        let mut lines = Vec::new();
        if !self.started {
            // A route ExaBGP kept from an earlier feed and that is no longer
            // wanted: withdrawn (ExaBGP ignores withdrawing an unknown route).
            for a in exabgp::addresses(status) {
                if !wanted.contains_key(&a) {
                    self.sent.entry(a).or_insert_with(|| Route {
                        prefix: a,
                        next_hop: "self".into(),
                        med: 0,
                        communities: vec![],
                    });
                }
            }
            self.started = true;
        }
        lines.extend(exabgp::changes(&self.sent, &wanted));
        self.sent = wanted;
        lines
    }

    /// `lb` did not answer: nothing changes during the grace, except when
    /// `lb` was shutting down; after it everything is withdrawn.
    pub fn unreachable(&mut self, now: Instant) -> Vec<String> {
        let since = *self.unreachable_since.get_or_insert(now);
        let shutting_down = self.phase != Phase::Serving;
        if !shutting_down && now.saturating_duration_since(since) < self.grace {
            return Vec::new();
        }
        std::mem::take(&mut self.sent)
            .values()
            .map(Route::withdraw)
            .collect()
    }
}

/// Follows `lb` at `admin` until ExaBGP closes stdin or stdout.
pub fn run(admin: SocketAddr, grace: Duration) -> anyhow::Result<()> {
    std::thread::spawn(read_acks);
    let mut feed = Feed::new(grace);
    let mut out = std::io::stdout().lock();
    let mut reachable = None;
    loop {
        let lines = match status::fetch(admin, POLL * 4) {
            Ok(status) => {
                if reachable != Some(true) {
                    info!(%admin, "following lb");
                }
                reachable = Some(true);
                feed.seen(&status)
            }
            Err(e) => {
                if reachable != Some(false) {
                    warn!(%admin, error = %e, "lb unreachable; keeping the routes for feed_grace");
                }
                reachable = Some(false);
                feed.unreachable(Instant::now())
            }
        };
        for line in &lines {
            info!(command = %line, "to exabgp");
            writeln!(out, "{line}")?;
        }
        out.flush()?;
        std::thread::sleep(POLL);
    }
}

/// ExaBGP answers each command with `done` or `error`; when it closes
/// stdin it has gone, and so does the feed.
fn read_acks() {
    for line in std::io::stdin().lock().lines() {
        match line {
            Ok(l) if l.trim() == "done" => debug!("exabgp: done"),
            Ok(l) => warn!(answer = %l.trim(), "exabgp"),
            Err(_) => break,
        }
    }
    info!("exabgp closed stdin; exiting");
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        bgp::{Reason, VipBgp},
        config::{Bgp, Forwarding, OnAllDown, Protocol, XdpMode},
        status::{BgpStatus, VipStatus},
    };

    fn vip(address: &str, announced: bool, graceful: bool) -> VipStatus {
        VipStatus {
            name: address.into(),
            vip: address.into(),
            protocol: Protocol::Tcp,
            forwarding: Forwarding::L2,
            on_all_down: OnAllDown::FailOpen,
            healthy_backends: 1,
            all_down: false,
            packets: 0,
            bytes: 0,
            new_flows: 0,
            skew: None,
            bgp: VipBgp {
                announced,
                graceful_shutdown: graceful,
                reason: Reason::Announced,
            },
            backends: vec![],
        }
    }

    fn status(phase: Phase, vips: Vec<VipStatus>) -> Status {
        Status {
            version: "0".into(),
            interface: "eth0".into(),
            xdp_mode: XdpMode::Native,
            attached: true,
            ready: true,
            config: Default::default(),
            counters: BTreeMap::new(),
            flow_table_entries: BTreeMap::new(),
            bgp: Some(BgpStatus {
                phase,
                settings: Bgp {
                    min_healthy: 1,
                    announce_after: Duration::from_secs(2),
                    shutdown_delay: Duration::from_secs(5),
                    feed_grace: Duration::from_secs(30),
                    med: 100,
                    communities: vec!["65000:80".into()],
                    next_hop: "self".into(),
                },
            }),
            vips,
        }
    }

    #[test]
    fn starts_with_the_full_state_then_sends_changes() {
        let mut f = Feed::new(Duration::from_secs(30));
        let s = status(
            Phase::Serving,
            vec![
                vip("10.0.0.1:80", true, false),
                vip("[fd00::1]:80", true, false),
                vip("10.0.0.2:80", false, false),
            ],
        );
        assert_eq!(
            f.seen(&s),
            vec![
                "withdraw route 10.0.0.2/32 next-hop self",
                "announce route 10.0.0.1/32 next-hop self origin igp med 100 community [65000:80]",
                "announce route fd00::1/128 next-hop self origin igp med 100 community [65000:80]",
            ]
        );
        assert!(f.seen(&s).is_empty(), "nothing changed");
        let draining = status(Phase::Draining, vec![vip("10.0.0.1:80", true, true)]);
        assert_eq!(
            f.seen(&draining),
            vec![
                "withdraw route fd00::1/128 next-hop self",
                "announce route 10.0.0.1/32 next-hop self origin igp med 100 community [65000:80 65535:0]",
            ]
        );
    }

    #[test]
    fn keeps_the_routes_for_the_grace_while_lb_is_unreachable() {
        let mut f = Feed::new(Duration::from_secs(1));
        f.seen(&status(
            Phase::Serving,
            vec![vip("10.0.0.1:80", true, false)],
        ));
        let t0 = Instant::now();
        assert!(f.unreachable(t0).is_empty());
        assert!(f.unreachable(t0 + Duration::from_secs(29)).is_empty());
        assert_eq!(
            f.unreachable(t0 + Duration::from_secs(30)),
            vec!["withdraw route 10.0.0.1/32 next-hop self"]
        );
        assert!(f.unreachable(t0 + Duration::from_secs(31)).is_empty());
    }

    #[test]
    fn an_lb_that_was_shutting_down_is_not_waited_for() {
        let mut f = Feed::new(Duration::from_secs(30));
        f.seen(&status(
            Phase::Draining,
            vec![vip("10.0.0.1:80", true, true)],
        ));
        assert_eq!(
            f.unreachable(Instant::now()),
            vec!["withdraw route 10.0.0.1/32 next-hop self"]
        );
    }
}
