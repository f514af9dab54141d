//! The programs the per-packet cases run: lb instances whose maps the real
//! reconciler filled, and the trivial baseline programs.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use lb_userspace::{
    config::Config,
    dataplane::aya::AyaDataplane,
    loader::{self, BASELINE_OBJECT},
    model::Health,
    reconcile::Reconciler,
};

use super::cpu::{online_cpus, pin_to_cpu};
use crate::{
    addresses::{
        CLIENT6, LB, VIP, VIP6, backend_address, backend_address6, routed_backend_address,
        routed_backend_address6,
    },
    packet::{neighbours, routed_neighbours, tcp_ack, tcp_syn},
};

/// The port of the `ipip` VIPs (both families).
pub(super) const IPIP_PORT: u16 = 8080;
/// Backends per VIP.
const BACKENDS: usize = 3;
/// The trivial MAC-swap XDP_TX program, the ceiling of every ratio.
pub(super) const TRIVIAL_TX: &str = "xdp_tx_swap";
/// The trivial XDP_PASS program.
pub(super) const TRIVIAL_PASS: &str = "xdp_pass";

/// TCP `web` and UDP `dns` (l2), TCP `tunnel` (ipip) on the IPv4 VIP; TCP
/// `web6` (l2) and `tunnel6` (ipip) on the IPv6 VIP; three backends each.
fn lb_config(max_flows: u32) -> String {
    let vip = |name: &str,
               address: IpAddr,
               port: u16,
               proto: &str,
               forwarding: &str,
               backend: fn(usize) -> IpAddr| {
        let backends: String = (0..BACKENDS)
            .map(|i| format!("      - {{ address: \"{}\", weight: 1 }}\n", backend(i)))
            .collect();
        format!(
            "  - name: {name}\n    address: \"{address}\"\n    port: {port}\n    protocol: {proto}\n    forwarding: {forwarding}\n    backends:\n{backends}"
        )
    };
    format!(
        "interface: lo\nmaglev: {{ table_size: 65537, seed: 0x5eed }}\nmax_vips: 8\n\
         flow_table: {{ max_flows: {max_flows} }}\nvips:\n{}{}{}{}{}",
        vip("web", VIP.into(), 80, "tcp", "l2", |i| backend_address(i)
            .into()),
        vip("dns", VIP.into(), 53, "udp", "l2", |i| backend_address(i)
            .into()),
        vip("tunnel", VIP.into(), IPIP_PORT, "tcp", "ipip", |i| {
            routed_backend_address(i).into()
        }),
        vip("web6", VIP6.into(), 80, "tcp", "l2", |i| backend_address6(
            i
        )
        .into()),
        vip("tunnel6", VIP6.into(), IPIP_PORT, "tcp", "ipip", |i| {
            routed_backend_address6(i).into()
        }),
    )
}

/// An lb instance whose maps are filled by the real reconciler; backends are
/// "reached" through loopback, the ingress of BPF_PROG_TEST_RUN, so forwarded
/// packets are XDP_TX.
pub(super) struct LbInstance {
    ebpf: Ebpf,
    _reconciler: Reconciler<AyaDataplane>,
}

impl LbInstance {
    pub(super) fn new(max_flows: u32) -> anyhow::Result<LbInstance> {
        let config = Config::parse(&lb_config(max_flows), std::path::Path::new("bench.yaml"))?;
        let mut ebpf = loader::load(config.sizes(), None)?;
        let mut reconciler = Reconciler::new(
            AyaDataplane::new(&mut ebpf)?,
            config.table_size,
            config.max_vips,
        );
        let mut neighbours = neighbours(
            (0..BACKENDS)
                .map(|i| IpAddr::from(backend_address(i)))
                .chain((0..BACKENDS).map(|i| backend_address6(i).into())),
            1,
        );
        // IPIP backends: next hop's MAC, the route's source, MTU 1500.
        neighbours.extend(routed_neighbours(
            (0..BACKENDS).map(routed_backend_address),
            LB,
            1500,
        ));
        neighbours.extend(routed_neighbours(
            (0..BACKENDS).map(routed_backend_address6),
            CLIENT6,
            1500,
        ));
        reconciler.apply(&config, &Health::new(), &neighbours)?;
        Ok(LbInstance {
            ebpf,
            _reconciler: reconciler,
        })
    }

    pub(super) fn prog(&mut self) -> anyhow::Result<&mut Xdp> {
        Ok(loader::program(&mut self.ebpf)?)
    }

    /// Inserts `n` distinct flows (TCP SYNs from 11.x.y.z, each followed by
    /// an ACK when `established`), an equal share from each CPU.
    pub(super) fn fill_flows(&mut self, n: u32, established: bool) -> anyhow::Result<()> {
        let cpus = online_cpus() as u64;
        let prog = self.prog()?;
        for cpu in 0..cpus {
            pin_to_cpu(cpu as usize)?;
            for n in (cpu..n as u64).step_by(cpus as usize) {
                let (src, sport) = (
                    Ipv4Addr::from(0x0b00_0000u32 + (n / 64512) as u32),
                    1024 + (n % 64512) as u16,
                );
                let syn = tcp_syn(src, sport, VIP, 80);
                let ack = established.then(|| tcp_ack(src, sport, VIP, 80));
                for p in std::iter::once(&syn).chain(ack.as_ref()) {
                    prog.test_run(TestRunOptions {
                        data_in: Some(p),
                        ..TestRunOptions::default()
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// The baseline object with its program `name` ([`TRIVIAL_TX`] or
/// [`TRIVIAL_PASS`]) loaded.
pub(super) fn baseline(name: &str) -> anyhow::Result<Ebpf> {
    let mut ebpf = Ebpf::load(BASELINE_OBJECT)?;
    xdp(&mut ebpf, name)?.load()?;
    Ok(ebpf)
}

/// The XDP program `name` of `ebpf`.
pub(super) fn xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?)
}
