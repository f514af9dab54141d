//! Per VIP: should this instance attract its traffic? Pure (time is an
//! argument), so hysteresis and the shutdown order are unit-tested.
//!
//! A VIP is announced once it has been fit (instance ready, VIP enabled for
//! BGP, at least `min_healthy` healthy active backends) for `announce_after`
//! without interruption, and withdrawn at once when it stops being fit. A
//! shutdown re-announces the announced VIPs with GRACEFUL_SHUTDOWN
//! ([`Phase::Draining`]), then withdraws them all ([`Phase::Withdrawn`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    time::{Duration, Instant},
};

use lb_common::VipKey;
use serde::{Deserialize, Serialize};

use crate::config::Bgp;

/// Where the instance is in its life, as BGP sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Serving,
    /// Shutting down: announced VIPs carry GRACEFUL_SHUTDOWN (65535:0).
    Draining,
    /// Shutting down: everything withdrawn.
    Withdrawn,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Serving => "serving",
            Phase::Draining => "draining (graceful shutdown)",
            Phase::Withdrawn => "withdrawn (shutting down)",
        })
    }
}

/// Why a VIP is, or is not, announced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    Announced,
    /// The config has no `bgp` section.
    NotConfigured,
    /// Not attached, or the program is gone.
    NotReady,
    TooFewHealthy {
        healthy: usize,
        min_healthy: u32,
    },
    /// Fit, but not yet for `announce_after`.
    Settling {
        remaining_ms: u64,
    },
    /// `announce: false` in the VIP's config.
    DisabledByConfig,
    /// Announced with GRACEFUL_SHUTDOWN until `shutdown_delay` ends.
    ShuttingDown,
    /// Withdrawn for the shutdown.
    Withdrawn,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Announced => write!(f, "announced"),
            Reason::NotConfigured => write!(f, "no bgp section"),
            Reason::NotReady => write!(f, "not ready"),
            Reason::TooFewHealthy {
                healthy,
                min_healthy,
            } => write!(f, "{healthy} of min_healthy {min_healthy} healthy"),
            Reason::Settling { remaining_ms } => {
                write!(f, "fit, announcing in {remaining_ms} ms (announce_after)")
            }
            Reason::DisabledByConfig => write!(f, "disabled by config (announce: false)"),
            Reason::ShuttingDown => write!(f, "shutting down (graceful-shutdown community)"),
            Reason::Withdrawn => write!(f, "shutting down (withdrawn)"),
        }
    }
}

/// The decision for one VIP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipBgp {
    pub announced: bool,
    /// Announced with the GRACEFUL_SHUTDOWN community.
    pub graceful_shutdown: bool,
    pub reason: Reason,
}

impl VipBgp {
    fn withdrawn(reason: Reason) -> VipBgp {
        VipBgp {
            announced: false,
            graceful_shutdown: false,
            reason,
        }
    }
}

/// What the decision needs to know of a VIP now.
#[derive(Clone, Copy, Debug)]
pub struct Fitness {
    /// The instance is attached with its config applied.
    pub ready: bool,
    /// The VIP's `announce` setting.
    pub enabled: bool,
    /// Healthy backends in state `active`.
    pub healthy: usize,
}

/// Decides for every VIP; the only writer of the decisions.
#[derive(Debug, Default)]
pub struct Decider {
    phase: Phase,
    /// Since when each VIP has been fit without interruption.
    fit_since: BTreeMap<VipKey, Instant>,
    /// The VIPs announced when the shutdown began.
    draining: BTreeSet<VipKey>,
    decisions: BTreeMap<VipKey, VipBgp>,
}

impl Decider {
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The decision for `key`, as of the last [`update`](Self::update).
    pub fn get(&self, key: &VipKey) -> VipBgp {
        self.decisions
            .get(key)
            .cloned()
            .unwrap_or_else(|| VipBgp::withdrawn(Reason::NotConfigured))
    }

