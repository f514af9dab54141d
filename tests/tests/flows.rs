//! Packet tier: the flow table and table swaps, through the verifier-loaded
//! program with BPF_PROG_TEST_RUN and maps written by the real reconciler.
//! Needs root.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use lb_common::Stat;
use lb_tests::{
    addresses::{
        CLIENT, CLIENT6, TCP_PORT, UDP_PORT, VIP, VIP6, backend_address, backend_address6,
    },
    config_yaml::{ConfigYaml, VipYaml, dns, web},
    fixture::{Case, check},
    packet::{
        Harness, TEST_RUN_IFINDEX, apply_settled, expected_backend, neighbours, run_packet,
        tcp_ack, tcp_syn, udp,
    },
    root::root_or_skip,
    xdp::XdpAction,
};
use lb_userspace::{config::Config, model::Health, status};

/// The i-th backend.
fn backend(i: usize) -> IpAddr {
    backend_address(i).into()
}

/// `web` (TCP) and `dns` (UDP) over the given `(backend, state)` pairs, UDP
/// flows idle after a second.
fn config(backends: &[(usize, &str)], table_size: u32) -> String {
    let vip = |v: VipYaml| {
        backends
            .iter()
            .fold(v, |v, &(i, state)| v.backend(backend(i), 1, Some(state)))
    };
    ConfigYaml::new([vip(web(VIP)), vip(dns(VIP))])
        .table_size(table_size)
        .max_vips(4)
        .udp_idle_timeout("1s")
        .to_string()
}

fn harness(test: &str, backends: &[(usize, &str)]) -> Option<Harness> {
    let all = (0..4).map(backend);
    Harness::for_test(
        test,
        &config(backends, 65537),
        &neighbours(all, TEST_RUN_IFINDEX),
    )
}

const THREE: [(usize, &str); 3] = [(0, "active"), (1, "active"), (2, "active")];

/// Opens `n` TCP flows (SYN) from ports `base..`; returns each port's backend.
fn open_flows(h: &mut Harness, base: u16, n: u16) -> BTreeMap<u16, IpAddr> {
    (base..base + n)
        .map(|sport| {
            let out = h.run(&tcp_syn(CLIENT, sport, VIP, TCP_PORT)).unwrap();
            assert_eq!(out.action, XdpAction::Tx);
            (sport, h.backend_of(&out).expect("a backend MAC"))
        })
        .collect()
}

/// Sends one mid-connection packet per flow; returns each port's backend.
fn continue_flows(h: &mut Harness, flows: &BTreeMap<u16, IpAddr>) -> BTreeMap<u16, IpAddr> {
    flows
        .keys()
        .map(|&sport| {
            let out = h.run(&tcp_ack(CLIENT, sport, VIP, TCP_PORT)).unwrap();
            assert_eq!(out.action, XdpAction::Tx);
            (sport, h.backend_of(&out).expect("a backend MAC"))
        })
        .collect()
}

fn stat(h: &Harness, s: Stat) -> u64 {
    h.counters().unwrap().stat(s)
}

#[test]
fn a_syn_is_placed_and_the_rest_of_its_flow_hits() {
    let Some(mut h) = harness("syn_then_hits", &THREE) else {
        return;
    };
    let flows = open_flows(&mut h, 30000, 50);
    for _ in 0..3 {
        assert_eq!(continue_flows(&mut h, &flows), flows);
    }
    assert_eq!(
        (stat(&h, Stat::FlowMissSyn), stat(&h, Stat::FlowHit)),
        (50, 150)
    );
    let traffic = status::traffic(h.reconciler.applied(), &h.counters().unwrap());
    let web = traffic.iter().find(|v| v.name == "web").unwrap();
    let new_flows: u64 = web.backends.iter().map(|(_, t)| t.new_flows).sum();
    let packets: u64 = web.backends.iter().map(|(_, t)| t.packets).sum();
    assert_eq!(
        (new_flows, packets, web.total.packets),
        (50, 200, 200),
        "only placements count as new flows"
    );
}

