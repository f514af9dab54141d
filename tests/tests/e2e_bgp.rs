//! End-to-end tier for scale-out over BGP: two instances, each running `lb
//! run` and ExaBGP with `lb bgp-feed`, announce the VIPs to a real router
//! (FRR) that spreads flows over both by ECMP. Needs root, FRR and ExaBGP
//! (Debian packages `frr`, `exabgp`; `cargo xtask setup` installs them).
//!
//! One topology serves every step, in the order that keeps them independent:
//! the routes form (both next hops, both families), a feed restarted by
//! ExaBGP changes nothing, one VIP's failed backends withdraw that VIP only,
//! traffic spreads over both instances, a SIGTERM drains an instance
//! without breaking a connection, the instance returns after
//! `announce_after`, and the hard loss of the other (its link down) is
//! noticed at the hold time without breaking a long-lived connection.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_tests::{
    addresses::{TCP_PORT, VIP, VIP6, backend_address, backend_address6},
    root::root_or_skip,
    routing::{ExaBgp, Session, missing_daemons},
    topology::{
        LbProcess,
        anycast::{Anycast, LB_AS, ROUTER_AS, lb_address},
    },
    traffic::{LongLived, NewConnections},
};
use lb_userspace::bgp::Reason;

const WEB: SocketAddr = SocketAddr::new(IpAddr::V4(VIP), TCP_PORT);
const V4: IpAddr = IpAddr::V4(VIP);
const V6: IpAddr = IpAddr::V6(VIP6);
/// The admin listener, on each load balancer's own loopback.
const ADMIN: &str = "127.0.0.1:9742";

/// The config both instances run: the IPv4 VIP checks the backends' health
/// port (8080, which the test closes), the IPv6 VIP their service port.
fn config() -> String {
    config_announcing_web6(true)
}

/// [`config`] with `announce` of the IPv6 VIP set to `web6`.
fn config_announcing_web6(web6: bool) -> String {
    let backends = |v6: bool| -> String {
        (0..2)
            .map(|i| {
                let a: IpAddr = if v6 {
                    backend_address6(i).into()
                } else {
                    backend_address(i).into()
                };
                format!("      - {{ address: \"{a}\", weight: 1 }}\n")
            })
            .collect()
    };
    let vip = |name: &str, address: IpAddr, health_port: u16, v6: bool| {
        let announce = !v6 || web6;
        format!(
            "  - name: {name}\n    address: \"{address}\"\n    port: {TCP_PORT}\n    protocol: tcp\n    \
             forwarding: l2\n    announce: {announce}\n    health_check: {{ kind: tcp, port: {health_port}, interval: 200ms, \
             timeout: 150ms, rise: 2, fall: 2 }}\n    backends:\n{}",
            backends(v6)
        )
    };
    format!(
        "interface: eth0\nmaglev: {{ table_size: 65537, seed: 0x5eed }}\nadmin: {{ listen: \"{ADMIN}\" }}\n\
         bgp:\n  min_healthy: 1\n  announce_after: 1s\n  shutdown_delay: 2s\n  feed_grace: 30s\n  \
         med: 100\n  communities: [\"65000:80\"]\n  next_hop: self\nvips:\n{}{}",
        vip("web", V4, 8080, false),
        vip("web6", V6, TCP_PORT, true)
    )
}

