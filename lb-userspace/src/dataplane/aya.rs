//! The real [`Dataplane`]: the program's maps, through aya. The only module
//! that touches `aya::maps`.

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
};
use lb_common::{
    BackendEntry, GlobalConfig, MAX_BACKENDS, MAX_VIPS, STAT_COUNT, Traffic, VipEntry, VipKey,
    map_names,
};

use super::{Counters, Dataplane, DataplaneError, Snapshot};

pub struct AyaDataplane {
    vips: HashMap<MapData, VipKey, VipEntry>,
    backends: Array<MapData, BackendEntry>,
    maglev: Array<MapData, u32>,
    maglev_capacity: u32,
    config: Array<MapData, GlobalConfig>,
    stats: PerCpuArray<MapData, u64>,
    vip_stats: PerCpuArray<MapData, Traffic>,
    backend_stats: PerCpuArray<MapData, Traffic>,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    map: &'static str,
) -> Result<T, DataplaneError> {
    let m = ebpf
        .take_map(map)
        .ok_or(DataplaneError::MissingMap { map })?;
    T::try_from(m).map_err(|source| DataplaneError::Map { map, source })
}

impl AyaDataplane {
    /// Takes the maps out of a loaded object.
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        let maglev: Array<MapData, u32> = take(ebpf, map_names::MAGLEV)?;
        Ok(Self {
            vips: take(ebpf, map_names::VIPS)?,
            backends: take(ebpf, map_names::BACKENDS)?,
            maglev_capacity: maglev.len(),
            maglev,
            config: take(ebpf, map_names::CONFIG)?,
            stats: take(ebpf, map_names::STATS)?,
            vip_stats: take(ebpf, map_names::VIP_STATS)?,
            backend_stats: take(ebpf, map_names::BACKEND_STATS)?,
        })
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

fn sum_traffic(
    map: &PerCpuArray<MapData, Traffic>,
    name: &'static str,
    len: u32,
) -> Result<Vec<Traffic>, DataplaneError> {
    (0..len)
        .map(|i| {
            let per_cpu = map.get(&i, 0).map_err(map_err(name))?;
            Ok(per_cpu.iter().fold(Traffic::default(), |acc, t| Traffic {
                packets: acc.packets + t.packets,
                bytes: acc.bytes + t.bytes,
            }))
        })
        .collect()
}

impl Dataplane for AyaDataplane {
    fn set_global(&mut self, config: GlobalConfig) -> Result<(), DataplaneError> {
        self.config
            .set(0, config, 0)
            .map_err(map_err(map_names::CONFIG))
    }

    fn set_backend(&mut self, id: u32, entry: BackendEntry) -> Result<(), DataplaneError> {
        self.backends
            .set(id, entry, 0)
            .map_err(map_err(map_names::BACKENDS))
    }

    fn write_table(&mut self, base: u32, slots: &[u32]) -> Result<(), DataplaneError> {
        let fits = (base as u64 + slots.len() as u64) <= self.maglev_capacity as u64;
        if !fits {
            return Err(DataplaneError::TableOutOfRange {
                base,
                len: slots.len(),
                capacity: self.maglev_capacity,
            });
        }
        for (i, &backend) in slots.iter().enumerate() {
            self.maglev
                .set(base + i as u32, backend, 0)
                .map_err(map_err(map_names::MAGLEV))?;
        }
        Ok(())
    }

    fn set_vip(&mut self, key: VipKey, entry: VipEntry) -> Result<(), DataplaneError> {
        self.vips
            .insert(key, entry, 0)
            .map_err(map_err(map_names::VIPS))
    }

    fn remove_vip(&mut self, key: VipKey) -> Result<(), DataplaneError> {
        self.vips.remove(&key).map_err(map_err(map_names::VIPS))
    }

    fn counters(&self) -> Result<Counters, DataplaneError> {
        let stats = (0..STAT_COUNT)
            .map(|i| {
                let per_cpu = self.stats.get(&i, 0).map_err(map_err(map_names::STATS))?;
                Ok(per_cpu.iter().sum())
            })
            .collect::<Result<_, DataplaneError>>()?;
        Ok(Counters {
            stats,
            vips: sum_traffic(&self.vip_stats, map_names::VIP_STATS, MAX_VIPS)?,
            backends: sum_traffic(&self.backend_stats, map_names::BACKEND_STATS, MAX_BACKENDS)?,
        })
    }

    fn snapshot(&self) -> Result<Snapshot, DataplaneError> {
        let vips = self
            .vips
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map_names::VIPS))?;
        let mut backends = Vec::new();
        for id in 0..MAX_BACKENDS {
            let entry = self
                .backends
                .get(&id, 0)
                .map_err(map_err(map_names::BACKENDS))?;
            if entry.generation != 0 {
                backends.push((id, entry));
            }
        }
        Ok((vips, backends))
    }
}