    /// Decides again for the VIPs of the running config (VIPs not listed
    /// are forgotten, so withdrawn); returns the VIPs whose `announced`
    /// changed, with the new decision.
    pub fn update(
        &mut self,
        now: Instant,
        bgp: Option<&Bgp>,
        vips: &[(VipKey, Fitness)],
    ) -> Vec<(VipKey, VipBgp)> {
        let mut decisions = BTreeMap::new();
        for &(key, fit) in vips {
            let d = self.decide(now, bgp, key, fit);
            decisions.insert(key, d);
        }
        self.fit_since.retain(|k, _| decisions.contains_key(k));
        let changed = decisions
            .iter()
            .filter(|(k, d)| {
                self.decisions
                    .get(k)
                    .is_none_or(|old| old.announced != d.announced)
            })
            .map(|(k, d)| (*k, d.clone()))
            .collect();
        self.decisions = decisions;
        changed
    }

    fn decide(&mut self, now: Instant, bgp: Option<&Bgp>, key: VipKey, fit: Fitness) -> VipBgp {
        let Some(bgp) = bgp else {
            self.fit_since.remove(&key);
            return VipBgp::withdrawn(Reason::NotConfigured);
        };
        // Readiness is lost on purpose once a shutdown begins; the drain
        // judges the VIP itself.
        let unfit = if !fit.enabled {
            Some(Reason::DisabledByConfig)
        } else if fit.healthy < bgp.min_healthy as usize {
            Some(Reason::TooFewHealthy {
                healthy: fit.healthy,
                min_healthy: bgp.min_healthy,
            })
        } else if !fit.ready && self.phase == Phase::Serving {
            Some(Reason::NotReady)
        } else {
            None
        };
        if let Some(reason) = unfit {
            self.fit_since.remove(&key);
            return VipBgp::withdrawn(reason);
        }
        match self.phase {
            Phase::Serving => {
                let since = *self.fit_since.entry(key).or_insert(now);
                let fit_for = now.saturating_duration_since(since);
                if fit_for >= bgp.announce_after {
                    VipBgp {
                        announced: true,
                        graceful_shutdown: false,
                        reason: Reason::Announced,
                    }
                } else {
                    VipBgp::withdrawn(Reason::Settling {
                        remaining_ms: millis(bgp.announce_after - fit_for),
                    })
                }
            }
            Phase::Draining if self.draining.contains(&key) => VipBgp {
                announced: true,
                graceful_shutdown: true,
                reason: Reason::ShuttingDown,
            },
            Phase::Draining | Phase::Withdrawn => VipBgp::withdrawn(Reason::Withdrawn),
        }
    }

    /// SIGTERM: the announced VIPs stay announced with GRACEFUL_SHUTDOWN
    /// (once [`update`](Self::update) runs); the others are not announced
    /// any more. Returns whether any VIP was announced (else there is
    /// nothing to drain).
    pub fn begin_shutdown(&mut self) -> bool {
        self.draining = self
            .decisions
            .iter()
            .filter(|(_, d)| d.announced)
            .map(|(k, _)| *k)
            .collect();
        self.phase = Phase::Draining;
        !self.draining.is_empty()
    }

