//! Config changes: a reload taken up (parsed off the loop, checked against
//! the settings fixed at start-up), applied whole or retried with backoff,
//! or rejected; what `/status` says about it.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use tracing::{error, info};

use super::{Daemon, RETRY_MAX};
use crate::{
    config::Config,
    reconcile::{ReconcileError, Swap, backend_keys},
    reload,
};

/// A valid config taken up but not yet applied whole.
pub(super) struct Pending {
    pub(super) config: Config,
    sha256: String,
    trigger: &'static str,
}

impl Daemon {
    pub(super) fn apply_failed(&mut self, e: ReconcileError) {
        let now = Instant::now();
        let Some(at) = e.retry_at(now) else {
            match self.pending.take() {
                Some(p) => {
                    self.config_status.pending_sha256 = None;
                    self.reject(p.trigger, format!("{e}"));
                }
                None => error!(error = %e, "applying the running config failed"),
            }
            return;
        };
        // 100 ms, doubling, at most RETRY_MAX; never before ids are free.
        let backoff = Duration::from_millis(100)
            .saturating_mul(1 << self.failures_in_a_row.min(16))
            .min(RETRY_MAX);
        self.failures_in_a_row += 1;
        let at = at.max(now + backoff);
        self.retry_at = Some(at);
        let retry_in_ms = at.duration_since(now).as_millis() as u64;
        match &self.pending {
            Some(p) => {
                error!(trigger = p.trigger, error = %e, retry_in_ms, "reload failed while applying; the running config stays until it applies");
                self.metrics.reload_failed();
                self.config_status.reload_failures += 1;
            }
            None => error!(error = %e, retry_in_ms, "applying a change failed; retrying"),
        }
        self.config_status.last_error = Some(e.to_string());
    }

    /// A reload that will not be applied: logged, counted and shown; the
    /// running config stays.
    pub(super) fn reject(&mut self, trigger: &str, error: String) {
        error!(%trigger, %error, "reload rejected; the running config stays");
        self.metrics.reload_failed();
        self.config_status.reload_failures += 1;
        self.config_status.last_error = Some(error);
    }

    /// A new text from the file: parsed away from the loop, checked against
    /// the settings fixed at start-up, then applied whole or retried.
    pub(super) async fn reload(&mut self, text: String, path: &Path, trigger: &'static str) {
        let sha256 = reload::digest(&text);
        let new = match reload::parse(text, path).await {
            Ok(c) => c,
            Err(e) => return self.reject(trigger, e),
        };
        let changed = self.config.fixed().changed(&new.fixed());
        if !changed.is_empty() {
            return self.reject(
                trigger,
                format!("{} cannot change while lb runs", changed.join(", ")),
            );
        }
        // A newer file replaces a pending one.
        self.config_status.pending_sha256 = Some(sha256.clone());
        self.pending = Some(Pending {
            config: new,
            sha256,
            trigger,
        });
        self.failures_in_a_row = 0;
        self.converge(&[]).await;
    }

    /// A pending config has been applied whole: it is the running one now.
    pub(super) fn take_up(&mut self, p: Pending, swaps: &[Swap]) {
        let rebuilt: Vec<&str> = swaps.iter().map(|s| s.name.as_str()).collect();
        info!(trigger = p.trigger, ?rebuilt, sha256 = %p.sha256, "config reloaded");
        // Health and metric series of backends and VIPs that are gone are
        // forgotten.
        let live = backend_keys(&p.config);
        self.health.retain(|k, _| live.contains(k));
        for v in self
            .config
            .vips
            .iter()
            .filter(|v| !p.config.vips.iter().any(|n| n.key == v.key))
        {
            self.metrics
                .forget_vip(&v.endpoint().to_string(), v.protocol.as_str());
        }
        self.config = p.config;
        self.config_status.applied_sha256 = p.sha256;
        self.config_status.pending_sha256 = None;
        self.config_status.last_error = None;
        self.sync_probes();
        self.metrics.reloaded(true);
    }
}
