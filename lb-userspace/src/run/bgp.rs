//! The daemon's BGP steps: the decisions taken after every event, and the
//! drain a shutdown begins with.

use std::{sync::atomic::Ordering, time::Instant};

use tracing::info;

use super::Daemon;
use crate::bgp::{self, shutdown::Shutdown};

impl Daemon {
    /// Stops advertising readiness and drains the announced VIPs (they
    /// carry GRACEFUL_SHUTDOWN from now on); returns the steps to come.
    pub(super) fn begin_shutdown(&mut self) -> Shutdown {
        self.ready.store(false, Ordering::SeqCst);
        let drain = match &self.config.bgp {
            Some(b) if self.bgp.begin_shutdown() => Some(b.shutdown_delay),
            _ => None,
        };
        self.decide_bgp();
        info!(grace = ?self.config.shutdown_grace, bgp_drain = ?drain, "shutting down; /ready now answers 503");
        Shutdown::plan(Instant::now(), drain, self.config.shutdown_grace)
    }

    /// The end of the drain: every VIP withdrawn.
    pub(super) fn withdraw_all(&mut self) {
        self.bgp.withdraw_all();
        self.decide_bgp();
        info!("drain over: every VIP withdrawn");
    }

    /// Takes the BGP decisions again; logs the VIPs that change.
    pub(super) fn decide_bgp(&mut self) {
        let ready = self.ready.load(Ordering::SeqCst) && self.attached;
        let fitness = bgp::fitness(&self.config, &self.health, ready);
        let changed = self
            .bgp
            .update(Instant::now(), self.config.bgp.as_ref(), &fitness);
        for (key, d) in changed {
            if let Some(v) = self.config.vips.iter().find(|v| v.key == key) {
                info!(vip = %v.name, announced = d.announced, reason = %d.reason, "bgp decision");
            }
        }
    }
}