/// Waits (at most `patience`) until `vip` has `n` next hops on the router;
/// returns how long that took.
fn wait_next_hops(
    t: &Anycast,
    vip: IpAddr,
    n: usize,
    patience: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let hops = t.next_hops(vip)?;
        if hops.len() == n {
            return Ok(start.elapsed());
        }
        if start.elapsed() > patience {
            anyhow::bail!(
                "{vip}: {} next hops, not {n}, after {patience:?}: {hops:?}\n{}",
                hops.len(),
                t.frr.vtysh("show bgp summary").unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Instance `i`: `lb run` and ExaBGP.
struct Instance {
    // ExaBGP stops first, then lb.
    exabgp: ExaBgp,
    lb: LbProcess,
}

fn start_instance(t: &Anycast, i: usize) -> anyhow::Result<Instance> {
    let mut lb = t.start_lb(i, &config())?;
    lb.wait_ready()?;
    let (a, a6) = lb_address(i);
    let sessions = [
        Session {
            peer: lb_tests::addresses::ROUTER.into(),
            local: a.into(),
        },
        Session {
            peer: lb_tests::addresses::ROUTER6.into(),
            local: a6.into(),
        },
    ];
    let exabgp = ExaBgp::start(&t.lbs[i], a, LB_AS, ROUTER_AS, &sessions, ADMIN.parse()?)?;
    Ok(Instance { exabgp, lb })
}

fn logs(instances: &[Instance]) -> String {
    instances
        .iter()
        .enumerate()
        .map(|(i, x)| {
            format!(
                "=== lb{i}\n{}\n=== exabgp{i}\n{}",
                x.lb.log(),
                x.exabgp.log()
            )
        })
        .collect()
}

/// The VIP's packet counter on one instance.
fn packets(x: &Instance, name: &str) -> u64 {
    x.lb.status()
        .ok()
        .and_then(|s| s.vips.into_iter().find(|v| v.name == name))
        .map_or(0, |v| v.packets)
}

#[test]
fn anycast_over_bgp_with_ecmp() {
    if !root_or_skip("anycast_over_bgp_with_ecmp") {
        return;
    }
    let missing = missing_daemons();
    if !missing.is_empty() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("missing {missing:?}, and CI=true forbids skipping (cargo xtask setup)");
        }
        eprintln!("SKIPPED anycast_over_bgp_with_ecmp: missing {missing:?}");
        return;
    }
    let mut t = Anycast::new(2, &["b1", "b2"]).expect("topology");
    let mut x: Vec<Instance> = (0..2)
        .map(|i| start_instance(&t, i).expect("instance"))
        .collect();

    // 1. Both instances announce both VIPs: two next hops each.
    for vip in [V4, V6] {
        let took = wait_next_hops(&t, vip, 2, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(&x)));
        println!("{vip}: two next hops after {took:?}");
    }
    let status = x[0].lb.status().unwrap();
    assert!(status.vips.iter().all(|v| v.bgp.announced), "{status:?}");

    // 7. A feed killed and respawned by ExaBGP withdraws nothing.
    let old = x[0].exabgp.feed_pid().expect("the feed runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let watch = Instant::now();
    let mut respawned = false;
    while watch.elapsed() < Duration::from_secs(4) {
        for vip in [V4, V6] {
            let hops = t.next_hops(vip).unwrap();
            assert_eq!(
                hops.len(),
                2,
                "{vip} lost a next hop after the feed restarted: {hops:?}"
            );
        }
        respawned |= x[0].exabgp.feed_pid().is_some_and(|p| p != old);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        respawned,
        "ExaBGP respawns the feed:\n{}",
        x[0].exabgp.log()
    );
    println!("feed restarted by ExaBGP: both next hops stayed for 4 s");

    // 6. Every backend of the IPv4 VIP fails its health check: the IPv4
    //    VIP is withdrawn by both instances, the IPv6 one stays.
    let down = Instant::now();
    for i in 0..2 {
        t.set_health(i, false).unwrap();
    }
    let took = wait_next_hops(&t, V4, 0, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&x)));
    assert_eq!(t.next_hops(V6).unwrap().len(), 2, "the IPv6 VIP stays");
    let status = x[1].lb.status().unwrap();
    assert_eq!(
        status.vips[0].bgp.reason,
        Reason::TooFewHealthy {
            healthy: 0,
            min_healthy: 1
        }
    );
    let table = lb_userspace::status::render(&status);
    assert!(
        table.contains("bgp: withdrawn (0 of min_healthy 1 healthy)"),
        "{table}"
    );
    println!(
        "health down to router FIB without {V4}: {:?} (health checks: interval 200ms, fall 2)",
        took.min(down.elapsed())
    );
    let up = Instant::now();
    for i in 0..2 {
        t.set_health(i, true).unwrap();
    }
    wait_next_hops(&t, V4, 2, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&x)));
    println!(
        "health back to two next hops for {V4}: {:?} (rise 2, announce_after 1s)",
        up.elapsed()
    );

    // 6b. `announce: false` reloaded on instance 1 takes the IPv6 VIP off
    //     that instance only; reloaded back, it returns.
    x[1].lb
        .reload(&config_announcing_web6(false))
        .unwrap()
        .expect("reload applies");
    wait_next_hops(&t, V6, 1, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&x)));
    assert_eq!(
        t.next_hops(V6).unwrap(),
        vec![IpAddr::from(lb_address(0).1)],
        "only instance 0 announces the IPv6 VIP"
    );
    assert_eq!(t.next_hops(V4).unwrap().len(), 2, "the IPv4 VIP stays");
    assert_eq!(
        x[1].lb.status().unwrap().vips[1].bgp.reason,
        Reason::DisabledByConfig
    );
    x[1].lb.reload(&config()).unwrap().expect("reload applies");
    wait_next_hops(&t, V6, 2, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&x)));
    println!("announce: false took the IPv6 VIP off instance 1 and back");

    // 2. Traffic spreads over both instances.
    let long = LongLived::open(&t.client, WEB, 100).expect("100 long-lived connections");
    let fresh = NewConnections::start(&t.client, WEB, Duration::from_millis(50)).unwrap();
    let before = [packets(&x[0], "web"), packets(&x[1], "web")];
    std::thread::sleep(Duration::from_secs(3));
    let after = [packets(&x[0], "web"), packets(&x[1], "web")];
    for i in 0..2 {
        assert!(
            after[i] > before[i] + 100,
            "instance {i} carries part of the traffic: {before:?} -> {after:?}"
        );
    }
    println!("web packets per instance over 3 s: {before:?} -> {after:?}");

    // 3. SIGTERM to instance 0: its path leaves the router's ECMP set (the
    //    graceful-shutdown community, then the withdrawal); nothing breaks.
    let pid = x[0].lb.pid().expect("lb runs");
    let term = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let moved = wait_next_hops(&t, V4, 1, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&x)));
    let route = t
        .frr
        .vtysh(&format!("show bgp ipv4 unicast {VIP}/32"))
        .unwrap();
    println!("SIGTERM to router FIB change: {moved:?}\n{route}");
    assert_eq!(
        t.next_hops(V4).unwrap(),
        vec![IpAddr::from(lb_address(1).0)],
        "traffic moves to instance 1"
    );
    assert!(
        route.contains("Paths: (2 available") && route.contains("graceful-shutdown"),
        "first the graceful-shutdown community, the path still there:\n{route}"
    );
    let withdrawn = wait_paths(&t, 1, Duration::from_secs(10));
    println!("SIGTERM to withdrawal at the router: {:?}", term.elapsed());
    assert!(
        withdrawn >= Duration::from_secs(2) - moved,
        "withdrawn after shutdown_delay (2 s), not before"
    );
    let (exit, _) = x[0].lb.wait_exit().unwrap();
    assert!(exit.success(), "lb exits cleanly after the drain");
    println!("SIGTERM to lb exit: {:?}", term.elapsed());
    std::thread::sleep(Duration::from_secs(1));
    assert_unbroken("drain", long, fresh, true, &x);

    // 5. Instance 0 starts again: it adopts its pinned program and announces
    //    after announce_after; nothing breaks.
    let long = LongLived::open_patient(&t.client, WEB, 100, PATIENCE).unwrap();
    let fresh = NewConnections::start(&t.client, WEB, Duration::from_millis(50)).unwrap();
    let restart = Instant::now();
    x[0].lb.restart().unwrap();
    let ready = restart.elapsed();
    let settling = x[0].lb.status().unwrap().vips[0].bgp.clone();
    assert!(
        !settling.announced && matches!(settling.reason, Reason::Settling { .. }),
        "not announced at once: {settling:?}"
    );
    let back = wait_next_hops(&t, V4, 2, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&x)));
    println!("return: ready after {ready:?}, two next hops again {back:?} after the restart began");
    assert!(
        back >= Duration::from_secs(1),
        "announced only after announce_after"
    );
    std::thread::sleep(Duration::from_secs(2));
    let fresh = {
        let attempts = fresh.finish().unwrap();
        let failed = attempts.iter().filter(|a| a.backend.is_none()).count();
        println!(
            "return: {} new connections, {failed} failed",
            attempts.len()
        );
        assert_eq!(failed, 0, "no new connection fails on the return");
        NewConnections::start(&t.client, WEB, Duration::from_millis(50)).unwrap()
    };

    // 4. Hard loss of instance 1 (its link down: lb, ExaBGP and XDP gone at
    //    once): the router drops the path at the hold time (3 s); the
    //    long-lived connections resume through instance 0.
    let lost = Instant::now();
    t.lbs[1].ip(&["link", "set", "eth0", "down"]).unwrap();
    let dropped = wait_next_hops(&t, V4, 1, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&x)));
    println!("hard loss to router FIB change: {dropped:?} (hold time 3 s)");
    assert!(
        dropped >= Duration::from_millis(1500),
        "only the hold time (3 s, keepalives every 1 s) tells a silent loss"
    );
    std::thread::sleep(Duration::from_secs(8).saturating_sub(lost.elapsed()) + PATIENCE / 2);
    assert_unbroken("hard loss", long, fresh, false, &x);
}

