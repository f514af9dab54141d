//! The boundary between the control plane and the kernel maps. Reconcile logic
//! talks to [`Dataplane`]; [`aya::AyaDataplane`] is the only code that touches
//! `aya::maps`, and [`fake::FakeDataplane`] stands in for it in unit tests.

pub mod aya;
pub mod fake;

use lb_common::{BackendEntry, GlobalConfig, STAT_COUNT, Stat, Traffic, VipEntry, VipKey};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: ::aya::maps::MapError,
    },
    #[error("map {map} is missing from the eBPF object")]
    MissingMap { map: &'static str },
    #[error("map {map} does not have the type and value layout this build expects")]
    Layout { map: &'static str },
    #[error("counting CPUs: {0}")]
    Cpus(std::io::Error),
    #[error("mapping an mmap-able map: {0}")]
    Mmap(std::io::Error),
    #[error("table of {len} slots at {base} does not fit the Maglev map ({capacity} slots)")]
    TableOutOfRange {
        base: u32,
        len: usize,
        capacity: u32,
    },
}

/// What a restarted control plane adopts: the global settings, every VIP
/// entry, and every backend entry ever written (generation non-zero).
pub struct Snapshot {
    pub global: GlobalConfig,
    pub vips: Vec<(VipKey, VipEntry)>,
    pub backends: Vec<(u32, BackendEntry)>,
}

pub type VipFilter = [u64; lb_common::VIP_FILTER_WORDS as usize];

/// Every counter the program keeps, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Indexed by `Stat as usize`.
    pub stats: Vec<u64>,
    /// Indexed by VIP id.
    pub vips: Vec<Traffic>,
    /// Indexed by backend id.
    pub backends: Vec<Traffic>,
    /// Flow-table entries in use, `[IPv4, IPv6]` (counted from the table).
    pub flow_entries: [u64; 2],
}

impl Counters {
    /// A global counter; `ActionPass` and `ActionDrop` are the sums of their
    /// reasons (the program counts each passed or dropped packet once).
    pub fn stat(&self, stat: Stat) -> u64 {
        match stat {
            Stat::ActionPass | Stat::ActionDrop => Stat::ALL
                .iter()
                .filter(|s| s.action() == Some(stat))
                .map(|&s| self.raw(s))
                .sum(),
            _ => self.raw(stat),
        }
    }

    fn raw(&self, stat: Stat) -> u64 {
        self.stats.get(stat as usize).copied().unwrap_or(0)
    }

    /// `(name, value)` of every non-zero global counter, for log lines.
    pub fn nonzero_stats(&self) -> Vec<(&'static str, u64)> {
        Stat::ALL
            .iter()
            .map(|&s| (s.name(), self.stat(s)))
            .filter(|&(_, v)| v != 0)
            .collect()
    }

    pub(crate) fn empty() -> Counters {
        Counters {
            stats: vec![0; STAT_COUNT as usize],
            vips: vec![Traffic::default(); lb_common::MAX_VIPS as usize],
            backends: vec![Traffic::default(); lb_common::MAX_BACKENDS as usize],
            flow_entries: [0; 2],
        }
    }
}

/// Writes to and reads from the program's maps. Each call is one or more map
/// updates; callers order them so the program never sees a half-done change
/// (table before the VIP entry that points at it).
pub trait Dataplane {
    fn set_global(&mut self, config: GlobalConfig) -> Result<(), DataplaneError>;
    fn set_backend(&mut self, id: u32, entry: BackendEntry) -> Result<(), DataplaneError>;
    /// Writes `slots` (backend ids) to the Maglev map starting at `base`.
    fn write_table(&mut self, base: u32, slots: &[u32]) -> Result<(), DataplaneError>;
    fn set_vip(&mut self, key: VipKey, entry: VipEntry) -> Result<(), DataplaneError>;
    fn remove_vip(&mut self, key: VipKey) -> Result<(), DataplaneError>;
    /// Replaces the VIP destination bitmap (`lb_common::vip_filter_bit`).
    fn set_vip_filter(&mut self, words: &VipFilter) -> Result<(), DataplaneError>;
    fn counters(&self) -> Result<Counters, DataplaneError>;
    /// Zeroes the traffic counters of a VIP id and/or a backend id about to
    /// be given to a new VIP or backend, so it does not inherit old counts.
    fn zero_traffic(
        &mut self,
        vip: Option<u32>,
        backend: Option<u32>,
    ) -> Result<(), DataplaneError>;
    fn snapshot(&self) -> Result<Snapshot, DataplaneError>;
}
