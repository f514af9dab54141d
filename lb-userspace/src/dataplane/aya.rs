//! The real [`Dataplane`]: the program's maps, through aya. The only module
//! that touches `aya::maps`.

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues},
};
use lb_common::{
    BackendEntry, GlobalConfig, MAX_BACKENDS, MAX_VIPS, StatBlock, Traffic, VipEntry, VipKey,
    flow_table::FlowBucket, map_names,
};

use super::{Counters, Dataplane, DataplaneError, Snapshot, VipFilter};

pub struct AyaDataplane {
    vips: HashMap<MapData, VipKey, VipEntry>,
    backends: Array<MapData, BackendEntry>,
    maglev: MappedSlots,
    flows: MappedFlows,
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
        let flows = match ebpf.take_map(map_names::FLOW_TABLE) {
            Some(aya::maps::Map::Array(data)) => MappedFlows::new(data)?,
            _ => {
                return Err(DataplaneError::MissingMap {
                    map: map_names::FLOW_TABLE,
                });
            }
        };
        Ok(Self {
            flows,
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
            flow_entries: self.flows.entries(),
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

/// An array map created with `BPF_F_MMAPABLE`, mapped into this process.
struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    bytes: usize,
    /// Keeps the map (and so the mapping's object) alive.
    _map: MapData,
}

impl Mapping {
    /// Maps the whole value area of `map` (`max_entries * value_size`
    /// bytes), read-only unless `writable`.
    fn new(map: MapData, name: &'static str, writable: bool) -> Result<Self, DataplaneError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let info = map.info().map_err(map_err(name))?;
        let len = info.max_entries() as usize * info.value_size() as usize;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let bytes = len.div_ceil(page).max(1) * page;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: maps `bytes` of the map's memory, shared with the kernel;
        // the fd is valid for the call and the mapping outlives it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                prot,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DataplaneError::Mmap(std::io::Error::last_os_error()));
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<u8>())
            .ok_or(DataplaneError::Mmap(std::io::Error::other("null mapping")))?;
        Ok(Self {
            ptr,
            bytes,
            _map: map,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

// SAFETY: the mapping is owned by this value; writes go through `&mut self`
// of its owner.
unsafe impl Send for Mapping {}

/// The `MAGLEV` array mapped into this process: a table half is written with
/// plain stores instead of a system call per slot. Userspace only writes the
/// half no VIP entry names (plus a grace period after a swap, see
/// reconcile), so packets read a complete table.
struct MappedSlots {
    mapping: Mapping,
    /// Slots (u32), two per element.
    len: usize,
}

impl MappedSlots {
    fn new(map: MapData) -> Result<Self, DataplaneError> {
        let len = map
            .info()
            .map_err(map_err(map_names::MAGLEV))?
            .max_entries() as usize
            * 2;
        Ok(Self {
            mapping: Mapping::new(map, map_names::MAGLEV, true)?,
            len,
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
        let words = self.mapping.ptr.as_ptr().cast::<u32>();
        // Each slot is stored whole (an aligned 32-bit store), so a reader
        // still on this half never sees a torn id.
        for (i, &id) in slots.iter().enumerate() {
            // SAFETY: in range (checked above) and 4-byte aligned (the
            // mapping is page aligned); the kernel only reads these words.
            let slot = unsafe { std::sync::atomic::AtomicU32::from_ptr(words.add(start + i)) };
            slot.store(id, std::sync::atomic::Ordering::Relaxed);
        }
        // The VIP entry update that publishes the half is a system call,
        // which orders these stores before it.
        Ok(())
    }
}

/// The `FLOW_TABLE` array mapped read-only: its entries are counted without
/// a system call per bucket (the program is the table's only writer).
struct MappedFlows {
    mapping: Mapping,
    buckets: usize,
}

impl MappedFlows {
    fn new(map: MapData) -> Result<Self, DataplaneError> {
        let name = map_names::FLOW_TABLE;
        let info = map.info().map_err(map_err(name))?;
        if info.value_size() as usize != size_of::<FlowBucket>() {
            return Err(DataplaneError::Layout { map: name });
        }
        Ok(Self {
            buckets: info.max_entries() as usize,
            mapping: Mapping::new(map, name, false)?,
        })
    }

    /// Entries in use, `[IPv4, IPv6]`.
    fn entries(&self) -> [u64; 2] {
        // SAFETY: the mapping holds `buckets` page-aligned buckets and lives
        // as long as `self`; `count_entries` reads them with volatile loads.
        let buckets = unsafe {
            std::slice::from_raw_parts(self.mapping.ptr.as_ptr().cast::<FlowBucket>(), self.buckets)
        };
        lb_common::flow_table::count_entries(buckets)
    }
}
