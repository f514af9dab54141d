//! The order of a graceful shutdown: `/ready` turns 503 and the announced
//! VIPs are re-announced with GRACEFUL_SHUTDOWN at once (the caller's
//! first step), withdrawn after `bgp.shutdown_delay`, and `lb` exits after
//! `admin.shutdown_grace` more, but never sooner than [`WITHDRAW_SETTLE`]
//! after a withdrawal, so `lb bgp-feed` sees it.

use std::time::{Duration, Instant};

/// Long enough for `lb bgp-feed` (polling every 250 ms) to read the
/// withdrawal from `/status` before the listener goes away.
pub const WITHDRAW_SETTLE: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Withdraw,
    Exit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shutdown {
    withdraw_at: Option<Instant>,
    exit_at: Instant,
}

impl Shutdown {
    /// `drain` is `bgp.shutdown_delay` when some VIP was announced, `None`
    /// when nothing needs draining.
    pub fn plan(now: Instant, drain: Option<Duration>, grace: Duration) -> Shutdown {
        match drain {
            Some(delay) => Shutdown {
                withdraw_at: Some(now + delay),
                exit_at: now + delay + grace.max(WITHDRAW_SETTLE),
            },
            None => Shutdown {
                withdraw_at: None,
                exit_at: now + grace,
            },
        }
    }

    /// The next step and when it is due.
    pub fn next(&self) -> (Instant, Step) {
        match self.withdraw_at {
            Some(at) => (at, Step::Withdraw),
            None => (self.exit_at, Step::Exit),
        }
    }

    /// `step` is done.
    pub fn done(&mut self, step: Step) {
        if step == Step::Withdraw {
            self.withdraw_at = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drains_then_withdraws_then_waits_the_grace() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut plan = Shutdown::plan(t0, Some(s(5)), s(3));
        assert_eq!(plan.next(), (t0 + s(5), Step::Withdraw));
        plan.done(Step::Withdraw);
        assert_eq!(plan.next(), (t0 + s(8), Step::Exit));
    }

    #[test]
    fn a_withdrawal_is_left_time_to_be_seen() {
        let t0 = Instant::now();
        let mut plan = Shutdown::plan(t0, Some(Duration::from_secs(5)), Duration::ZERO);
        plan.done(Step::Withdraw);
        assert_eq!(plan.next().0, t0 + Duration::from_secs(5) + WITHDRAW_SETTLE);
    }

    #[test]
    fn without_anything_to_drain_only_the_grace_applies() {
        let t0 = Instant::now();
        let plan = Shutdown::plan(t0, None, Duration::from_secs(2));
        assert_eq!(plan.next(), (t0 + Duration::from_secs(2), Step::Exit));
    }
}
