//! Packet tier: the flow table's own promises (lb_common::flow_table):
//! flood resistance, adoption of a full table across a restart, and no
//! packet following another flow's entry while CPUs write the same buckets.
//! Needs root.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use lb_common::Stat;
use lb_tests::{
    addresses::{TCP_PORT, VIP, backend_address},
    config_yaml::{ConfigYaml, web},
    packet::{
        Harness, TEST_RUN_IFINDEX, apply_settled, backend_mac, expected_backend, neighbours,
        run_packet, tcp_ack, tcp_syn,
    },
    root::root_or_skip,
    xdp::XdpAction,
};
use lb_userspace::{config::Config, dataplane::Counters, model::Health};

/// IPv4 flows the table is sized for (and as many IPv6 ones).
const CAPACITY: u32 = 4096;

fn backend(i: usize) -> IpAddr {
    backend_address(i).into()
}

fn config(backends: usize, table_size: u32) -> String {
    ConfigYaml::new([web(VIP).backends((0..backends).map(backend_address))])
        .table_size(table_size)
        .max_flows(CAPACITY)
        .to_string()
}

/// The `n`-th client address: one flow per address, port 40000.
fn client(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a40_0000 + n)
}

fn moved(before: &Counters, after: &Counters, s: Stat) -> u64 {
    after.stat(s) - before.stat(s)
}

/// Pins removed when the test ends, however it ends.
struct Pins(PathBuf);

