//! End-to-end tier for live changes: backend failure and recovery, changes to
//! the backend set under established connections, draining, all-down
//! policies, rejected reloads and `kill -9` restarts. Real kernel TCP in
//! network namespaces, L2 direct server return. Needs root.
//!
//! The tests run one at a time (they measure what clients see around timed
//! events, so they should not compete for the two CPUs).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use lb_common::Stat;
use lb_tests::{
    addresses::{HEALTH_PORT, TCP_PORT, VIP, VIP6, backend_address, backend_address6},
    root::root_or_skip,
    topology::{L2Topology, LbProcess, swaps_of},
    traffic::{Attempt, Conn, LongLived, NewConnections, tcp_connections},
};

static SERIAL: Mutex<()> = Mutex::new(());

const WEB: SocketAddr = SocketAddr::new(IpAddr::V4(VIP), TCP_PORT);
const WEB6: SocketAddr = SocketAddr::new(IpAddr::V6(VIP6), TCP_PORT);

/// Backend `i`'s address in `vip`'s family.
fn backend(vip: IpAddr, i: usize) -> IpAddr {
    match vip {
        IpAddr::V4(_) => backend_address(i).into(),
        IpAddr::V6(_) => backend_address6(i).into(),
    }
}

/// A config with one TCP VIP on `vip` over backends `(index, weight,
/// state)`, addressed in the VIP's family.
fn config(
    vip: IpAddr,
    backends: &[(usize, u32, &str)],
    health_check: &str,
    on_all_down: &str,
) -> String {
    // Addresses are quoted: an IPv6 address is full of colons.
    let list: String = backends
        .iter()
        .map(|&(i, w, state)| {
            format!(
                "      - {{ address: \"{}\", weight: {w}, state: {state} }}\n",
                backend(vip, i)
            )
        })
        .collect();
    format!(
        "interface: eth0\nmaglev: {{ table_size: 65537, seed: 0x5eed }}\nvips:\n\
         \x20 - name: web\n    address: \"{vip}\"\n    port: {TCP_PORT}\n    protocol: tcp\n    forwarding: l2\n\
         \x20   health_check: {health_check}\n    on_all_down: {on_all_down}\n    backends:\n{list}"
    )
}

/// Probes the dedicated health port, quickly.
fn health_port_check() -> String {
    format!("{{ port: {HEALTH_PORT}, interval: 300ms, timeout: 200ms, rise: 2, fall: 2 }}")
}

fn broken(conns: &[Conn]) -> Vec<&Conn> {
    conns.iter().filter(|c| c.broken.is_some()).collect()
}

fn failed(attempts: &[Attempt]) -> usize {
    attempts.iter().filter(|a| a.backend.is_none()).count()
}

/// Writes `config`, sends SIGHUP and waits until lb applied it.
fn reload(lb: &LbProcess, config: &str) {
    lb.reload(config)
        .unwrap()
        .unwrap_or_else(|e| panic!("reload rejected: {e}\n{}", lb.log()));
}

