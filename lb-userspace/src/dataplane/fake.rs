//! An in-memory [`Dataplane`] that records map contents, for unit tests of the
//! reconcile logic.

use std::collections::BTreeMap;

use lb_common::{BackendEntry, GlobalConfig, VipEntry, VipKey};

use super::{Counters, Dataplane, DataplaneError, Snapshot, VipFilter};

#[derive(Debug)]
pub struct FakeDataplane {
    pub global: GlobalConfig,
    pub backends: BTreeMap<u32, BackendEntry>,
    pub maglev: BTreeMap<u32, u32>,
    pub vips: BTreeMap<VipKey, VipEntry>,
    pub vip_filter: VipFilter,
    /// Every filter written, in order.
    pub vip_filters: Vec<VipFilter>,
    /// Every call in order, e.g. `"write_table 0 251"`, `"set_vip 0"`.
    pub log: Vec<String>,
}

impl Default for FakeDataplane {
    fn default() -> Self {
        Self {
            global: GlobalConfig::default(),
            backends: BTreeMap::new(),
            maglev: BTreeMap::new(),
            vips: BTreeMap::new(),
            vip_filter: [0; lb_common::VIP_FILTER_WORDS as usize],
            vip_filters: Vec::new(),
            log: Vec::new(),
        }
    }
}

impl FakeDataplane {
    /// Whether `filter` lets the program look further at packets for `addr`.
    pub fn admits(filter: &VipFilter, addr: std::net::IpAddr) -> bool {
        let (w, bit) = lb_common::vip_filter_bit_of(addr);
        filter[w as usize] & bit != 0
    }

    /// The table a VIP's entry currently points at.
    pub fn active_table(&self, key: &VipKey) -> Option<Vec<u32>> {
        let e = self.vips.get(key)?;
        (e.table_base..e.table_base + e.table_size)
            .map(|i| self.maglev.get(&i).copied())
            .collect()
    }
}

impl Dataplane for FakeDataplane {
    fn set_global(&mut self, config: GlobalConfig) -> Result<(), DataplaneError> {
        self.log.push(format!("set_global {}", config.hash_seed));
        self.global = config;
        Ok(())
    }

    fn set_backend(&mut self, id: u32, entry: BackendEntry) -> Result<(), DataplaneError> {
        self.log.push(format!("set_backend {id}"));
        self.backends.insert(id, entry);
        Ok(())
    }

    fn write_table(&mut self, base: u32, slots: &[u32]) -> Result<(), DataplaneError> {
        self.log.push(format!("write_table {base} {}", slots.len()));
        for (i, &s) in slots.iter().enumerate() {
            self.maglev.insert(base + i as u32, s);
        }
        Ok(())
    }

    fn set_vip(&mut self, key: VipKey, entry: VipEntry) -> Result<(), DataplaneError> {
        self.log.push(format!("set_vip {}", entry.id));
        self.vips.insert(key, entry);
        Ok(())
    }

    fn remove_vip(&mut self, key: VipKey) -> Result<(), DataplaneError> {
        let id = self.vips.remove(&key).map(|e| e.id);
        self.log.push(format!("remove_vip {id:?}"));
        Ok(())
    }

    fn set_vip_filter(&mut self, words: &VipFilter) -> Result<(), DataplaneError> {
        self.log.push("set_vip_filter".into());
        self.vip_filter = *words;
        self.vip_filters.push(*words);
        Ok(())
    }

    fn zero_traffic(
        &mut self,
        vip: Option<u32>,
        backend: Option<u32>,
    ) -> Result<(), DataplaneError> {
        self.log.push(format!("zero_traffic {vip:?} {backend:?}"));
        Ok(())
    }

    fn counters(&self) -> Result<Counters, DataplaneError> {
        Ok(Counters::empty())
    }

    fn snapshot(&self) -> Result<Snapshot, DataplaneError> {
        Ok(Snapshot {
            global: self.global,
            vips: self.vips.iter().map(|(k, e)| (*k, *e)).collect(),
            backends: self
                .backends
                .iter()
                .filter(|(_, e)| e.generation != 0)
                .map(|(i, e)| (*i, *e))
                .collect(),
        })
    }
}
