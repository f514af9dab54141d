//! Weighted Maglev lookup tables (Eisenbud et al., NSDI '16, section 3.4).
//!
//! Pure: `(backends, table size, seed) -> table`, no I/O, no randomness. The
//! backends are sorted by address first and hashed with the explicit seed, so
//! every instance behind one ECMP VIP builds byte-identical tables whatever the
//! order of its config file.
//!
//! Weights: each backend's permutation is walked in turns as in the paper; a
//! backend takes a turn once per `max_weight` of credit it has accumulated, so
//! slot counts are proportional to weights (exactly equal, up to one slot, when
//! the weights are equal).

use std::net::IpAddr;

use lb_common::hash::hash_words;

/// Second seed for the skip hash, so offset and skip are independent.
const SKIP_SALT: u32 = 0x9e37_79b9;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Weighted {
    pub address: IpAddr,
    pub weight: u32,
}

/// A built table: `slots[i]` indexes `backends`, which is sorted by address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub backends: Vec<Weighted>,
    pub slots: Vec<u32>,
}

impl Table {
    /// Number of slots owned by each backend, in `backends` order.
    pub fn slot_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.backends.len()];
        // A table without backends holds only NO_BACKEND, which counts nowhere.
        for &s in &self.slots {
            if let Some(c) = counts.get_mut(s as usize) {
                *c += 1;
            }
        }
        counts
    }
}