impl Pins {
    fn new(name: &str) -> Pins {
        Pins(PathBuf::from("/sys/fs/bpf").join(format!("lbt-{}-{name}", std::process::id())))
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = lb_userspace::loader::remove_pins(&self.0);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Opens `n` flows with two packets each (SYN, ACK); returns each flow's
/// backend.
fn establish(h: &mut Harness, n: u32) -> Vec<IpAddr> {
    (0..n)
        .map(|i| {
            h.run(&tcp_syn(client(i), 40000, VIP, TCP_PORT)).unwrap();
            let out = h.run(&tcp_ack(client(i), 40000, VIP, TCP_PORT)).unwrap();
            assert_eq!(out.action, XdpAction::Tx);
            h.backend_of(&out).expect("a backend MAC")
        })
        .collect()
}

/// One more ACK per flow; returns each flow's backend.
fn continue_flows(h: &mut Harness, n: u32) -> Vec<IpAddr> {
    (0..n)
        .map(|i| {
            let out = h.run(&tcp_ack(client(i), 40000, VIP, TCP_PORT)).unwrap();
            h.backend_of(&out).expect("a backend MAC")
        })
        .collect()
}

/// A table full of established flows, then ten times its capacity in
/// single-packet flows (spoofed SYNs): the flood takes free and
/// single-packet entries only, and is forwarded untracked when there are
/// none; every established flow that has an entry keeps it.
#[test]
fn a_syn_flood_does_not_evict_established_flows() {
    let Some(mut h) = Harness::for_test(
        "syn_flood",
        &config(3, 65537),
        &neighbours((0..3).map(backend), TEST_RUN_IFINDEX),
    ) else {
        return;
    };
    let start = h.counters().unwrap();
    let backends = establish(&mut h, CAPACITY);
    let filled = h.counters().unwrap();
    // A flow the table had no room for is untracked on both its packets.
    let untracked_flows = moved(&start, &filled, Stat::Untracked) / 2;
    assert_eq!(
        filled.flow_entries[0] + untracked_flows,
        CAPACITY as u64,
        "every flow has an entry or was counted untracked"
    );

    let flood = 10 * CAPACITY;
    for n in 0..flood {
        let src = Ipv4Addr::from(0x0b00_0000 + n);
        let out = h
            .run(&tcp_syn(src, 1024 + (n % 60000) as u16, VIP, TCP_PORT))
            .unwrap();
        assert_eq!(
            out.action,
            XdpAction::Tx,
            "flood packets are still forwarded"
        );
    }
    let flooded = h.counters().unwrap();
    let untracked = moved(&filled, &flooded, Stat::Untracked);
    let took = moved(&filled, &flooded, Stat::EvictSinglePacket)
        + (flooded.flow_entries[0] - filled.flow_entries[0]);
    assert_eq!(
        untracked + took,
        flood as u64,
        "each flood packet took a free or single-packet entry, or was counted untracked"
    );
    assert_eq!(moved(&filled, &flooded, Stat::EvictIdle), 0);
    assert!(untracked > 0, "the flood met full buckets");

    let after = continue_flows(&mut h, CAPACITY);
    let done = h.counters().unwrap();
    let hits = moved(&flooded, &done, Stat::FlowHit);
    assert!(
        hits * 100 >= 99 * CAPACITY as u64,
        "{hits} of {CAPACITY} established flows still hit"
    );
    assert_eq!(
        hits + untracked_flows,
        CAPACITY as u64,
        "the flows that miss are exactly those the table never had room for"
    );
    assert_eq!(
        after, backends,
        "the established flows stay on their backends"
    );
}

/// A restarted control plane adopts the pinned table and its key: every flow
/// of a full table still hits, on its backend.
#[test]
fn a_restart_adopts_a_full_table() {
    if !root_or_skip("a_restart_adopts_a_full_table") {
        return;
    }
    let pins = Pins::new("adopt");
    let text = config(3, 65537);
    let all = neighbours((0..3).map(backend), TEST_RUN_IFINDEX);
    let (backends, entries) = {
        let mut h = Harness::pinned(&text, &all, &pins.0).unwrap();
        let backends = establish(&mut h, CAPACITY);
        (backends, h.counters().unwrap().flow_entries)
    };
    let mut h = Harness::pinned(&text, &all, &pins.0).unwrap();
    let adopted = h.counters().unwrap();
    assert_eq!(adopted.flow_entries, entries, "the entries survive");
    assert_eq!(continue_flows(&mut h, CAPACITY), backends);
    let after = h.counters().unwrap();
    assert_eq!(
        moved(&adopted, &after, Stat::FlowHit),
        entries[0],
        "every flow with an entry hits"
    );
    assert_eq!(moved(&adopted, &after, Stat::FlowReplaced), 0);
}

/// Two CPUs run packets of many flows that share buckets (three times the
/// table's entries, so entries are taken and rewritten all the time) while
/// a third thread swaps the VIP's table. Every packet goes to a backend its
/// own flow was sent to before (its entry) or that a table active during
/// its run gives it; a packet that followed another flow's entry, or a
/// torn one, would show up as a backend neither says (eight backends).
#[test]
fn concurrent_writers_never_make_a_packet_follow_a_foreign_entry() {
    if !root_or_skip("concurrent_writers") {
        return;
    }
    const BACKENDS: usize = 8;
    const M: u32 = 251;
    const SWAPS: usize = 3_000;
    let pins = Pins::new("race");
    let text = config(BACKENDS, M);
    let all = neighbours((0..BACKENDS).map(backend), TEST_RUN_IFINDEX);
    let h = Harness::pinned(&text, &all, &pins.0).unwrap();
    // A second program instance over the same pinned maps, for the second CPU.
    let second = Harness::pinned(&text, &all, &pins.0).unwrap();
    let Harness {
        ebpf,
        mut reconciler,
        config: base,
        neighbours,
    } = h;
    let key = base.vips[0].key;
    // State i % 3: all up, backend 1 down, backend 2 down.
    let health = [
        Health::new(),
        Health::from([((key, backend(1)), false)]),
        Health::from([((key, backend(2)), false)]),
    ];
    let tables: Vec<Config> = [None, Some(1), Some(2)]
        .iter()
        .map(|down: &Option<usize>| {
            let up: Vec<_> = (0..BACKENDS).filter(|&b| Some(b) != *down).collect();
            let text = ConfigYaml::new([web(VIP).backends(up.iter().map(|&b| backend_address(b)))])
                .table_size(M)
                .max_flows(CAPACITY)
                .to_string();
            Config::parse(&text, std::path::Path::new("state.yaml")).unwrap()
        })
        .collect();
    let tables = Arc::new(tables);
    let applied = Arc::new(AtomicUsize::new(0));
    let swapper = {
        let applied = applied.clone();
        std::thread::spawn(move || {
            for i in 1..=SWAPS {
                apply_settled(&mut reconciler, &base, &health[i % 3], &neighbours).unwrap();
                applied.store(i, Ordering::SeqCst);
            }
        })
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runners: Vec<_> = [ebpf, second.ebpf]
        .into_iter()
        .enumerate()
        .map(|(t, mut ebpf)| {
            let (applied, tables) = (applied.clone(), tables.clone());
            std::thread::spawn(move || {
                let mut cpu = nix::sched::CpuSet::new();
                cpu.set(t % cpus).unwrap();
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu).unwrap();
                // Each thread's own flows: 3 x the table's entries together.
                let flows = 3 * 4 * CAPACITY;
                let mut seen: BTreeMap<u32, BTreeSet<[u8; 6]>> = BTreeMap::new();
                let mut checked = 0u64;
                let mut n = 0u32;
                while applied.load(Ordering::SeqCst) < SWAPS {
                    let f = (n % flows) * 2 + t as u32;
                    n += 1;
                    let src = client(f);
                    let packet = if n <= flows {
                        tcp_syn(src, 40000, VIP, TCP_PORT)
                    } else {
                        tcp_ack(src, 40000, VIP, TCP_PORT)
                    };
                    let before = applied.load(Ordering::SeqCst);
                    let out = run_packet(&mut ebpf, &packet).unwrap();
                    let after = applied.load(Ordering::SeqCst);
                    assert_eq!(out.action, XdpAction::Tx);
                    let mac: [u8; 6] = out.packet[..6].try_into().unwrap();
                    let own = seen.entry(f).or_default();
                    if after == before {
                        let by_table = (before..=before + 1).map(|s| {
                            let c = &tables[s % 3];
                            backend_mac(expected_backend(c, &c.vips[0], src, 40000))
                        });
                        let valid: BTreeSet<[u8; 6]> = by_table.chain(own.iter().copied()).collect();
                        assert!(
                            valid.contains(&mac),
                            "flow {f} went to {mac:02x?}, none of its entry's or the tables' {valid:02x?}"
                        );
                        checked += 1;
                    }
                    own.insert(mac);
                }
                checked
            })
        })
        .collect();
    swapper.join().unwrap();
    for r in runners {
        let checked = r.join().unwrap();
        assert!(checked > 10_000, "only {checked} packets checked");
    }
}
