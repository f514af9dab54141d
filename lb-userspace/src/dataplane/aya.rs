//! The real [`Dataplane`]: the program's maps, through aya. The only module
//! that touches `aya::maps`.

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues},
};
use lb_common::{
    BackendEntry, GlobalConfig, MAX_BACKENDS, MAX_VIPS, StatBlock, Traffic, VipEntry, VipKey,
    map_names,
};

use super::{Counters, Dataplane, DataplaneError, Snapshot, VipFilter};

pub struct AyaDataplane {
    vips: HashMap<MapData, VipKey, VipEntry>,
    backends: Array<MapData, BackendEntry>,
    maglev: MappedSlots,
    config: Array<MapData, GlobalConfig>,
    vip_filter: Array<MapData, u64>,
    stats: PerCpuArray<MapData, StatBlock>,
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
        let maglev = match ebpf.take_map(map_names::MAGLEV) {
            Some(aya::maps::Map::Array(data)) if data.info().is_ok_and(|i| i.value_size() == 8) => {
                MappedSlots::new(data)?
            }
            _ => {
                return Err(DataplaneError::MissingMap {
                    map: map_names::MAGLEV,
                });
            }
        };
        Ok(Self {
            vips: take(ebpf, map_names::VIPS)?,
            backends: take(ebpf, map_names::BACKENDS)?,
            maglev,
            config: take(ebpf, map_names::CONFIG)?,
            vip_filter: take(ebpf, map_names::VIP_FILTER)?,
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
                new_flows: acc.new_flows + t.new_flows,
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
        self.maglev.write(base, slots)
    }

    fn set_vip(&mut self, key: VipKey, entry: VipEntry) -> Result<(), DataplaneError> {
        self.vips
            .insert(key, entry, 0)
            .map_err(map_err(map_names::VIPS))
    }

    fn remove_vip(&mut self, key: VipKey) -> Result<(), DataplaneError> {
        self.vips.remove(&key).map_err(map_err(map_names::VIPS))
    }

    fn set_vip_filter(&mut self, words: &VipFilter) -> Result<(), DataplaneError> {
        for (i, &w) in words.iter().enumerate() {
            self.vip_filter
                .set(i as u32, w, 0)
                .map_err(map_err(map_names::VIP_FILTER))?;
        }
        Ok(())
    }

    fn zero_traffic(
        &mut self,
        vip: Option<u32>,
        backend: Option<u32>,
    ) -> Result<(), DataplaneError> {
        let zeros = || -> Result<PerCpuValues<Traffic>, DataplaneError> {
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e))?;
            PerCpuValues::try_from(vec![Traffic::default(); cpus]).map_err(DataplaneError::Cpus)
        };
        if let Some(id) = vip {
            self.vip_stats
                .set(id, zeros()?, 0)
                .map_err(map_err(map_names::VIP_STATS))?;
        }
        if let Some(id) = backend {
            self.backend_stats
                .set(id, zeros()?, 0)
                .map_err(map_err(map_names::BACKEND_STATS))?;
        }
        Ok(())
    }

    fn counters(&self) -> Result<Counters, DataplaneError> {
        let per_cpu = self.stats.get(&0, 0).map_err(map_err(map_names::STATS))?;
        let mut stats = vec![0u64; lb_common::STAT_COUNT as usize];
        for block in per_cpu.iter() {
            for (sum, v) in stats.iter_mut().zip(block) {
                *sum += v;
            }
        }
        Ok(Counters {
            stats,
            vips: sum_traffic(&self.vip_stats, map_names::VIP_STATS, MAX_VIPS)?,
            backends: sum_traffic(&self.backend_stats, map_names::BACKEND_STATS, MAX_BACKENDS)?,
        })
    }

    fn snapshot(&self) -> Result<Snapshot, DataplaneError> {
        let global = self.config.get(&0, 0).map_err(map_err(map_names::CONFIG))?;
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
        Ok(Snapshot {
            global,
            vips,
            backends,
        })
    }
}

/// The `MAGLEV` array (created with `BPF_F_MMAPABLE`) mapped into this
/// process: a table half is written with plain stores instead of a system
/// call per slot. Userspace only writes the half no VIP entry names (plus a
/// grace period after a swap, see reconcile), so packets read a complete table.
struct MappedSlots {
    ptr: std::ptr::NonNull<u32>,
    len: usize,
    bytes: usize,
    /// Keeps the map (and so the mapping's object) alive.
    _map: MapData,
}

impl MappedSlots {
    fn new(map: MapData) -> Result<Self, DataplaneError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let info = map.info().map_err(map_err(map_names::MAGLEV))?;
        // Slots (u32), two per element.
        let len = info.max_entries() as usize * 2;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let bytes = (len * 4).div_ceil(page) * page;
        // SAFETY: maps `bytes` of the map's memory, shared with the kernel;
        // the fd is valid for the call and the mapping outlives it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DataplaneError::Mmap(std::io::Error::last_os_error()));
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<u32>())
            .ok_or(DataplaneError::Mmap(std::io::Error::other("null mapping")))?;
        Ok(Self {
            ptr,
            len,
            bytes,
            _map: map,
        })
    }

    fn write(&mut self, base: u32, slots: &[u32]) -> Result<(), DataplaneError> {
        let start = base as usize;
        if start + slots.len() > self.len {
            return Err(DataplaneError::TableOutOfRange {
                base,
                len: slots.len(),
                capacity: self.len as u32,
            });
        }
        // Each slot is stored whole (an aligned 32-bit store), so a reader
        // still on this half never sees a torn id.
        for (i, &id) in slots.iter().enumerate() {
            // SAFETY: in range (checked above) and 4-byte aligned (the
            // mapping is page aligned); the kernel only reads these words.
            let slot =
                unsafe { std::sync::atomic::AtomicU32::from_ptr(self.ptr.as_ptr().add(start + i)) };
            slot.store(id, std::sync::atomic::Ordering::Relaxed);
        }
        // The VIP entry update that publishes the half is a system call,
        // which orders these stores before it.
        Ok(())
    }
}

impl Drop for MappedSlots {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

// SAFETY: the mapping is owned by this value and only written through
// `&mut self`.
unsafe impl Send for MappedSlots {}
