//! End-to-end tier for the flow table under a spoofed SYN flood: real kernel
//! TCP in network namespaces, L2 direct server return. Needs root.
//!
//! The flood's single-packet flows may evict only each other: long-lived
//! connections (whose entries saw a second packet) must keep their backend
//! even while Maglev re-places new flows because a backend joins mid-flood.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::Mutex,
    time::{Duration, Instant},
};

use lb_common::{
    Stat,
    flow_table::{WAYS, flow_table_buckets},
};
use lb_tests::{
    addresses::{TCP_PORT, VIP, backend_address},
    netns::Netns,
    root::root_or_skip,
    topology::{L2Topology, LbProcess},
    traffic::{LongLived, tcp_connections},
};

static SERIAL: Mutex<()> = Mutex::new(());

const WEB: SocketAddr = SocketAddr::new(IpAddr::V4(VIP), TCP_PORT);

/// Flows of each family the table is sized for (the configurable minimum).
const MAX_FLOWS: u32 = 1024;

/// The flood's source addresses (RFC 2544's benchmarking range): nothing in
/// the topology owns them, and every backend blackholes the replies.
const SPOOFED: &str = "198.18.0.0/15";

/// How long the flood lasts, and the long-lived connections' idle pause.
const FLOOD: Duration = Duration::from_secs(5);
const IDLE: Duration = Duration::from_secs(3);

/// A config with one TCP VIP over the first `backends` backends, with the
/// smallest flow table.
fn config(backends: usize) -> String {
    let list: String = (0..backends)
        .map(|i| {
            format!(
                "      - {{ address: \"{}\", weight: 1 }}\n",
                backend_address(i)
            )
        })
        .collect();
    format!(
        "interface: eth0\nmaglev: {{ table_size: 65537, seed: 0x5eed }}\n\
         flow_table: {{ max_flows: {MAX_FLOWS}, max_flows_v6: {MAX_FLOWS} }}\nvips:\n\
         \x20 - name: web\n    address: \"{VIP}\"\n    port: {TCP_PORT}\n    protocol: tcp\n    forwarding: l2\n\
         \x20   backends:\n{list}"
    )
}

/// Entries in the flow table (both families share it).
fn table_slots() -> u64 {
    flow_table_buckets(2 * MAX_FLOWS as u64) as u64 * WAYS as u64
}

/// Reads the counters the flood moves.
fn counters(lb: &LbProcess) -> [u64; 3] {
    [Stat::FlowMissSyn, Stat::EvictSinglePacket, Stat::Untracked]
        .map(|s| lb.stat(s).unwrap_or_else(|e| panic!("reading {s:?}: {e}")))
}

/// A xorshift generator: the flood needs many distinct sources, not good
/// randomness, and each sender thread owns one.
struct Sources(u64);

impl Sources {
    /// A source address in [`SPOOFED`] and a port above 1023.
    fn next(&mut self) -> (Ipv4Addr, u16) {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let r = self.0;
        let host = (r & 0x1_ffff) as u32;
        let port = 1024 + ((r >> 17) % (65536 - 1024)) as u16;
        (Ipv4Addr::from(0xc612_0000 | host), port)
    }
}

/// Sends `count` SYNs to the VIP from spoofed sources at an even pace over
/// [`FLOOD`], from a thread pinned to `cpu` in `client`'s namespace (so the
/// XDP program runs on that CPU too). Returns the SYNs the kernel accepted.
fn flood_from(
    client: &Netns,
    cpu: usize,
    count: u64,
    seed: u64,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<anyhow::Result<u64>>>> {
    client.spawn(move || -> anyhow::Result<u64> {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu)?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
        // IPPROTO_RAW implies IP_HDRINCL: the kernel sends the spoofed
        // header as built (it fills in the IP checksum and id only).
        // SAFETY: plain socket call; the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        anyhow::ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(VIP).to_be(),
            },
            sin_zero: [0; 8],
        };
        let mut sources = Sources(seed);
        let mut packet = Vec::with_capacity(64);
        let start = Instant::now();
        let mut sent = 0u64;
        for i in 0..count {
            let (source, port) = sources.next();
            packet.clear();
            // The TCP checksum is computed here: a raw socket's packets get
            // no offload, and the backend drops a SYN whose checksum is wrong.
            etherparse::PacketBuilder::ipv4(source.octets(), VIP.octets(), 64)
                .tcp(port, TCP_PORT, i as u32, 64240)
                .syn()
                .write(&mut packet, &[])?;
            // SAFETY: packet and `to` outlive the call; lengths are theirs.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const to).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if n == packet.len() as isize {
                sent += 1;
            }
            // Keep to the schedule: the i-th SYN leaves at i/count of FLOOD.
            let due = FLOOD.mul_f64(i as f64 / count as f64);
            if let Some(ahead) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        Ok(sent)
    })
}

