//! `lb decap`: the backend side of `ipip` forwarding. Attaches the decap program
//! (lb-ebpf/src/bin/decap.rs) to an interface, keeps its set of local
//! addresses current, and pins program state like `lb run` does: it keeps
//! working after `lb decap` exits, a new `lb decap` adopts it, and
//! `lb decap --stop` (or `--detach-on-exit`) removes it.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use aya::{
    EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{Xdp, XdpMode},
};
use futures::TryStreamExt as _;
use lb_common::{
    addr_key,
    decap::{DECAP_PROGRAM, DecapStat, DecapStats, map_names},
};
use netlink_packet_route::address::AddressAttribute;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    loader::{self, DECAP_OBJECT},
    map_layout,
};

/// How often the host's addresses are re-read.
const ADDRESS_REFRESH: Duration = Duration::from_secs(2);

pub struct Options {
    pub interface: String,
    pub mode: XdpMode,
    pub pin_path: PathBuf,
    pub detach_on_exit: bool,
}

/// Where `lb decap` pins its state unless told otherwise.
pub fn default_pin_path(interface: &str) -> PathBuf {
    Path::new("/sys/fs/bpf/lb-decap").join(interface)
}

/// Detaches and removes what `lb decap` pinned under `pin_path`.
pub fn stop(pin_path: &Path) -> anyhow::Result<bool> {
    let _lock = loader::lock(pin_path)?;
    Ok(loader::remove_pins_of(pin_path, &map_names::ALL)?)
}

pub async fn run(o: Options, ifindex: u32) -> anyhow::Result<()> {
    let _lock = loader::lock(&o.pin_path)?;
    let maps = o.pin_path.join("maps");
    std::fs::create_dir_all(&maps).with_context(|| format!("creating {}", maps.display()))?;
    // Pinned maps are reused as they are (the kernel does not check them
    // against the program), so one left by another build must fit.
    map_layout::check_pins(DECAP_OBJECT, &o.pin_path, &map_names::ALL, &[])?;
    let mut loader = EbpfLoader::new();
    for map in map_names::ALL {
        loader.map_pin_path(map, loader::map_pin(&o.pin_path, map));
    }
    let mut ebpf = loader
        .load(DECAP_OBJECT)
        .context("loading the decap object")?;
    let prog: &mut Xdp = ebpf
        .program_mut(DECAP_PROGRAM)
        .context("decap program missing")?
        .try_into()?;
    prog.load()?;

    let mut addrs: HashMap<MapData, [u8; 16], u8> = HashMap::try_from(
        ebpf.take_map(map_names::DECAP_ADDRS)
            .context("DECAP_ADDRS missing")?,
    )?;
    let stats: PerCpuArray<MapData, DecapStats> = PerCpuArray::try_from(
        ebpf.take_map(map_names::DECAP_STATS)
            .context("DECAP_STATS missing")?,
    )?;
    let (connection, handle, _) = rtnetlink::new_connection().context("opening netlink")?;
    tokio::spawn(connection);
    // Addresses first, so the program opens tunnels from its first packet.
    let mut known = sync_addresses(&handle, &mut addrs, &BTreeSet::new()).await?;

    let prog: &mut Xdp = ebpf
        .program_mut(DECAP_PROGRAM)
        .context("decap program missing")?
        .try_into()?;
    let attached = loader::attach_program(prog, ifindex, o.mode, &o.pin_path)?;
    info!(interface = %o.interface, addresses = ?known, adopted = (attached == loader::Attached::Replaced), "decap attached");

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut refresh = tokio::time::interval(ADDRESS_REFRESH);
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = refresh.tick() => match sync_addresses(&handle, &mut addrs, &known).await {
                Ok(now) => known = now,
                Err(e) => warn!(error = %e, "reading local addresses failed"),
            },
        }
    }

    if let Ok(per_cpu) = stats.get(&0, 0) {
        let totals: Vec<(&str, u64)> = DecapStat::ALL
            .iter()
            .map(|s| (s.name(), per_cpu.iter().map(|b| b[*s as usize]).sum()))
            .collect();
        info!(counters = ?totals, "decap counters");
    }
    if o.detach_on_exit {
        loader::remove_pins_of(&o.pin_path, &map_names::ALL)?;
        info!(interface = %o.interface, "decap detached and its pinned state removed");
    } else {
        info!(pin_path = %o.pin_path.display(), "exiting; decap keeps running (`lb decap --stop` removes it)");
    }
    Ok(())
}

/// Makes `DECAP_ADDRS` hold exactly this host's addresses (both families);
/// returns them.
async fn sync_addresses(
    handle: &rtnetlink::Handle,
    map: &mut HashMap<MapData, [u8; 16], u8>,
    previous: &BTreeSet<IpAddr>,
) -> anyhow::Result<BTreeSet<IpAddr>> {
    let mut now = BTreeSet::new();
    let mut dump = handle.address().get().execute();
    while let Some(msg) = dump.try_next().await? {
        for attr in msg.attributes {
            if let AddressAttribute::Local(a) | AddressAttribute::Address(a) = attr {
                now.insert(a);
            }
        }
    }
    for a in now.difference(previous) {
        map.insert(addr_key(*a), 1, 0)?;
    }
    for a in previous.difference(&now) {
        // Already gone is fine.
        let _ = map.remove(&addr_key(*a));
    }
    Ok(now)
}
