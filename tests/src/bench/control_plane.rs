//! Control-plane timings: building a Maglev table, and the reconcile step
//! a health transition triggers, from rebuild to table swap.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::bail;
use lb_userspace::{
    config::Config,
    dataplane::aya::AyaDataplane,
    loader,
    maglev::{self, Weighted},
    model::{Health, Neighbours},
    reconcile::Reconciler,
};
use serde::Serialize;

use super::{Settings, Stats};
use crate::addresses::VIP;

#[derive(Debug, Clone, Serialize)]
pub struct MaglevBuild {
    pub backends: usize,
    pub table_size: u32,
    pub ms: Stats,
}

pub fn maglev_builds(s: &Settings) -> Vec<MaglevBuild> {
    let mut out = Vec::new();
    for table_size in [65537u32, 655373] {
        for n in [10usize, 100, 1000] {
            let backends: Vec<Weighted> = (0..n)
                .map(|i| Weighted {
                    address: Ipv4Addr::from(0x0a00_0000 + i as u32 * 7919).into(),
                    weight: 1,
                })
                .collect();
            let runs = (0..s.maglev_runs)
                .map(|_| {
                    let start = Instant::now();
                    let t = maglev::build(&backends, table_size, 0x5eed);
                    let ms = start.elapsed().as_secs_f64() * 1e3;
                    std::hint::black_box(t);
                    ms
                })
                .collect();
            out.push(MaglevBuild {
                backends: n,
                table_size,
                ms: Stats::of(runs),
            });
        }
    }
    out
}

/// The reconcile step a health transition triggers, on real maps.
pub fn transition_to_swap(s: &Settings) -> anyhow::Result<Stats> {
    let backends: String = (0..100u32)
        .map(|i| {
            format!(
                "      - {{ address: {}, weight: 1 }}\n",
                Ipv4Addr::from(0x0a01_0000 + i)
            )
        })
        .collect();
    let text = format!(
        "interface: lo\nmaglev: {{ table_size: 65537 }}\nmax_vips: 1\nvips:\n  - name: web\n    address: {VIP}\n    port: 80\n    \
         protocol: tcp\n    forwarding: l2\n    backends:\n{backends}"
    );
    let config = Config::parse(&text, std::path::Path::new("bench.yaml"))?;
    let mut ebpf = loader::load(config.sizes(), None)?;
    let mut r = Reconciler::new(
        AyaDataplane::new(&mut ebpf)?,
        config.table_size,
        config.max_vips,
    );
    let neighbours = Neighbours::new();
    r.apply(&config, &Health::new(), &neighbours)?;
    let key = config.vips[0].key;
    let down = Health::from([((key, Ipv4Addr::from(0x0a01_0000u32 + 7).into()), false)]);
    let mut ms = Vec::new();
    for i in 0..(4 * s.maglev_runs + 1) {
        let health = if i % 2 == 0 { &down } else { &Health::new() };
        // Back-to-back swaps would otherwise time the grace period that keeps
        // a just-retired table half untouched, not the swap.
        std::thread::sleep(Duration::from_millis(5));
        let start = Instant::now();
        let swaps = r.apply(&config, health, &neighbours)?;
        ms.push(start.elapsed().as_secs_f64() * 1e3);
        if swaps.len() != 1 {
            bail!("expected one table swap, got {swaps:?}");
        }
    }
    Ok(Stats::of(ms))
}
