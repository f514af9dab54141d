//! What a packet costs, per case, by methods A and B (see the module docs
//! of `bench`). Every round measures every case, the ceiling included, so
//! each ratio compares figures of the same round.

use std::time::Duration;

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use serde::Serialize;

use super::{
    Settings, Stats,
    cases::{self, Case, Instance},
    cpu::{bench_cpu, pin_to_cpu},
    instance::{LbInstance, TRIVIAL_PASS, TRIVIAL_TX, baseline, xdp},
};
use crate::xdp::XdpAction;

#[derive(Debug, Clone, Serialize)]
pub struct PacketCase {
    pub case: String,
    /// ns per packet, method A.
    pub a_ns: Stats,
    /// Ratio to the trivial XDP_TX program in the same round, method A.
    pub a_ratio: Stats,
    pub b_ns: Option<Stats>,
    pub b_ratio: Option<Stats>,
    /// Method A target for the median ratio, if the issue set one.
    pub target: Option<f64>,
}

/// Every program a case may run.
struct Programs {
    ceiling: Ebpf,
    pass: Ebpf,
    lb: LbInstance,
    full: LbInstance,
    established: LbInstance,
}

impl Programs {
    fn load(s: &Settings) -> anyhow::Result<Programs> {
        Ok(Programs {
            ceiling: baseline(TRIVIAL_TX)?,
            pass: baseline(TRIVIAL_PASS)?,
            lb: LbInstance::new(s.flows_capacity)?,
            full: LbInstance::new(s.many_flows_capacity)?,
            established: LbInstance::new(s.many_flows_capacity)?,
        })
    }

    fn get(&mut self, instance: Instance) -> anyhow::Result<&mut Xdp> {
        match instance {
            Instance::Ceiling => xdp(&mut self.ceiling, TRIVIAL_TX),
            Instance::Pass => xdp(&mut self.pass, TRIVIAL_PASS),
            Instance::Lb => self.lb.prog(),
            Instance::LbFullTable => self.full.prog(),
            Instance::LbEstablishedTable => self.established.prog(),
        }
    }
}

/// A case and its figures, one per round.
struct Measured {
    case: Case,
    a: Vec<f64>,
    b: Vec<f64>,
}

pub fn per_packet(s: &Settings) -> anyhow::Result<Vec<PacketCase>> {
    let before = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
    let cases = per_packet_pinned(s);
    // The rest of the benchmark (Maglev builds, swaps) runs unpinned again.
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &before)?;
    cases
}

fn per_packet_pinned(s: &Settings) -> anyhow::Result<Vec<PacketCase>> {
    pin_to_cpu(bench_cpu())?;
    let mut programs = Programs::load(s)?;
    let cases = cases::all();
    for case in &cases {
        prepare(programs.get(case.instance)?, case)?;
    }
    programs.full.fill_flows(s.many_flows, false)?;
    programs.established.fill_flows(s.many_flows, true)?;
    pin_to_cpu(bench_cpu())?;

    let mut measured: Vec<Measured> = cases
        .into_iter()
        .map(|case| Measured {
            case,
            a: Vec::new(),
            b: Vec::new(),
        })
        .collect();
    for _round in 0..s.rounds {
        for m in &mut measured {
            let prog = programs.get(m.case.instance)?;
            let packets = &mut m.case.packets;
            m.a.push(method_a(prog, s.calls, |i| packets.nth(i))?);
            if m.case.repeatable {
                m.b.push(method_b(prog, s.repeat, &packets.nth(0))?);
            }
            packets.advance(s.calls);
        }
    }

    let ceiling = measured
        .iter()
        .find(|m| m.case.instance == Instance::Ceiling)
        .context("no ceiling case")?;
    let ratio =
        |v: &[f64], ceiling: &[f64]| Stats::of(v.iter().zip(ceiling).map(|(x, c)| x / c).collect());
    Ok(measured
        .iter()
        .map(|m| PacketCase {
            case: m.case.name.to_string(),
            a_ns: Stats::of(m.a.clone()),
            a_ratio: ratio(&m.a, &ceiling.a),
            b_ns: (!m.b.is_empty()).then(|| Stats::of(m.b.clone())),
            b_ratio: (!m.b.is_empty()).then(|| ratio(&m.b, &ceiling.b)),
            target: m.case.target,
        })
        .collect())
}

/// Opens the case's flow, and checks that a tunnel case encapsulates.
fn prepare(prog: &mut Xdp, case: &Case) -> anyhow::Result<()> {
    if let Some(syn) = &case.opens_with {
        prog.test_run(TestRunOptions {
            data_in: Some(syn),
            ..TestRunOptions::default()
        })?;
    }
    if let Some(outer) = case.encapsulates {
        let packet = case.packets.nth(0);
        let r = prog.test_run(TestRunOptions {
            data_in: Some(&packet),
            data_out: Some(&mut vec![0u8; packet.len() + 64]),
            ..TestRunOptions::default()
        })?;
        if XdpAction::from_raw(r.return_value) != Some(XdpAction::Tx)
            || r.data_size_out as usize != packet.len() + outer
        {
            bail!(
                "{} is not encapsulated ({outer}-byte outer header): {r:?}",
                case.name
            );
        }
    }
    Ok(())
}

/// Method A: mean of the kernel's per-call duration over `calls` calls, the
/// i-th call running `packet(i)`.
fn method_a(
    prog: &mut Xdp,
    calls: u32,
    mut packet: impl FnMut(u32) -> Vec<u8>,
) -> anyhow::Result<f64> {
    let mut total = Duration::ZERO;
    for i in 0..calls {
        let data = packet(i);
        let r = prog.test_run(TestRunOptions {
            data_in: Some(&data),
            ..TestRunOptions::default()
        })?;
        total += r.duration;
    }
    Ok(total.as_nanos() as f64 / calls as f64)
}

/// Method B: one call repeating `packet` `repeat` times; the kernel's mean.
fn method_b(prog: &mut Xdp, repeat: u32, packet: &[u8]) -> anyhow::Result<f64> {
    let r = prog.test_run(TestRunOptions {
        data_in: Some(packet),
        repeat,
        ..TestRunOptions::default()
    })?;
    Ok(r.duration.as_nanos() as f64)
}
