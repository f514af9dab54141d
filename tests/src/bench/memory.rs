//! What the kernel charges for an lb instance's maps.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _},
};

use anyhow::Context as _;
use aya::maps::{Map, MapData};
use lb_common::map_names;
use lb_userspace::loader::{self, Sizes};
use serde::Serialize;

use super::Settings;

#[derive(Debug, Clone, Serialize)]
pub struct MapMemory {
    pub config: String,
    /// Bytes the kernel charges for each map (`memlock` in fdinfo).
    pub maps: BTreeMap<String, u64>,
    pub total: u64,
}

/// The default config's maps, and the largest supported config's if
/// `s.largest_memory` (that allocates gigabytes).
pub fn memory(s: &Settings) -> anyhow::Result<Vec<MapMemory>> {
    let default_sizes = Sizes {
        table_size: 65537,
        max_vips: 16,
        max_flows: 262_144,
        max_flows_v6: 262_144,
        idle_evict: std::time::Duration::from_secs(60),
    };
    let mut memory = vec![measure("default", default_sizes)?];
    if s.largest_memory {
        let largest = Sizes {
            table_size: 655_373,
            max_vips: lb_common::MAX_VIPS,
            max_flows: 16_777_216,
            max_flows_v6: 16_777_216,
            ..default_sizes
        };
        memory.push(measure("largest", largest)?);
    }
    Ok(memory)
}

/// What the kernel charges for every map of an lb instance with these sizes.
fn measure(label: &str, sizes: Sizes) -> anyhow::Result<MapMemory> {
    let mut ebpf = loader::load(sizes, None)?;
    let mut maps = BTreeMap::new();
    for name in map_names::ALL {
        let map = ebpf.take_map(name).with_context(|| format!("map {name}"))?;
        let data = map_data(map).with_context(|| format!("map {name} type"))?;
        maps.insert(name.to_string(), memlock(&data)?);
    }
    let total = maps.values().sum();
    Ok(MapMemory {
        config: format!(
            "{label}: max_vips {}, table_size {}, max_flows {}",
            sizes.max_vips, sizes.table_size, sizes.max_flows
        ),
        maps,
        total,
    })
}

fn map_data(map: Map) -> Option<MapData> {
    match map {
        Map::Array(d) | Map::PerCpuArray(d) | Map::HashMap(d) | Map::LruHashMap(d) => Some(d),
        _ => None,
    }
}

fn memlock(map: &MapData) -> anyhow::Result<u64> {
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .context("no memlock in fdinfo")?
        .trim()
        .parse()
        .context("memlock")
}