#[test]
fn a_mid_stream_packet_without_an_entry_is_placed_and_counted_apart() {
    let Some(mut h) = harness("non_syn_miss", &THREE) else {
        return;
    };
    let web = h.config.vips[0].clone();
    let placed = h.expected_backend(&web, CLIENT, 31000);
    let ack = || tcp_ack(CLIENT, 31000, VIP, TCP_PORT);
    check(
        &mut h,
        &[
            Case::to_backend("first ACK", ack(), placed, &[Stat::FlowMissNonSyn]),
            Case::to_backend("second ACK", ack(), placed, &[Stat::FlowHit]),
        ],
    );
    let c = h.counters().unwrap();
    assert_eq!(
        (
            c.stat(Stat::FlowMissNonSyn),
            c.stat(Stat::FlowHit),
            c.stat(Stat::FlowMissSyn)
        ),
        (1, 1, 0)
    );
}

#[test]
fn established_flows_keep_their_backend_when_a_backend_is_added() {
    let Some(mut h) = harness("keep_on_add", &THREE) else {
        return;
    };
    let flows = open_flows(&mut h, 32000, 300);
    h.reconfigure(&config(
        &[(0, "active"), (1, "active"), (2, "active"), (3, "active")],
        65537,
    ))
    .unwrap();
    let web = h.config.vips[0].clone();
    let would_move = flows
        .iter()
        .filter(|&(&p, &b)| expected_backend(&h.config, &web, CLIENT, p) != b)
        .count();
    assert!(
        would_move > 30,
        "the new table moves some flows ({would_move}), so keeping them is the flow table's work"
    );
    assert_eq!(
        continue_flows(&mut h, &flows),
        flows,
        "established flows stay"
    );
    // New flows follow the new table, which uses the new backend.
    let new = open_flows(&mut h, 40000, 300);
    for (&p, &b) in &new {
        assert_eq!(b, expected_backend(&h.config, &web, CLIENT, p));
    }
    assert!(new.values().any(|&b| b == backend(3)));
    assert_eq!(stat(&h, Stat::FlowReplaced), 0);
}

#[test]
fn flows_of_a_down_backend_are_re_placed_and_the_others_stay() {
    let Some(mut h) = harness("re_place_on_down", &THREE) else {
        return;
    };
    let flows = open_flows(&mut h, 33000, 300);
    let key = h.config.vips[0].key;
    h.apply(&Health::from([((key, backend(1)), false)]))
        .unwrap();
    let after = continue_flows(&mut h, &flows);
    let mut moved = 0;
    for (p, b) in &flows {
        if *b == backend(1) {
            assert_ne!(after[p], backend(1), "flow {p} left the down backend");
            moved += 1;
        } else {
            assert_eq!(after[p], *b, "flow {p} stays");
        }
    }
    assert!(moved > 0);
    assert_eq!(stat(&h, Stat::FlowReplaced), moved);
    // Once re-placed, the flow sticks to its new backend.
    assert_eq!(continue_flows(&mut h, &flows), after);
}

#[test]
fn drain_keeps_established_flows_and_takes_no_new_ones() {
    let Some(mut h) = harness("drain", &THREE) else {
        return;
    };
    let flows = open_flows(&mut h, 34000, 300);
    assert!(flows.values().any(|&b| b == backend(2)));
    h.reconfigure(&config(
        &[(0, "active"), (1, "active"), (2, "drain")],
        65537,
    ))
    .unwrap();
    assert_eq!(
        continue_flows(&mut h, &flows),
        flows,
        "draining backend keeps its flows"
    );
    let new = open_flows(&mut h, 45000, 300);
    assert!(
        new.values().all(|&b| b != backend(2)),
        "no new flow goes to a draining backend"
    );
}

#[test]
fn disabling_a_backend_re_places_its_flows() {
    let Some(mut h) = harness("disabled", &THREE) else {
        return;
    };
    let flows = open_flows(&mut h, 35000, 300);
    h.reconfigure(&config(
        &[(0, "active"), (1, "active"), (2, "disabled")],
        65537,
    ))
    .unwrap();
    let after = continue_flows(&mut h, &flows);
    for (p, b) in &flows {
        assert_eq!(after[p] == *b, *b != backend(2), "flow {p}");
    }
}