    /// The drain is over: every VIP is withdrawn.
    pub fn withdraw_all(&mut self) {
        self.phase = Phase::Withdrawn;
        self.draining.clear();
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn bgp() -> Bgp {
        Bgp {
            min_healthy: 2,
            announce_after: Duration::from_secs(2),
            shutdown_delay: Duration::from_secs(5),
            feed_grace: Duration::from_secs(30),
            med: 100,
            communities: vec![],
            next_hop: "self".into(),
        }
    }

    fn key(i: u8) -> VipKey {
        VipKey::new(IpAddr::from([10, 0, 0, i]), 80, lb_common::IPPROTO_TCP)
    }

    fn fit(healthy: usize) -> Fitness {
        Fitness {
            ready: true,
            enabled: true,
            healthy,
        }
    }

    fn secs(start: Instant, s: f64) -> Instant {
        start + Duration::from_secs_f64(s)
    }

    #[test]
    fn announces_after_being_fit_for_announce_after_and_a_blip_restarts_the_wait() {
        let (mut d, b, t0) = (Decider::default(), bgp(), Instant::now());
        d.update(t0, Some(&b), &[(key(1), fit(2))]);
        assert_eq!(
            d.get(&key(1)).reason,
            Reason::Settling { remaining_ms: 2000 }
        );
        d.update(secs(t0, 1.5), Some(&b), &[(key(1), fit(2))]);
        assert!(!d.get(&key(1)).announced);
        // A blip: one backend down for a moment restarts the wait.
        d.update(secs(t0, 1.6), Some(&b), &[(key(1), fit(1))]);
        d.update(secs(t0, 1.7), Some(&b), &[(key(1), fit(2))]);
        d.update(secs(t0, 3.0), Some(&b), &[(key(1), fit(2))]);
        assert!(!d.get(&key(1)).announced, "1.3 s fit after the blip");
        let changed = d.update(secs(t0, 3.7), Some(&b), &[(key(1), fit(2))]);
        assert!(d.get(&key(1)).announced);
        assert_eq!(changed, vec![(key(1), d.get(&key(1)))]);
    }

    #[test]
    fn withdrawn_at_once_below_min_healthy_when_disabled_removed_or_not_ready() {
        let (b, t0) = (bgp(), Instant::now());
        let announced = |d: &mut Decider| {
            d.update(t0, Some(&b), &[(key(1), fit(3))]);
            d.update(secs(t0, 2.0), Some(&b), &[(key(1), fit(3))]);
            assert!(d.get(&key(1)).announced);
        };
        let later = secs(t0, 2.1);

        let mut d = Decider::default();
        announced(&mut d);
        d.update(later, Some(&b), &[(key(1), fit(1))]);
        assert_eq!(
            d.get(&key(1)),
            VipBgp::withdrawn(Reason::TooFewHealthy {
                healthy: 1,
                min_healthy: 2
            })
        );

        let mut d = Decider::default();
        announced(&mut d);
        let disabled = Fitness {
            enabled: false,
            ..fit(3)
        };
        d.update(later, Some(&b), &[(key(1), disabled)]);
        assert_eq!(d.get(&key(1)).reason, Reason::DisabledByConfig);

        let mut d = Decider::default();
        announced(&mut d);
        let unready = Fitness {
            ready: false,
            ..fit(3)
        };
        d.update(later, Some(&b), &[(key(1), unready)]);
        assert_eq!(d.get(&key(1)).reason, Reason::NotReady);

        let mut d = Decider::default();
        announced(&mut d);
        d.update(later, Some(&b), &[(key(2), fit(3))]);
        assert!(!d.get(&key(1)).announced, "a VIP removed from the config");

        let mut d = Decider::default();
        announced(&mut d);
        d.update(later, None, &[(key(1), fit(3))]);
        assert_eq!(d.get(&key(1)).reason, Reason::NotConfigured);
    }

    #[test]
    fn min_healthy_counts_exactly() {
        let (mut d, t0) = (Decider::default(), Instant::now());
        let b = Bgp {
            announce_after: Duration::ZERO,
            ..bgp()
        };
        d.update(t0, Some(&b), &[(key(1), fit(1)), (key(2), fit(2))]);
        assert!(!d.get(&key(1)).announced);
        assert!(d.get(&key(2)).announced);
    }

    #[test]
    fn shutdown_drains_the_announced_vips_then_withdraws_everything() {
        let (mut d, b, t0) = (Decider::default(), bgp(), Instant::now());
        let vips = [(key(1), fit(2)), (key(2), fit(0))];
        d.update(t0, Some(&b), &vips);
        d.update(secs(t0, 2.0), Some(&b), &vips);
        assert!(d.begin_shutdown(), "one VIP was announced");
        // /ready is 503 from here on: readiness no longer matters.
        let unready = vips.map(|(k, f)| (k, Fitness { ready: false, ..f }));
        d.update(secs(t0, 2.1), Some(&b), &unready);
        assert_eq!(d.phase(), Phase::Draining);
        let draining = d.get(&key(1));
        assert!(draining.announced && draining.graceful_shutdown);
        assert_eq!(draining.reason, Reason::ShuttingDown);
        assert!(!d.get(&key(2)).announced);
        d.withdraw_all();
        let changed = d.update(secs(t0, 7.1), Some(&b), &unready);
        assert_eq!(changed.len(), 1);
        assert_eq!(d.get(&key(1)), VipBgp::withdrawn(Reason::Withdrawn));
    }

    #[test]
    fn nothing_announced_means_nothing_to_drain() {
        let mut d = Decider::default();
        d.update(Instant::now(), Some(&bgp()), &[(key(1), fit(2))]);
        assert!(!d.begin_shutdown());
    }
}