#[test]
fn a_syn_flood_with_a_backend_added_mid_flood_breaks_no_idle_long_lived_connection() {
    if !root_or_skip(
        "a_syn_flood_with_a_backend_added_mid_flood_breaks_no_idle_long_lived_connection",
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let topo = L2Topology::new(&["b1", "b2", "b3", "b4"]).unwrap();
    for b in &topo.backends {
        b.ns.ip(&["route", "add", "blackhole", SPOOFED]).unwrap();
    }
    let lb = topo.start_lb(&config(3)).unwrap();

    // 50 connections that idle 3 s between exchanges; a slow answer under
    // the flood is no break, a reset or a wrong echo is.
    let conns = LongLived::open_paced(&topo.client, WEB, 50, Duration::from_secs(5), IDLE).unwrap();
    std::thread::sleep(Duration::from_secs(1));

    let before = counters(&lb);
    // 12x the table's entries in all, split across every online CPU.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let syns = 12 * table_slots();
    let floods: Vec<_> = (0..cpus)
        .map(|cpu| {
            flood_from(
                &topo.client,
                cpu,
                syns / cpus as u64,
                0x9e37_79b9 + cpu as u64,
            )
            .unwrap()
        })
        .collect();
    std::thread::sleep(FLOOD / 2);
    lb.reload(&config(4))
        .unwrap()
        .unwrap_or_else(|e| panic!("reload rejected: {e}\n{}", lb.log()));
    let sent: u64 = floods
        .into_iter()
        .map(|f| f.join().expect("flood thread panicked").unwrap().unwrap())
        .sum();
    let after = counters(&lb);
    // Every connection exchanges at least once more after the flood.
    std::thread::sleep(IDLE + Duration::from_secs(1));
    let results = conns.finish();

    let [miss_syn, evicted, untracked] = [0, 1, 2].map(|i| after[i] - before[i]);
    let broken: Vec<_> = results.iter().filter(|c| c.broken.is_some()).collect();
    eprintln!(
        "flood: {sent} SYNs sent over {cpus} CPU(s) into {} entries; flow_miss_syn +{miss_syn}, \
         evict_single_packet +{evicted}, untracked +{untracked}; {} of {} long-lived broken",
        table_slots(),
        broken.len(),
        results.len()
    );
    assert!(
        sent >= 10 * table_slots(),
        "only {sent} SYNs left the client"
    );
    assert!(
        miss_syn >= sent * 95 / 100,
        "the load balancer saw {miss_syn} of {sent} SYNs as new flows"
    );
    // Each SYN beyond the table's entries found it full: it evicted another
    // single-packet flow or went untracked. So the flood really filled it.
    assert!(
        evicted + untracked >= miss_syn - table_slots(),
        "{miss_syn} new flows into {} entries, yet only {evicted} evictions and {untracked} untracked",
        table_slots()
    );
    assert_eq!(results.len(), 50);
    assert!(
        broken.is_empty(),
        "{} long-lived connections broke: {broken:?}\n{}",
        broken.len(),
        lb.log()
    );

    // New connections still work after the flood, and reach the new backend.
    let tally = topo.client.enter(move || tcp_connections(WEB, 40)).unwrap();
    assert_eq!(
        tally.failures, 0,
        "new connections after the flood: {tally:?}"
    );
    assert!(
        tally.by_backend.contains_key("b4"),
        "the backend added mid-flood took none of 40 new connections: {tally:?}"
    );
}
