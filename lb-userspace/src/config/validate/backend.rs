//! Each backend of a VIP: a usable address, unique within the VIP, and a
//! weight.

use std::collections::HashSet;

use super::parse_ip;
use crate::config::{errors::Problems, model::Backend, raw::RawBackend};

pub const WEIGHT_MAX: i64 = 65_535;

/// The backends of the VIP at `at` (`vips[i]`). Those with a usable address
/// come back with their index in the file, for later problems to name.
pub(super) fn validate_all(
    p: &mut Problems,
    at: &str,
    raw: Vec<RawBackend>,
) -> Vec<(usize, Backend)> {
    if raw.is_empty() {
        p.add(format!("{at}.backends"), "must list at least one backend");
    }
    let mut seen = HashSet::new();
    raw.into_iter()
        .enumerate()
        .filter_map(|(j, b)| {
            let at = format!("{at}.backends[{j}]");
            let address = parse_ip(p, &format!("{at}.address"), &b.address);
            if let Some(a) = address
                && !seen.insert(a)
            {
                p.add(format!("{at}.address"), format!("duplicate backend {a}"));
            }
            if !(1..=WEIGHT_MAX).contains(&b.weight) {
                p.add(
                    format!("{at}.weight"),
                    format!("{} is out of range 1..={WEIGHT_MAX}", b.weight),
                );
            }
            let backend = Backend {
                address: address?,
                weight: b.weight.clamp(1, WEIGHT_MAX) as u32,
                state: b.state,
            };
            Some((j, backend))
        })
        .collect()
}
