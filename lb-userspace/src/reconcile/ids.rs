//! VIP and backend ids: the lowest free one is handed out, a released one
//! stays in quarantine for a while before it is free again, and every backend
//! id handed out gets a generation never used before.

use std::{
    collections::{BTreeSet, VecDeque},
    time::{Duration, Instant},
};

use super::ReconcileError;

/// How long a freed VIP or backend id stays unused by default: a packet may
/// still be using it.
pub const ID_QUARANTINE: Duration = Duration::from_secs(1);

/// The ids below a capacity. Every id below `next_unused` is in use, in
/// quarantine or in `free`; the lowest free id is therefore `free`'s first or,
/// when `free` is empty, `next_unused`.
#[derive(Debug)]
pub struct IdPool {
    what: &'static str,
    capacity: u32,
    next_unused: u32,
    free: BTreeSet<u32>,
    /// Released ids and when, oldest first (releases happen in time order).
    quarantined: VecDeque<(u32, Instant)>,
    quarantine: Duration,
}

impl IdPool {
    pub fn new(what: &'static str, capacity: u32) -> Self {
        Self {
            what,
            capacity,
            next_unused: 0,
            free: BTreeSet::new(),
            quarantined: VecDeque::new(),
            quarantine: ID_QUARANTINE,
        }
    }

    fn set_quarantine(&mut self, quarantine: Duration) {
        self.quarantine = quarantine;
    }

    /// The lowest id free at `now`, without claiming it: an id is claimed
    /// only once the maps name it, so a failed write leaves it free.
    pub fn lowest_free(&mut self, now: Instant) -> Result<u32, ReconcileError> {
        self.expire(now);
        match self.free.first() {
            Some(&id) => Ok(id),
            None if self.next_unused < self.capacity => Ok(self.next_unused),
            None => Err(ReconcileError::Exhausted {
                what: self.what,
                capacity: self.capacity,
            }),
        }
    }

    /// How many ids are free at `now`, and when the quarantined ones will
    /// all be free too (`None` when none is in quarantine).
    pub fn room(&mut self, now: Instant) -> Room {
        self.expire(now);
        Room {
            free: self.free.len() as u32 + (self.capacity - self.next_unused),
            quarantined: self.quarantined.len() as u32,
            all_free_at: self.quarantined.back().map(|&(_, at)| at + self.quarantine),
        }
    }

    pub fn what(&self) -> &'static str {
        self.what
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Marks `id` in use: one [`lowest_free`](Self::lowest_free) gave, or
    /// one adopted from maps a previous run wrote.
    pub fn claim(&mut self, id: u32) {
        if id >= self.next_unused {
            self.free.extend(self.next_unused..id);
            self.next_unused = id + 1;
        } else {
            self.free.remove(&id);
        }
    }

    /// Frees the ids whose quarantine is over at `now`.
    fn expire(&mut self, now: Instant) {
        while let Some(&(id, at)) = self.quarantined.front()
            && now.saturating_duration_since(at) >= self.quarantine
        {
            self.quarantined.pop_front();
            self.free.insert(id);
        }
    }

    /// Puts `id` in quarantine from `now` on.
    pub fn release(&mut self, id: u32, now: Instant) {
        self.quarantined.push_back((id, now));
    }
}

/// Free ids of one pool at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub free: u32,
    pub quarantined: u32,
    pub all_free_at: Option<Instant>,
}

/// Every id the reconciler hands out.
#[derive(Debug)]
pub struct Ids {
    pub vips: IdPool,
    pub backends: IdPool,
    pub generations: Generations,
}

impl Ids {
    pub fn new(max_vips: u32) -> Self {
        Self {
            vips: IdPool::new("VIP", max_vips),
            backends: IdPool::new("backend", lb_common::MAX_BACKENDS),
            generations: Generations::default(),
        }
    }

    /// How long released ids of either kind stay unused.
    pub fn set_quarantine(&mut self, quarantine: Duration) {
        self.vips.set_quarantine(quarantine);
        self.backends.set_quarantine(quarantine);
    }
}

/// Generations of backend ids: never 0 (which marks an entry never written),
/// and never one a previous use of any id had.
#[derive(Debug)]
pub struct Generations {
    next: u32,
}

impl Default for Generations {
    fn default() -> Self {
        Self { next: 1 }
    }
}

impl Generations {
    /// The generation for an id handed out now.
    pub fn next(&mut self) -> u32 {
        let generation = self.next;
        self.next = self.next.wrapping_add(1).max(1);
        generation
    }

    /// Takes note of a generation found in the maps, so none is handed out
    /// twice.
    pub fn seen(&mut self, generation: u32) {
        self.next = self.next.max(generation.wrapping_add(1).max(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_free_id_is_handed_out_and_claimed_ids_are_skipped() {
        let now = Instant::now();
        let mut pool = IdPool::new("test", 4);
        for expected in 0..4 {
            let id = pool.lowest_free(now).unwrap();
            assert_eq!(id, expected);
            pool.claim(id);
        }
        assert!(matches!(
            pool.lowest_free(now),
            Err(ReconcileError::Exhausted {
                what: "test",
                capacity: 4
            })
        ));
    }

    #[test]
    fn a_released_id_is_free_again_only_after_its_quarantine() {
        let start = Instant::now();
        let mut pool = IdPool::new("test", 8);
        for id in 0..3 {
            pool.claim(id);
        }
        pool.release(1, start);
        assert_eq!(pool.lowest_free(start).unwrap(), 3, "1 is in quarantine");
        let later = start + ID_QUARANTINE;
        assert_eq!(pool.lowest_free(later).unwrap(), 1);
        pool.claim(1);
        assert_eq!(pool.lowest_free(later).unwrap(), 3);
    }

    #[test]
    fn room_counts_free_ids_and_says_when_the_quarantined_ones_are_free() {
        let start = Instant::now();
        let mut pool = IdPool::new("test", 4);
        for id in 0..3 {
            pool.claim(id);
        }
        pool.release(0, start);
        pool.release(2, start + Duration::from_millis(10));
        assert_eq!(
            pool.room(start),
            Room {
                free: 1,
                quarantined: 2,
                all_free_at: Some(start + Duration::from_millis(10) + ID_QUARANTINE)
            }
        );
        let later = start + ID_QUARANTINE + Duration::from_millis(10);
        assert_eq!(pool.room(later).free, 3);
        assert_eq!(pool.room(later).all_free_at, None);
    }

    #[test]
    fn adopted_ids_leave_the_gaps_between_them_free() {
        let now = Instant::now();
        let mut pool = IdPool::new("test", 8);
        pool.claim(2);
        pool.claim(5);
        let mut handed = Vec::new();
        for _ in 0..6 {
            let id = pool.lowest_free(now).unwrap();
            pool.claim(id);
            handed.push(id);
        }
        assert_eq!(handed, [0, 1, 3, 4, 6, 7]);
    }

    #[test]
    fn generations_skip_zero_and_every_one_seen() {
        let mut g = Generations::default();
        assert_eq!(g.next(), 1);
        g.seen(7);
        assert_eq!(g.next(), 8);
        g.seen(3);
        assert_eq!(g.next(), 9);
        let mut last = Generations { next: u32::MAX };
        assert_eq!((last.next(), last.next()), (u32::MAX, 1), "wraps past 0");
    }
}