#[test]
fn a_failed_backend_stops_costing_connections_and_rejoins_when_back() {
    if !root_or_skip("a_failed_backend_stops_costing_connections_and_rejoins_when_back") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut topo = L2Topology::new(&["b1", "b2", "b3"]).unwrap();
    // Probes the service port itself, so stopping the server fails the probes.
    let (interval, rise, fall) = (Duration::from_millis(500), 2u32, 2u32);
    let check = "{ interval: 500ms, timeout: 300ms, rise: 2, fall: 2 }";
    let lb = topo
        .start_lb(&config(
            VIP.into(),
            &[(0, 1, "active"), (1, 1, "active"), (2, 1, "active")],
            check,
            "fail_open",
        ))
        .unwrap();

    let stream = NewConnections::start(&topo.client, WEB, Duration::from_millis(10)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let stopped = Instant::now();
    topo.set_service(1, false).unwrap();
    let settled = stopped + interval * fall + Duration::from_secs(1);
    std::thread::sleep(settled - Instant::now() + Duration::from_secs(2));
    let restarted = Instant::now();
    topo.set_service(1, true).unwrap();
    let rejoined = restarted + interval * rise + Duration::from_secs(1);
    std::thread::sleep(rejoined - Instant::now() + Duration::from_secs(2));
    let attempts = stream.finish().unwrap();

    let rate = attempts.len() as f64
        / attempts
            .last()
            .unwrap()
            .at
            .duration_since(attempts[0].at)
            .as_secs_f64();
    let before_detection = attempts
        .iter()
        .filter(|a| a.at >= stopped && a.at < settled && a.backend.is_none())
        .count();
    let after_detection: Vec<_> = attempts
        .iter()
        .filter(|a| a.at >= settled && a.backend.is_none())
        .collect();
    let b2_back = attempts
        .iter()
        .filter(|a| a.at >= rejoined && a.backend.as_deref() == Some("b2"))
        .count();
    println!(
        "{} attempts at {rate:.0}/s; failed before detection: {before_detection}; after: {}; b2 after rejoining: {b2_back}",
        attempts.len(),
        after_detection.len()
    );
    assert!(
        rate >= 50.0,
        "at least 50 new connections per second ({rate:.0})"
    );
    assert_eq!(
        failed(&attempts[..]) - before_detection,
        after_detection.len(),
        "no failure before the stop"
    );
    assert!(
        after_detection.is_empty(),
        "no new connection fails after fall*interval+1s: {after_detection:?}"
    );
    assert!(
        b2_back > 0,
        "b2 receives new connections after rise*interval+1s"
    );
    let swaps = swaps_of(&lb.log(), None, None);
    assert_eq!(swaps.len(), 2, "one swap down, one up:\n{}", lb.log());
    println!("detection-to-swap latencies (us): {swaps:?}");
}

/// Twenty down/up cycles of one backend; every transition is followed by a
/// table swap, and the detection-to-swap latency of each is reported.
#[test]
fn every_health_transition_swaps_the_table() {
    if !root_or_skip("every_health_transition_swaps_the_table") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut topo = L2Topology::new(&["b1", "b2"]).unwrap();
    // Generous timeout: on a busy 2-CPU machine a slow probe of b1 would add
    // swaps; only b2's are counted anyway.
    let check =
        format!("{{ port: {HEALTH_PORT}, interval: 200ms, timeout: 150ms, rise: 1, fall: 1 }}");
    let lb = topo
        .start_lb(&config(
            VIP.into(),
            &[(0, 1, "active"), (1, 1, "active")],
            &check,
            "fail_open",
        ))
        .unwrap();
    for cycle in 0..20 {
        for (on, n) in [(false, 2 * cycle + 1), (true, 2 * cycle + 2)] {
            topo.set_health(1, on).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while swaps_of(&lb.log(), Some(backend_address(1).into()), None).len() < n {
                assert!(
                    Instant::now() < deadline,
                    "cycle {cycle}: no swap after health {on}:\n{}",
                    lb.log()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    let mut down = swaps_of(&lb.log(), Some(backend_address(1).into()), Some(false));
    assert_eq!(down.len(), 20);
    down.sort();
    println!(
        "detection-to-swap over 20 failures: median {} us, max {} us",
        down[10], down[19]
    );
}

#[test]
fn established_connections_survive_backend_set_changes() {
    if !root_or_skip("established_connections_survive_backend_set_changes") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let topo = L2Topology::new(&["b1", "b2", "b3", "b4", "b5"]).unwrap();
    let check = health_port_check();
    // b4 is configured but disabled: it never gets a connection (idle).
    let start = [
        (0, 1, "active"),
        (1, 1, "active"),
        (2, 1, "active"),
        (3, 1, "disabled"),
    ];
    let lb = topo
        .start_lb(&config(VIP.into(), &start, &check, "fail_open"))
        .unwrap();
    let conns = LongLived::open(&topo.client, WEB, 200).unwrap();

    // Add b5.
    let added = [
        (0, 1, "active"),
        (1, 1, "active"),
        (2, 1, "active"),
        (3, 1, "disabled"),
        (4, 1, "active"),
    ];
    reload(&lb, &config(VIP.into(), &added, &check, "fail_open"));
    let probe = topo.client.enter(|| tcp_connections(WEB, 100)).unwrap();
    assert!(
        probe.by_backend.contains_key("b5"),
        "new connections reach the added backend: {probe:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    // Remove the idle b4.
    let removed = [
        (0, 1, "active"),
        (1, 1, "active"),
        (2, 1, "active"),
        (4, 1, "active"),
    ];
    reload(&lb, &config(VIP.into(), &removed, &check, "fail_open"));
    std::thread::sleep(Duration::from_secs(1));
    // Change a weight.
    let reweighted = [
        (0, 3, "active"),
        (1, 1, "active"),
        (2, 1, "active"),
        (4, 1, "active"),
    ];
    reload(&lb, &config(VIP.into(), &reweighted, &check, "fail_open"));
    std::thread::sleep(Duration::from_secs(1));

    let report = conns.finish();
    assert_eq!(report.len(), 200);
    println!("200 long-lived connections over {:?}", per_backend(&report));
    assert!(
        broken(&report).is_empty(),
        "broken established connections: {:?}",
        broken(&report)
    );
    assert!(!report.iter().any(|c| c.backend == "b4"));
}

fn per_backend(conns: &[Conn]) -> std::collections::BTreeMap<&str, usize> {
    let mut m = std::collections::BTreeMap::new();
    for c in conns {
        *m.entry(c.backend.as_str()).or_default() += 1;
    }
    m
}

#[test]
fn a_draining_backend_keeps_its_connections_and_gets_no_new_ones() {
    if !root_or_skip("a_draining_backend_keeps_its_connections_and_gets_no_new_ones") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let topo = L2Topology::new(&["b1", "b2", "b3"]).unwrap();
    let check = health_port_check();
    let lb = topo
        .start_lb(&config(
            VIP.into(),
            &[(0, 1, "active"), (1, 1, "active"), (2, 1, "active")],
            &check,
            "fail_open",
        ))
        .unwrap();
    let conns = LongLived::open(&topo.client, WEB, 100).unwrap();

    reload(
        &lb,
        &config(
            VIP.into(),
            &[(0, 1, "active"), (1, 1, "drain"), (2, 1, "active")],
            &check,
            "fail_open",
        ),
    );
    let accepted_at_drain = topo.served()[1].1;
    let stream = NewConnections::start(&topo.client, WEB, Duration::from_millis(10)).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let attempts = stream.finish().unwrap();
    let report = conns.finish();

    let on_b2 = report.iter().filter(|c| c.backend == "b2").count();
    println!(
        "long-lived per backend {:?}; {} new connections after the drain",
        per_backend(&report),
        attempts.len()
    );
    assert!(
        on_b2 > 0,
        "the draining backend had established connections"
    );
    assert!(broken(&report).is_empty(), "broken: {:?}", broken(&report));
    assert_eq!(failed(&attempts), 0);
    assert!(
        !attempts.iter().any(|a| a.backend.as_deref() == Some("b2")),
        "no new connection reaches b2"
    );
    assert_eq!(
        topo.served()[1].1,
        accepted_at_drain,
        "b2's server accepted nothing new"
    );
}

#[test]
fn all_backends_down_fails_open_or_drops_as_configured() {
    if !root_or_skip("all_backends_down_fails_open_or_drops_as_configured") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut topo = L2Topology::new(&["b1", "b2", "b3"]).unwrap();
    let check = health_port_check();
    let all = [(0, 1, "active"), (1, 1, "active"), (2, 1, "active")];
    let lb = topo
        .start_lb(&config(VIP.into(), &all, &check, "fail_open"))
        .unwrap();
    for i in 0..3 {
        topo.set_health(i, false).unwrap();
    }
    // fall * interval + 1s, with room for the last backend's probe phase.
    std::thread::sleep(Duration::from_millis(2 * 300 + 1000 + 300));
    assert!(lb.log().contains("all_down=true"), "{}", lb.log());

    let open = topo.client.enter(|| tcp_connections(WEB, 100)).unwrap();
    println!("fail_open: {open:?}");
    assert_eq!(open.failures, 0, "fail_open keeps every active backend");
    assert_eq!(open.by_backend.len(), 3);

    reload(&lb, &config(VIP.into(), &all, &check, "drop"));
    let drops_before = lb.stat(Stat::DropNoBackend).unwrap();
    // Each attempt waits out its connect timeout, so a few prove the point.
    let dropped = topo.client.enter(|| tcp_connections(WEB, 5)).unwrap();
    let drops = lb.stat(Stat::DropNoBackend).unwrap() - drops_before;
    println!("drop: {dropped:?}, drop_no_backend counted {drops}");
    assert_eq!(dropped.failures, 5, "with drop, new connections fail");
    assert!(
        drops >= 5,
        "each failed SYN (and its retransmits) is a counted drop: {drops}"
    );
}

#[test]
fn an_invalid_reload_changes_nothing() {
    if !root_or_skip("an_invalid_reload_changes_nothing") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let topo = L2Topology::new(&["b1", "b2", "b3"]).unwrap();
    let check = health_port_check();
    let good = config(
        VIP.into(),
        &[(0, 1, "active"), (1, 1, "active"), (2, 1, "active")],
        &check,
        "fail_open",
    );
    let mut lb = topo.start_lb(&good).unwrap();
    let stream = NewConnections::start(&topo.client, WEB, Duration::from_millis(10)).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    for bad in [
        good.replace("table_size: 65537", "table_size: 65536"), // invalid
        good.replace("table_size: 65537", "table_size: 257"),   // valid, but fixed while running
        good.replace("weight: 1, state: active }\n", "weight: 0 }\n"),
    ] {
        let applied = lb.status().unwrap().config.applied_sha256;
        let error = lb.reload(&bad).unwrap().expect_err("rejected");
        println!("rejected: {error}");
        assert_eq!(
            lb.status().unwrap().config.applied_sha256,
            applied,
            "the running config stays"
        );
        std::thread::sleep(Duration::from_millis(500));
        assert!(lb.is_running(), "lb keeps running");
    }
    let attempts = stream.finish().unwrap();
    println!(
        "{} new connections during bad reloads, {} failed",
        attempts.len(),
        failed(&attempts)
    );
    assert_eq!(failed(&attempts), 0, "traffic unaffected");
    assert!(!lb.log().contains("config reloaded"));
    let by: std::collections::BTreeSet<_> =
        attempts.iter().filter_map(|a| a.backend.clone()).collect();
    assert_eq!(
        by.len(),
        3,
        "the running table still spreads over all three: {by:?}"
    );
}

/// `times` times: half a second of traffic, `kill -9`, `down` without lb,
/// restart (waiting until it has attached again).
fn kill_9_and_restart(lb: &mut LbProcess, times: usize, down: Duration) {
    for _ in 0..times {
        std::thread::sleep(Duration::from_millis(500));
        lb.kill9().unwrap();
        std::thread::sleep(down);
        lb.restart().unwrap();
    }
}

#[test]
fn kill_9_and_restart_drop_nothing() {
    if !root_or_skip("kill_9_and_restart_drop_nothing") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let topo = L2Topology::new(&["b1", "b2", "b3"]).unwrap();
    let check = health_port_check();
    let mut lb = topo
        .start_lb(&config(
            VIP.into(),
            &[(0, 1, "active"), (1, 1, "active"), (2, 1, "active")],
            &check,
            "fail_open",
        ))
        .unwrap();
    let conns = LongLived::open(&topo.client, WEB, 200).unwrap();
    let stream = NewConnections::start(&topo.client, WEB, Duration::from_millis(10)).unwrap();

    kill_9_and_restart(&mut lb, 5, Duration::from_secs(2));
    std::thread::sleep(Duration::from_secs(1));
    let attempts = stream.finish().unwrap();
    let report = conns.finish();
    println!(
        "5 kill -9 restarts: {} long-lived connections ({} broken), {} new connections ({} failed)",
        report.len(),
        broken(&report).len(),
        attempts.len(),
        failed(&attempts)
    );
    assert_eq!(
        lb.log()
            .matches("adopting the pinned program state")
            .count(),
        5
    );
    assert!(broken(&report).is_empty(), "broken: {:?}", broken(&report));
    assert_eq!(failed(&attempts), 0);
}

/// The IPv6 counterpart of the restart and failover tests: an IPv6 VIP over
/// IPv6 backends (`l2`). Three `kill -9` restarts under long-lived
/// connections break none and fail no new connection; then the restarted lb
/// takes a backend whose health check fails out of the table (its service
/// keeps answering, so only the table can keep connections away from it)
/// and back in once it passes again, without a failed connection throughout.
#[test]
fn ipv6_vip_survives_kill_9_restarts_and_fails_over_on_health() {
    if !root_or_skip("ipv6_vip_survives_kill_9_restarts_and_fails_over_on_health") {
        return;
    }
    const RESTARTS: usize = 3;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut topo = L2Topology::new(&["b1", "b2", "b3"]).unwrap();
    // health_port_check's timing: interval 300ms, rise 2, fall 2.
    let (interval, rise, fall) = (Duration::from_millis(300), 2u32, 2u32);
    let mut lb = topo
        .start_lb(&config(
            VIP6.into(),
            &[(0, 1, "active"), (1, 1, "active"), (2, 1, "active")],
            &health_port_check(),
            "fail_open",
        ))
        .unwrap();
    let conns = LongLived::open(&topo.client, WEB6, 100).unwrap();
    let stream = NewConnections::start(&topo.client, WEB6, Duration::from_millis(10)).unwrap();

    kill_9_and_restart(&mut lb, RESTARTS, Duration::from_secs(1));
    std::thread::sleep(Duration::from_secs(1));
    // b2's probes fail from here on; its service still answers.
    let report = conns.finish();
    let failing = Instant::now();
    topo.set_health(1, false).unwrap();
    let settled = failing + interval * fall + Duration::from_secs(1);
    std::thread::sleep(settled - Instant::now());
    let accepted_at_settled = topo.served()[1].1;
    std::thread::sleep(Duration::from_secs(2));
    let accepted_at_passing = topo.served()[1].1;
    let passing = Instant::now();
    topo.set_health(1, true).unwrap();
    let rejoined = passing + interval * rise + Duration::from_secs(1);
    std::thread::sleep(rejoined - Instant::now() + Duration::from_secs(2));
    let attempts = stream.finish().unwrap();

    let b2_while_down: Vec<_> = attempts
        .iter()
        .filter(|a| a.at >= settled && a.at < passing && a.backend.as_deref() == Some("b2"))
        .collect();
    let down_window = attempts
        .iter()
        .filter(|a| a.at >= settled && a.at < passing)
        .count();
    let b2_back = attempts
        .iter()
        .filter(|a| a.at >= rejoined && a.backend.as_deref() == Some("b2"))
        .count();
    println!(
        "{RESTARTS} kill -9 restarts: {} long-lived IPv6 connections ({} broken) over {:?}; \
         {} new connections ({} failed); b2 while down: {} of {down_window}; b2 after \
         rejoining: {b2_back}",
        report.len(),
        broken(&report).len(),
        per_backend(&report),
        attempts.len(),
        failed(&attempts),
        b2_while_down.len()
    );
    assert_eq!(
        lb.log()
            .matches("adopting the pinned program state")
            .count(),
        RESTARTS
    );
    assert_eq!(report.len(), 100);
    assert!(broken(&report).is_empty(), "broken: {:?}", broken(&report));
    assert_eq!(per_backend(&report).len(), 3, "long-lived on every backend");
    assert_eq!(
        failed(&attempts),
        0,
        "no new connection fails; lb log:\n{}",
        lb.log()
    );
    assert!(
        down_window > 0,
        "connections were attempted while b2 was down"
    );
    assert!(
        b2_while_down.is_empty(),
        "no new connection reaches b2 after fall*interval+1s: {b2_while_down:?}"
    );
    assert!(
        b2_back > 0,
        "b2 receives new connections after rise*interval+1s"
    );
    let b2 = Some(backend_address6(1).into());
    assert_eq!(
        swaps_of(&lb.log(), b2, Some(false)).len(),
        1,
        "{}",
        lb.log()
    );
    assert_eq!(swaps_of(&lb.log(), b2, Some(true)).len(), 1, "{}", lb.log());
    assert_eq!(
        accepted_at_passing, accepted_at_settled,
        "b2's server accepted nothing new while it was down"
    );
}

/// Waits (at most 10 s) until the load balancer's eth0 runs an XDP program
/// again and lb says it is attached and ready.
fn wait_attached(topo: &L2Topology, lb: &LbProcess) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let has_program = || {
        topo.lb
            .ip(&["link", "show", "eth0"])
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("xdp"))
    };
    while !(has_program() && lb.status().is_ok_and(|s| s.attached && s.ready)) {
        assert!(
            Instant::now() < deadline,
            "not attached again:\n{}",
            lb.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The load balancer's interface deleted and re-created (a new ifindex, no
/// program on it) under 100 long-lived connections: first with lb running
/// (it notices, reports itself not attached, and attaches a new link), then
/// with lb stopped (the next lb finds the pinned link severed and replaces
/// it). Maps and the flow table stay: no long-lived connection breaks.
#[test]
fn a_re_created_interface_gets_the_program_back_with_its_flows() {
    if !root_or_skip("a_re_created_interface_gets_the_program_back_with_its_flows") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut topo = L2Topology::new(&["b1", "b2", "b3"]).unwrap();
    let mut lb = topo
        .start_lb(&config(
            VIP.into(),
            &[(0, 1, "active"), (1, 1, "active"), (2, 1, "active")],
            &health_port_check(),
            "fail_open",
        ))
        .unwrap();
    let conns = LongLived::open(&topo.client, WEB, 100).unwrap();
    std::thread::sleep(Duration::from_secs(1));

    // With lb running.
    topo.recreate_lb_interface().unwrap();
    wait_attached(&topo, &lb);
    assert!(
        lb.log().contains("attached to the re-created interface"),
        "{}",
        lb.log()
    );
    std::thread::sleep(Duration::from_secs(2));

    // With lb stopped: the pinned link is severed meanwhile.
    lb.kill9().unwrap();
    topo.recreate_lb_interface().unwrap();
    lb.restart().unwrap();
    assert!(
        lb.log().contains("attaching a new link"),
        "the severed link was replaced:\n{}",
        lb.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    let report = conns.finish();
    println!(
        "interface re-created twice: {} long-lived connections, {} broken",
        report.len(),
        broken(&report).len()
    );
    assert!(broken(&report).is_empty(), "broken: {:?}", broken(&report));
    let tally = topo.client.enter(|| tcp_connections(WEB, 50)).unwrap();
    assert_eq!(
        tally.failures, 0,
        "new connections after the second re-creation"
    );
}