/// How long a long-lived connection may go unanswered across an outage
/// before it counts as broken (TCP retransmits at 0.2, 0.6, 1.4, 3.0 and
/// 6.2 s; the router notices a silent loss at 3 s).
const PATIENCE: Duration = Duration::from_secs(10);

/// Waits until the router's BGP table holds `n` paths for the IPv4 VIP;
/// returns how long that took.
fn wait_paths(t: &Anycast, n: usize, patience: Duration) -> Duration {
    let start = Instant::now();
    let want = format!("Paths: ({n} available");
    loop {
        let route = t
            .frr
            .vtysh(&format!("show bgp ipv4 unicast {VIP}/32"))
            .unwrap();
        if route.contains(&want) {
            return start.elapsed();
        }
        assert!(start.elapsed() < patience, "not {n} paths:\n{route}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Stops the traffic; asserts no long-lived connection broke and, when
/// `no_failures`, that no new connection failed.
fn assert_unbroken(
    step: &str,
    long: LongLived,
    fresh: NewConnections,
    no_failures: bool,
    x: &[Instance],
) {
    let attempts = fresh.finish().unwrap();
    let conns = long.finish();
    let broken: Vec<_> = conns.iter().filter(|c| c.broken.is_some()).collect();
    let failed = attempts.iter().filter(|a| a.backend.is_none()).count();
    println!(
        "{step}: {} long-lived connections, {} broken; {} new connections, {failed} failed",
        conns.len(),
        broken.len(),
        attempts.len()
    );
    assert!(broken.is_empty(), "{step}: broken: {broken:?}\n{}", logs(x));
    if no_failures {
        assert_eq!(failed, 0, "{step}: no new connection fails");
    }
}