#[test]
fn flows_of_a_removed_backend_do_not_follow_its_reused_id() {
    let Some(mut h) = harness("id_reuse", &THREE) else {
        return;
    };
    let flows = open_flows(&mut h, 36000, 300);
    let web = h.config.vips[0].key;
    let old_id = h.reconciler.applied().backend_id(&web, backend(2)).unwrap();
    // .13 leaves; .14 arrives and takes the lowest free id, which was .13's.
    h.reconfigure(&config(&[(0, "active"), (1, "active")], 65537))
        .unwrap();
    // Freed ids stay unused for a second (packets may still hold them).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    h.reconfigure(&config(
        &[(0, "active"), (1, "active"), (3, "active")],
        65537,
    ))
    .unwrap();
    assert_eq!(
        h.reconciler.applied().backend_id(&web, backend(3)),
        Some(old_id),
        "the id was reused"
    );
    let web = h.config.vips[0].clone();
    let after = continue_flows(&mut h, &flows);
    for (p, b) in &flows {
        if *b == backend(2) {
            assert_eq!(
                after[p],
                expected_backend(&h.config, &web, CLIENT, *p),
                "flow {p} re-placed by the table"
            );
        } else {
            assert_eq!(after[p], *b);
        }
    }
}

#[test]
fn udp_flows_expire_after_the_idle_timeout() {
    let Some(mut h) = harness("udp_idle", &THREE) else {
        return;
    };
    for sport in 2000..2010 {
        h.run(&udp(CLIENT, sport, VIP, UDP_PORT, b"q")).unwrap();
        h.run(&udp(CLIENT, sport, VIP, UDP_PORT, b"q")).unwrap();
    }
    assert_eq!(
        (stat(&h, Stat::FlowMissSyn), stat(&h, Stat::FlowHit)),
        (10, 10)
    );
    // The configured timeout is 1s.
    std::thread::sleep(std::time::Duration::from_millis(1300));
    for sport in 2000..2010 {
        h.run(&udp(CLIENT, sport, VIP, UDP_PORT, b"q")).unwrap();
    }
    assert_eq!(
        (stat(&h, Stat::FlowMissSyn), stat(&h, Stat::FlowHit)),
        (20, 10),
        "idle flows are placed afresh"
    );
}

/// The IPv6 flow table keeps the same promises as the IPv4 one: flows of a
/// down backend are re-placed and the others stay; idle UDP flows expire.
#[test]
fn ipv6_flows_are_re_placed_off_a_down_backend_and_udp_flows_expire() {
    if !root_or_skip("ipv6_flows") {
        return;
    }
    let b6 = |i: usize| IpAddr::from(backend_address6(i));
    let (client, vip) = (CLIENT6, VIP6);
    let text = ConfigYaml::new([web(vip), dns(vip)].map(|v| v.backends((0..3).map(b6))))
        .udp_idle_timeout("1s")
        .to_string();
    let mut h = Harness::new(&text, &neighbours((0..3).map(b6), TEST_RUN_IFINDEX)).unwrap();
    let send = |h: &mut Harness, p: Vec<u8>| {
        let out = h.run(&p).unwrap();
        assert_eq!(out.action, XdpAction::Tx);
        h.backend_of(&out).expect("a backend MAC")
    };
    let flows: BTreeMap<u16, IpAddr> = (33000..33300)
        .map(|sport| (sport, send(&mut h, tcp_syn(client, sport, vip, TCP_PORT))))
        .collect();
    let key = h.config.vips[0].key;
    h.apply(&Health::from([((key, b6(1)), false)])).unwrap();
    let mut moved = 0;
    for (&sport, &before) in &flows {
        let after = send(&mut h, tcp_ack(client, sport, vip, TCP_PORT));
        if before == b6(1) {
            assert_ne!(after, before, "flow {sport} left the down backend");
            moved += 1;
        } else {
            assert_eq!(after, before, "flow {sport} stays");
        }
    }
    assert!(moved > 0);
    assert_eq!(stat(&h, Stat::FlowReplaced), moved);

    for sport in 2000..2010 {
        send(&mut h, udp(client, sport, vip, UDP_PORT, b"q"));
        send(&mut h, udp(client, sport, vip, UDP_PORT, b"q"));
    }
    let hits = stat(&h, Stat::FlowHit);
    std::thread::sleep(std::time::Duration::from_millis(1300));
    for sport in 2000..2010 {
        send(&mut h, udp(client, sport, vip, UDP_PORT, b"q"));
    }
    assert_eq!(
        (stat(&h, Stat::FlowMissSyn), stat(&h, Stat::FlowHit)),
        (300 + 20, hits),
        "idle IPv6 UDP flows are placed afresh"
    );
}

