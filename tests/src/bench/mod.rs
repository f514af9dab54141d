//! `cargo xtask bench`: what a packet costs, measured the way the kernel lets
//! us measure it exactly (BPF_PROG_TEST_RUN), always next to trivial programs
//! run in the same round, so the ratios survive a noisy shared machine.
//!
//! Method A: one call per packet (repeat = 1), the kernel's per-call duration
//! averaged over many calls; valid for every path, including new flows that
//! need a new packet each time. Method B: one call with a large repeat count,
//! for paths that leave the packet reusable.
//!
//! `cases` says what each per-packet case sends and to which program;
//! `per_packet`, `throughput`, `control_plane` and `memory` measure;
//! `report` renders the table.

mod cases;
mod control_plane;
mod cpu;
mod instance;
mod memory;
mod per_packet;
mod report;
mod throughput;

use serde::Serialize;

pub use self::{
    control_plane::MaglevBuild, memory::MapMemory, per_packet::PacketCase, report::render,
    throughput::Throughput,
};

/// How much work each part does.
#[derive(Debug, Clone)]
pub struct Settings {
    pub rounds: usize,
    /// Method A: calls per case per round.
    pub calls: u32,
    /// Method B: repeat count per case per round.
    pub repeat: u32,
    /// Flows in the "full table" instance, and its capacity.
    pub many_flows: u32,
    pub many_flows_capacity: u32,
    /// Flow-table capacity of the regular instance (new-flow inserts of all
    /// rounds must fit, so that "new flow" never meets a full table).
    pub flows_capacity: u32,
    pub throughput_frames: u32,
    pub maglev_runs: usize,
    /// Measure the largest supported config's maps (allocates gigabytes).
    pub largest_memory: bool,
}

impl Settings {
    pub fn full() -> Self {
        Self {
            // Many short rounds, interleaved: a disturbance of the shared
            // machine spoils a few rounds of every case alike, and the
            // median and quartiles of per-round ratios shrug it off.
            rounds: 30,
            calls: 20_000,
            repeat: 200_000,
            many_flows: 1_000_000,
            many_flows_capacity: 1 << 20,
            flows_capacity: 1 << 21,
            throughput_frames: 5_000_000,
            maglev_runs: 5,
            largest_memory: true,
        }
    }

    /// A few iterations of everything: proves the bench still runs.
    pub fn smoke() -> Self {
        Self {
            rounds: 2,
            calls: 500,
            repeat: 1000,
            many_flows: 4000,
            many_flows_capacity: 4096,
            flows_capacity: 1 << 14,
            throughput_frames: 20_000,
            maglev_runs: 1,
            largest_memory: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// First and third quartile: the interquartile range is `q3 - q1`.
    pub q1: f64,
    pub q3: f64,
}

impl Stats {
    fn of(mut v: Vec<f64>) -> Stats {
        v.sort_by(f64::total_cmp);
        let at = |q: usize| v[(v.len() - 1) * q / 4];
        Stats {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
            q1: at(1),
            q3: at(3),
        }
    }

    /// How far the figures spread, relative to their median: (max - min) /
    /// median.
    pub fn spread(&self) -> f64 {
        (self.max - self.min) / self.median
    }
}

/// Above this spread of the trivial program's own per-round time, the
/// machine was too busy for the ratios to be trusted: the report says so.
pub const CEILING_SPREAD_WARNING: f64 = 0.2;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: String,
    pub per_packet: Vec<PacketCase>,
    pub throughput: Throughput,
    pub maglev_build: Vec<MaglevBuild>,
    /// Reconciler::apply after one backend's health flips: rebuild the VIP's
    /// table (M = 65537, 100 backends), write it, swap it (ms).
    pub health_transition_to_swap_ms: Stats,
    pub memory: Vec<MapMemory>,
}

pub fn run(s: &Settings) -> anyhow::Result<Report> {
    Ok(Report {
        per_packet: per_packet::per_packet(s)?,
        throughput: throughput::throughput(s)?,
        maglev_build: control_plane::maglev_builds(s),
        health_transition_to_swap_ms: control_plane::transition_to_swap(s)?,
        memory: memory::memory(s)?,
        machine: machine(),
    })
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = cpu::online_cpus();
    format!("{cpu}, {cpus} CPUs, Linux {}", kernel.trim())
}
