//! Ids for a change, found before anything is written: a change that does
//! not fit is refused whole. VIPs the change removes hand their ids to the
//! VIPs it adds.

use std::{collections::BTreeSet, net::IpAddr, time::Instant};

use lb_common::VipKey;

use super::{AppliedVip, ID_QUARANTINE, ReconcileError, Reconciler};
use crate::{
    config::{Config, Vip},
    dataplane::Dataplane,
};

pub(super) fn no_room_message(
    what: &str,
    needed: u32,
    free: u32,
    quarantined: u32,
    capacity: u32,
) -> String {
    let mut m = format!(
        "the change needs {needed} new {what} ids, {free} are free (capacity {capacity}); nothing was applied"
    );
    if quarantined > 0 {
        m += &format!(
            "; {quarantined} more are free again once packets can no longer hold them (within {} ms)",
            ID_QUARANTINE.as_millis()
        );
    }
    m
}

/// A new VIP key taking over the id of a removed one.
#[derive(Debug, Clone, Copy)]
pub(super) struct Move {
    old: VipKey,
    new: VipKey,
    /// The same VIP (by name) at a new address, port or protocol.
    same_vip: bool,
}

impl<D: Dataplane> Reconciler<D> {
    /// New VIPs that take over the id of a VIP this change removes, as
    /// (old key, new key, same VIP). A VIP whose address, port or protocol
    /// changed is found by its name and keeps its backends' ids too; other
    /// new VIPs take the ids of other removed ones. Either way no id waits
    /// for its quarantine: a table is written only into the half the old
    /// entry did not point at, after its grace, so a packet still reading
    /// the old VIP's table is undisturbed. A change at full capacity thus
    /// still applies whole.
    pub(super) fn moved_vips(&self, config: &Config, wanted: &BTreeSet<VipKey>) -> Vec<Move> {
        let mut gone: Vec<(&VipKey, &AppliedVip)> = self
            .applied
            .vips
            .iter()
            .filter(|(k, _)| !wanted.contains(k))
            .collect();
        let mut added: Vec<&Vip> = config
            .vips
            .iter()
            .filter(|v| !self.applied.vips.contains_key(&v.key))
            .collect();
        let mut moves = Vec::new();
        added.retain(|v| match gone.iter().position(|(_, a)| a.name == v.name) {
            Some(i) => {
                let (old, _) = gone.remove(i);
                moves.push(Move {
                    old: *old,
                    new: v.key,
                    same_vip: true,
                });
                false
            }
            None => true,
        });
        moves.extend(added.iter().zip(&gone).map(|(v, (old, _))| Move {
            old: **old,
            new: v.key,
            same_vip: false,
        }));
        moves
    }

    /// Refuses, before anything is written, a change that needs more new
    /// VIP or backend ids than are free now: it is applied whole or not at
    /// all. A VIP's removed backends lend their ids to its added ones (see
    /// [`backend_id`](Self::backend_id)); ids of other VIPs' removed
    /// backends wait for their quarantine, so they do not count.
    pub(super) fn check_room(
        &mut self,
        config: &Config,
        moves: &[Move],
    ) -> Result<(), ReconcileError> {
        let new_vips = config
            .vips
            .iter()
            .filter(|v| !self.applied.vips.contains_key(&v.key))
            .count()
            - moves.len();
        let mut new_backends = 0;
        for v in &config.vips {
            let had = moves
                .iter()
                .find(|m| m.new == v.key && m.same_vip)
                .map_or(v.key, |m| m.old);
            let kept = v
                .backends
                .iter()
                .filter(|b| self.applied.backend_id(&had, b.address).is_some())
                .count();
            let had_count = self.applied.backend_ids(&had).count();
            new_backends += (v.backends.len() - kept).saturating_sub(had_count - kept);
        }
        let now = Instant::now();
        for (pool, needed) in [
            (&mut self.ids.vips, new_vips),
            (&mut self.ids.backends, new_backends),
        ] {
            let needed = needed as u32;
            let room = pool.room(now);
            if needed > room.free {
                return Err(ReconcileError::NoRoom {
                    what: pool.what(),
                    needed,
                    free: room.free,
                    quarantined: room.quarantined,
                    capacity: pool.capacity(),
                    retry_at: room
                        .all_free_at
                        .filter(|_| needed <= room.free + room.quarantined),
                });
            }
        }
        Ok(())
    }

    /// Re-keys each moved VIP: the old key leaves the VIP map and the new
    /// VIP takes over its id; its table is rebuilt (into the other half,
    /// after the grace), and only then is the new key written. A VIP that
    /// only changed address keeps its backends' ids; another VIP's backends
    /// are released, and its counters start from zero.
    pub(super) fn move_vips(&mut self, moves: &[Move]) -> Result<(), ReconcileError> {
        for m in moves {
            self.dp.remove_vip(m.old)?;
            let Some(mut a) = self.applied.vips.remove(&m.old) else {
                continue;
            };
            a.members = None;
            if m.same_vip {
                let ids: Vec<(IpAddr, u32)> = self.applied.backend_ids(&m.old).collect();
                for (addr, id) in ids {
                    self.applied.backend_ids.remove(&(m.old, addr));
                    self.applied.backend_ids.insert((m.new, addr), id);
                }
            } else {
                self.dp.zero_traffic(Some(a.id()), None)?;
                self.release_backends(|(k, _)| *k == m.old)?;
            }
            self.applied.vips.insert(m.new, a);
        }
        Ok(())
    }
}