/// While another thread swaps the VIP's table 10,000 times, cycling through
/// three backend sets (so each table half holds different sets over time),
/// every packet of a new flow goes to the backend that a table active while
/// the packet ran gives it: no packet sees a mixture.
#[test]
fn table_swaps_are_atomic_under_traffic() {
    if !root_or_skip("table_swaps_are_atomic_under_traffic") {
        return;
    }
    // A small table keeps 10,000 whole-table writes quick.
    const M: u32 = 251;
    const SWAPS: usize = 10_000;
    let all = neighbours([0, 1, 2].map(backend), TEST_RUN_IFINDEX);
    let h = Harness::new(&config(&THREE, M), &all).unwrap();
    let Harness {
        mut ebpf,
        mut reconciler,
        config: three,
        neighbours,
    } = h;
    let key = three.vips[0].key;
    // State i % 3 is active once `applied` reaches i: all three backends,
    // then .13 down, then .12 down.
    let health = [
        Health::new(),
        Health::from([((key, backend(2)), false)]),
        Health::from([((key, backend(1)), false)]),
    ];
    let tables: Vec<Config> = [
        &THREE[..],
        &[(0, "active"), (1, "active")],
        &[(0, "active"), (2, "active")],
    ]
    .iter()
    .map(|b| Config::parse(&config(b, M), std::path::Path::new("state.yaml")).unwrap())
    .collect();

    let applied = Arc::new(AtomicUsize::new(0));
    let swapper = {
        let (applied, config) = (applied.clone(), three.clone());
        std::thread::spawn(move || {
            for i in 1..=SWAPS {
                apply_settled(&mut reconciler, &config, &health[i % 3], &neighbours).unwrap();
                applied.store(i, Ordering::SeqCst);
            }
        })
    };

    let mut checked = 0u32;
    let mut n = 0u64;
    while applied.load(Ordering::SeqCst) < SWAPS {
        // Every packet a new flow: a fresh (source, port) pair.
        n += 1;
        let (client, sport) = (
            Ipv4Addr::from(0x0a80_0000 + (n / 60000) as u32),
            1024 + (n % 60000) as u16,
        );
        let before = applied.load(Ordering::SeqCst);
        let out = run_packet(&mut ebpf, &tcp_syn(client, sport, VIP, TCP_PORT)).unwrap();
        let after = applied.load(Ordering::SeqCst);
        assert_eq!(out.action, XdpAction::Tx, "packet {checked}");
        if after != before {
            // A swap completed while the packet ran: any state could apply.
            continue;
        }
        // Active while the packet ran: state `before`, or the one being
        // applied (its VIP entry may already point at the new half).
        let valid: Vec<IpAddr> = (before..=before + 1)
            .map(|s| expected_backend(&tables[s % 3], &tables[s % 3].vips[0], client, sport))
            .collect();
        let got = valid
            .iter()
            .find(|b| lb_tests::packet::backend_mac(**b) == out.packet[..6]);
        assert!(
            got.is_some(),
            "packet {checked} of {client}:{sport} went to none of {valid:?}"
        );
        checked += 1;
    }
    swapper.join().unwrap();
    assert!(
        checked > 1000,
        "only {checked} packets overlapped the swaps"
    );
    println!("{checked} packets checked during {SWAPS} swaps");
}

/// A restarted `lb` adopts the flow table it pinned whatever the configured
/// capacity (1025 flows per family: no round number of buckets; the kernel's
/// per-CPU LRU maps, which this table replaced, rounded such capacities).
#[test]
fn pinned_flow_tables_the_kernel_resized_are_adopted() {
    if !root_or_skip("pinned_flow_tables_the_kernel_resized_are_adopted") {
        return;
    }
    struct Pins(std::path::PathBuf);
    impl Drop for Pins {
        fn drop(&mut self) {
            let _ = lb_userspace::loader::remove_pins(&self.0);
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let pins = Pins(
        std::path::PathBuf::from("/sys/fs/bpf").join(format!("lbt-{}-lru", std::process::id())),
    );
    let sizes = lb_userspace::loader::Sizes {
        table_size: 251,
        max_vips: 1,
        max_flows: 1025,
        max_flows_v6: 1025,
        idle_evict: std::time::Duration::from_secs(60),
    };
    drop(lb_userspace::loader::load(sizes, Some(&pins.0)).expect("first load pins"));
    lb_userspace::loader::load(sizes, Some(&pins.0)).expect("adopts its own pinned tables");
}
