//! Runs frames through `lb decap`'s program with BPF_PROG_TEST_RUN, its
//! local addresses set by the test.

use std::net::IpAddr;

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap, PerCpuArray},
    programs::Xdp,
};
use lb_common::{
    addr_key,
    decap::{DECAP_PROGRAM, DecapStat, DecapStats, map_names},
};
use lb_userspace::loader::DECAP_OBJECT;

use crate::packet::{Outcome, test_run};

pub struct Decap {
    ebpf: Ebpf,
}

impl Decap {
    /// Loads the program with `local` as this host's addresses.
    pub fn new(local: impl IntoIterator<Item = IpAddr>) -> anyhow::Result<Decap> {
        let mut ebpf = Ebpf::load(DECAP_OBJECT)?;
        let prog: &mut Xdp = ebpf
            .program_mut(DECAP_PROGRAM)
            .context("decap program")?
            .try_into()?;
        prog.load()?;
        let mut addrs: HashMap<_, [u8; 16], u8> = HashMap::try_from(
            ebpf.map_mut(map_names::DECAP_ADDRS)
                .context("address map")?,
        )?;
        for a in local {
            addrs.insert(addr_key(a), 1, 0)?;
        }
        Ok(Decap { ebpf })
    }

    /// Runs one frame once.
    pub fn run(&mut self, frame: &[u8]) -> anyhow::Result<Outcome> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(DECAP_PROGRAM)
            .context("decap program")?
            .try_into()?;
        test_run(prog, frame)
    }

    /// Every counter, summed over CPUs, in `DecapStat::ALL` order.
    pub fn counters(&self) -> anyhow::Result<[u64; 3]> {
        let stats: PerCpuArray<_, DecapStats> =
            PerCpuArray::try_from(self.ebpf.map(map_names::DECAP_STATS).context("stats map")?)?;
        let per_cpu = stats.get(&0, 0)?;
        Ok(DecapStat::ALL.map(|s| per_cpu.iter().map(|b| b[s as usize]).sum()))
    }
}
