//! Maglev tables built away from the caller: building is the slow part of a
//! change (milliseconds per VIP at large table sizes), so the daemon builds
//! what the next apply needs on other threads and hands it in.

use std::time::{Duration, Instant};

use super::{Reconciler, plan_vip};
use crate::{
    config::Config,
    dataplane::Dataplane,
    maglev::{self, Weighted},
    model::{Health, is_up},
};

/// The input of one Maglev table: build it anywhere with
/// [`TableJob::build`] and hand the result to
/// [`Reconciler::provide_tables`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableJob {
    pub members: Vec<Weighted>,
    pub size: u32,
    pub seed: u32,
}

impl TableJob {
    /// The table, and how long building it took.
    pub fn build(&self) -> (maglev::Table, Duration) {
        let started = Instant::now();
        let table = maglev::build(&self.members, self.size, self.seed);
        (table, started.elapsed())
    }
}

impl<D: Dataplane> Reconciler<D> {
    /// The tables an [`apply`](Self::apply) of `config` with `health` would
    /// build now. Building is the slow part of a change (milliseconds per
    /// VIP at large table sizes), so the daemon builds them on other
    /// threads and hands them in; `apply` builds any it was not given.
    pub fn tables_needed(&self, config: &Config, health: &Health) -> Vec<TableJob> {
        config
            .vips
            .iter()
            .filter_map(|vip| {
                let members = plan_vip(vip, |a| is_up(health, vip.key, a)).members;
                let current = self.applied.vips.get(&vip.key);
                let built = current
                    .is_some_and(|a| a.members.as_ref() == Some(&members) && a.seed == config.seed);
                (!built).then_some(TableJob {
                    members,
                    size: self.table_size,
                    seed: config.seed,
                })
            })
            .collect()
    }

    /// Tables built from [`tables_needed`](Self::tables_needed), for the
    /// next apply.
    pub fn provide_tables(
        &mut self,
        tables: impl IntoIterator<Item = (TableJob, maglev::Table, Duration)>,
    ) {
        self.prebuilt.extend(
            tables
                .into_iter()
                .map(|(job, table, took)| (job, (table, took))),
        );
    }
}
