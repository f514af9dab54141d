//! What a pinned map must be for a program to adopt it. The kernel does not
//! check a reused map against the program that uses it, so a map pinned by
//! another build or config (or by someone else) of another type, entry size,
//! capacity or flags would be used as it is: the program or the control plane
//! would then read past its end or fail on every access. Every pinned map is
//! compared with the definition in the eBPF object, with the capacities that
//! are set at load time, before anything is loaded.

use std::{collections::HashMap, io, path::Path};

use aya::maps::MapInfo;

use crate::loader::{LoadError, map_pin};

/// Type, key and value sizes, capacity and flags of a map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    map_type: u32,
    key: u32,
    value: u32,
    entries: u32,
    flags: u32,
}

/// Refuses to start when a map of `maps` pinned under `pin_dir` differs from
/// its definition in `object`, with the capacities of `entries` (map name,
/// entries given at load time) instead of the object's.
pub fn check_pins(
    object: &[u8],
    pin_dir: &Path,
    maps: &[&str],
    entries: &[(&str, u32)],
) -> Result<(), LoadError> {
    let wanted = layouts(object, entries)?;
    for map in maps {
        let path = map_pin(pin_dir, map);
        if !path.exists() {
            continue;
        }
        let Some(want) = wanted.get(*map) else {
            // lb names a map its object lacks: the build itself is broken.
            return Err(LoadError::Io {
                path,
                source: io::Error::other(format!("the eBPF object defines no map {map}")),
            });
        };
        check_pinned(&path, want)?;
    }
    Ok(())
}

/// Every map of `object` as the kernel would create it.
fn layouts(object: &[u8], entries: &[(&str, u32)]) -> Result<HashMap<String, Layout>, LoadError> {
    let parsed = aya_obj::Object::parse(object).map_err(aya::EbpfError::from)?;
    Ok(parsed
        .maps
        .iter()
        .map(|(name, m)| {
            let given = entries.iter().find(|(n, _)| n == name).map(|&(_, e)| e);
            let entries = given.unwrap_or(m.max_entries());
            let layout = Layout {
                map_type: m.map_type(),
                key: m.key_size(),
                value: m.value_size(),
                entries,
                flags: m.map_flags(),
            };
            (name.clone(), layout)
        })
        .collect())
}

fn check_pinned(path: &Path, want: &Layout) -> Result<(), LoadError> {
    let info = MapInfo::from_pin(path).map_err(|e| LoadError::Io {
        path: path.to_owned(),
        source: io::Error::other(e.to_string()),
    })?;
    // A type aya does not know cannot be the wanted one.
    let map_type = info.map_type().map_or(u32::MAX, |t| t as u32);
    let found = Layout {
        map_type,
        key: info.key_size(),
        value: info.value_size(),
        entries: info.max_entries(),
        flags: info.map_flags(),
    };
    mismatch(&found, want).map_or(Ok(()), |(what, found, wanted)| {
        Err(LoadError::PinMismatch {
            path: path.to_owned(),
            what,
            found,
            wanted,
        })
    })
}

/// The first property in which `found` differs from `want`.
fn mismatch(found: &Layout, want: &Layout) -> Option<(&'static str, u32, u32)> {
    [
        ("map type", found.map_type, want.map_type),
        ("key size", found.key, want.key),
        ("value size", found.value, want.value),
        ("max entries", found.entries, want.entries),
        ("flags", found.flags, want.flags),
    ]
    .into_iter()
    .find(|(_, found, wanted)| found != wanted)
}

#[cfg(test)]
mod tests {
    use lb_common::{MAX_VIPS, Traffic, map_names};

    use super::*;
    use crate::loader::{EBPF_OBJECT, Sizes};

    #[test]
    fn every_map_lb_pins_has_a_layout_with_load_time_capacities() {
        let sizes = Sizes {
            table_size: 251,
            max_vips: 2,
            max_flows: 1000,
            max_flows_v6: 2000,
            idle_evict: std::time::Duration::from_secs(60),
        };
        let all = layouts(EBPF_OBJECT, &sizes.capacities()).unwrap();
        for map in map_names::ALL {
            assert!(all.contains_key(map), "{map} has no layout");
        }
        assert_eq!(
            all[map_names::MAGLEV].entries,
            lb_common::maglev_entries(2, 251)
        );
        let flows = all[map_names::FLOW_TABLE];
        assert_eq!(
            flows.entries as usize * lb_common::flow_table::WAYS,
            2 * 3000,
            "two entries per configured flow of either family"
        );
        assert_eq!(flows.value, 64, "a bucket is one cache line");
        let stats = all[map_names::VIP_STATS];
        assert_eq!(stats.entries, MAX_VIPS);
        assert_eq!(stats.value as usize, size_of::<Traffic>());
    }

    #[test]
    fn any_difference_is_named() {
        let want = Layout {
            map_type: 6,
            key: 4,
            value: 32,
            entries: 256,
            flags: 0,
        };
        assert_eq!(mismatch(&want, &want), None);
        let smaller = Layout {
            entries: 128,
            ..want
        };
        assert_eq!(mismatch(&smaller, &want), Some(("max entries", 128, 256)));
        let hash = Layout {
            map_type: 1,
            ..want
        };
        assert_eq!(mismatch(&hash, &want), Some(("map type", 1, 6)));
    }
}