/// Builds the table. `table_size` must be prime (validated by the config);
/// backends with weight 0 get no slot. With no (positive-weight) backend every
/// slot is [`lb_common::NO_BACKEND`].
pub fn build(backends: &[Weighted], table_size: u32, seed: u32) -> Table {
    let mut sorted: Vec<Weighted> = backends.to_vec();
    sorted.sort_by_key(|b| b.address);
    let m = table_size;
    let mut slots = vec![lb_common::NO_BACKEND; m as usize];
    let max_weight = sorted.iter().map(|b| b.weight).max().unwrap_or(0);
    if max_weight == 0 || m < 2 {
        return Table {
            backends: sorted,
            slots,
        };
    }

    // Each backend walks its permutation offset + j * skip (mod m); `next` is
    // its current candidate slot. One struct per backend keeps the walk's
    // state in one cache line, and the step is an add and a conditional
    // subtract rather than a division: this loop runs about m * ln(m) times.
    struct Walk {
        next: u32,
        skip: u32,
        credit: u32,
        weight: u32,
    }
    let mut walks: Vec<Walk> = sorted
        .iter()
        .map(|b| {
            let walk = |key: &[u32]| {
                (
                    hash_words(key, seed) % m,
                    hash_words(key, seed ^ SKIP_SALT) % (m - 1) + 1,
                )
            };
            // An IPv6 address is four words; an IPv4 one is one word.
            let (next, skip) = match b.address {
                IpAddr::V4(a) => walk(&[a.to_bits()]),
                IpAddr::V6(a) => {
                    let w = a.to_bits();
                    walk(&[
                        (w >> 96) as u32,
                        (w >> 64) as u32,
                        (w >> 32) as u32,
                        w as u32,
                    ])
                }
            };
            Walk {
                next,
                skip,
                credit: 0,
                weight: b.weight,
            }
        })
        .collect();
    let mut filled = 0u32;
    loop {
        for (i, w) in walks.iter_mut().enumerate() {
            w.credit += w.weight;
            if w.credit < max_weight {
                continue;
            }
            w.credit -= max_weight;
            // Walk the permutation to the first free slot. Since m is prime and
            // skip < m, the walk visits every slot, so it terminates.
            loop {
                let c = w.next as usize;
                w.next += w.skip;
                if w.next >= m {
                    w.next -= m;
                }
                if slots[c] == lb_common::NO_BACKEND {
                    slots[c] = i as u32;
                    break;
                }
            }
            filled += 1;
            if filled == m {
                return Table {
                    backends: sorted,
                    slots,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const M: u32 = 65537;

    fn backends(n: usize, weight: impl Fn(usize) -> u32) -> Vec<Weighted> {
        (0..n)
            .map(|i| Weighted {
                // Spread over 10.0.0.0/8 so addresses are not all adjacent.
                address: IpAddr::from(std::net::Ipv4Addr::from_bits(
                    0x0a00_0000 + (i as u32) * 7919,
                )),
                weight: weight(i),
            })
            .collect()
    }

    #[test]
    fn every_slot_is_filled_and_indexes_a_backend() {
        let t = build(&backends(3, |i| i as u32 + 1), 251, 1);
        assert!(t.slots.iter().all(|&s| (s as usize) < 3));
    }

    #[test]
    fn no_backends_gives_an_empty_table() {
        let t = build(&[], 251, 1);
        assert!(t.slots.iter().all(|&s| s == lb_common::NO_BACKEND));
        assert!(t.slot_counts().is_empty());
    }

    #[test]
    fn seed_changes_the_table() {
        let b = backends(10, |_| 1);
        assert_ne!(build(&b, M, 1).slots, build(&b, M, 2).slots);
    }

    /// Every backend gets floor(M/n) or ceil(M/n) slots: the best integers
    /// allow, so within 1% of the mean wherever a whole slot is less than 1%
    /// of it. (Where it is not, e.g. n = 662, no split of 65537 slots can keep
    /// every count within 1%: one backend must get 98 of a mean 99.0.)
    fn assert_equal_shares(n: usize) {
        let t = build(&backends(n, |_| 1), M, 0x5eed);
        let mean = M as f64 / n as f64;
        for (i, &c) in t.slot_counts().iter().enumerate() {
            assert!(
                c == mean.floor() as usize || c == mean.ceil() as usize,
                "n={n} backend {i}: {c} slots, mean {mean:.2}"
            );
        }
    }

    /// Slots that move between surviving backends when `victim` of 100
    /// equal backends is removed, with `seed`.
    fn moved_between_survivors(victim: usize, seed: u32) -> usize {
        let before = backends(100, |_| 1);
        let mut after = before.clone();
        let gone = after.remove(victim).address;
        let t0 = build(&before, M, seed);
        let t1 = build(&after, M, seed);
        t0.slots
            .iter()
            .zip(&t1.slots)
            .filter(|&(&a, &b)| {
                let (a, b) = (
                    t0.backends[a as usize].address,
                    t1.backends[b as usize].address,
                );
                a != gone && a != b
            })
            .count()
    }

    /// Removing one of 100 backends moves few slots between the survivors
    /// (the removed one's slots must move). Maglev bounds this statistically,
    /// not per seed: over 200 seeds the median and the 99th percentile stay
    /// within 1% of the table; a rare seed moves a little more (1.2% is the
    /// worst seen, e.g. seed 2297185940 removing backend 60), so the worst
    /// case is held to 1.5%.
    #[test]
    fn removing_one_backend_disrupts_little() {
        let mut moved: Vec<usize> = (0..200u32)
            .map(|i| moved_between_survivors((i as usize * 37) % 100, i.wrapping_mul(0x9e37_79b9)))
            .collect();
        moved.sort();
        let pct = |n: usize| 100.0 * n as f64 / M as f64;
        let (median, p99, worst) = (pct(moved[100]), pct(moved[198]), pct(moved[199]));
        assert!(
            median <= 1.0 && p99 <= 1.0 && worst <= 1.5,
            "median {median:.2}%, p99 {p99:.2}%, worst {worst:.2}%"
        );
        assert!(pct(moved_between_survivors(60, 2297185940)) <= 1.5);
    }

    #[test]
    fn equal_weights_at_the_edge_n_1000() {
        assert_equal_shares(1000);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Equal weights, N up to 1000: every share within 1% of the mean.
        #[test]
        fn equal_weights_are_balanced(n in 1usize..=1000) {
            assert_equal_shares(n);
        }

        /// Weighted shares track weights within 2% (relative).
        #[test]
        fn weighted_shares_track_weights(ws in proptest::collection::vec(1u32..=10, 2..=50)) {
            let b = backends(ws.len(), |i| ws[i]);
            let t = build(&b, M, 0x5eed);
            let total: u32 = ws.iter().sum();
            for (i, &c) in t.slot_counts().iter().enumerate() {
                let expected = M as f64 * t.backends[i].weight as f64 / total as f64;
                let dev = (c as f64 - expected).abs() / expected;
                prop_assert!(dev <= 0.02, "backend {i}: {c} slots, expected {expected:.1}");
            }
        }

        /// The table is byte-identical for 100 random orderings of the list.
        #[test]
        fn independent_of_backend_order(
            n in 1usize..=200,
            orderings in proptest::collection::vec(any::<u32>(), 100),
        ) {
            let b = backends(n, |i| (i % 5) as u32 + 1);
            let reference = build(&b, M, 0x5eed);
            for key in orderings {
                let mut shuffled = b.clone();
                shuffled.sort_by_key(|x| hash_words(&lb_common::addr_key(x.address).map(u32::from), key));
                prop_assert!(build(&shuffled, M, 0x5eed) == reference.clone());
            }
        }
    }
}
