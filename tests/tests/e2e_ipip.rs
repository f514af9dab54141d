//! End-to-end tier for `forwarding: ipip`: backends on another subnet behind
//! a router, running `lb decap` with the VIPs on loopback; the load
//! balancer's namespace forwards neither IPv4 nor IPv6, so only its XDP
//! program's encapsulation can reach them, and they answer the client
//! directly. Real TCP and UDP, over IPIP, IP6IP6 and IPv4-in-IPv6. Needs
//! root.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use lb_common::Stat;
use lb_tests::{
    addresses::{
        HEALTH_PORT, ROUTER6, ROUTER6_LINK_LOCAL, TCP_PORT, UDP_PORT, VIP, VIP6,
        routed_backend_address, routed_backend_address6,
    },
    root::root_or_skip,
    topology::{LbProcess, Topology},
    traffic::{Tally, tcp_connections, udp_exchanges},
};

const WEIGHTS: [(&str, u32); 3] = [("b1", 1), ("b2", 1), ("b3", 2)];
const FLOWS: usize = 1500;

/// The routed backends' IPv4 addresses with these weights.
fn backends4(weights: &[(&str, u32)]) -> Vec<(IpAddr, u32)> {
    (0..weights.len())
        .map(|i| (routed_backend_address(i).into(), weights[i].1))
        .collect()
}

/// The routed backends' IPv6 addresses with these weights.
fn backends6(weights: &[(&str, u32)]) -> Vec<(IpAddr, u32)> {
    (0..weights.len())
        .map(|i| (routed_backend_address6(i).into(), weights[i].1))
        .collect()
}

/// A TCP VIP (`web<suffix>`, port 80) and a UDP VIP (`echo<suffix>`, port
/// 5353) on `vip`, both `ipip` to `backends`, as YAML list items. Addresses
/// are quoted: an IPv6 address is full of colons.
fn vips(suffix: &str, vip: IpAddr, backends: &[(IpAddr, u32)]) -> String {
    let backends: String = backends
        .iter()
        .map(|(a, w)| format!("      - {{ address: \"{a}\", weight: {w} }}\n"))
        .collect();
    let one = |name: &str, port: u16, proto: &str| {
        format!(
            "  - name: {name}{suffix}\n    address: \"{vip}\"\n    port: {port}\n    protocol: {proto}\n    forwarding: ipip\n    \
             health_check: {{ port: {HEALTH_PORT} }}\n    backends:\n{backends}"
        )
    };
    one("web", TCP_PORT, "tcp") + &one("echo", UDP_PORT, "udp")
}

fn config(vips: &str) -> String {
    format!("interface: eth0\nmaglev: {{ table_size: 65537, seed: 0x5eed }}\nvips:\n{vips}")
}

/// Neither counter that says the encapsulation could not be sent moved.
fn assert_nothing_dropped(lb: &LbProcess) {
    for s in [Stat::DropNoNeighbour, Stat::DropTooBig] {
        assert_eq!(
            lb.stat(s).unwrap(),
            0,
            "{}; lb log:\n{}",
            s.name(),
            lb.log()
        );
    }
}

#[test]
fn ipip_spreads_tcp_and_udp_over_routed_backends_by_weight() {
    if !root_or_skip("ipip_spreads_tcp_and_udp_over_routed_backends_by_weight") {
        return;
    }
    let names: Vec<&str> = WEIGHTS.iter().map(|w| w.0).collect();
    let topo = Topology::routed(&names).expect("topology");
    let lb = topo
        .start_lb(&config(&vips("", VIP.into(), &backends4(&WEIGHTS))))
        .expect("lb run");

    topo.assert_spread_by_weight(&lb, VIP.into(), &WEIGHTS, FLOWS);
    assert_nothing_dropped(&lb);
}

/// IPv6 backends behind the router serve an IPv6 VIP (IP6IP6) and, from the
/// same program, an IPv4 VIP (IPv4-in-IPv6).
#[test]
fn ip6ip6_and_ipv4_in_ipv6_spread_tcp_and_udp_over_routed_ipv6_backends() {
    if !root_or_skip("ip6ip6_and_ipv4_in_ipv6_spread_tcp_and_udp_over_routed_ipv6_backends") {
        return;
    }
    const FLOWS_4IN6: usize = 300;
    let names: Vec<&str> = WEIGHTS.iter().map(|w| w.0).collect();
    let topo = Topology::routed(&names).expect("topology");
    let six = backends6(&WEIGHTS);
    let lb = topo
        .start_lb(&config(
            &(vips("6", VIP6.into(), &six) + &vips("4in6", VIP.into(), &six)),
        ))
        .expect("lb run");

    topo.assert_spread_by_weight(&lb, VIP6.into(), &WEIGHTS, FLOWS);

    // IPv4-in-IPv6: a smaller sample, so only "all succeed, every backend
    // serves" is asserted, not the spread (300 flows put a weight-1
    // backend's share within 15% only about nine times in ten).
    let tcp = topo
        .client
        .enter(|| tcp_connections(SocketAddr::from((VIP, TCP_PORT)), FLOWS_4IN6))
        .unwrap();
    let udp = topo
        .client
        .enter(|| udp_exchanges(SocketAddr::from((VIP, UDP_PORT)), FLOWS_4IN6))
        .unwrap();
    println!("4in6 tcp: {tcp:?}\n4in6 udp: {udp:?}");
    for (what, tally) in [("tcp", &tcp), ("udp", &udp)] {
        assert_all_served(what, tally, FLOWS_4IN6, &lb);
    }
    assert_nothing_dropped(&lb);
}

/// The usual IPv6 default route points at a router's link-local address,
/// which names a router only together with the link. Here the load balancer
/// (and the client) reach the routed IPv6 backends via the router's fe80::1
/// on eth0; `lb` resolves that next hop on the route's interface and IP6IP6
/// reaches every backend, with nothing dropped for want of a neighbour.
#[test]
fn ip6ip6_through_a_link_local_next_hop_reaches_every_routed_backend() {
    if !root_or_skip("ip6ip6_through_a_link_local_next_hop_reaches_every_routed_backend") {
        return;
    }
    const FLOWS_LL: usize = 300;
    let names: Vec<&str> = WEIGHTS.iter().map(|w| w.0).collect();
    let topo = Topology::routed_via_link_local(&names).expect("topology");
    // The premise: the load balancer's route to every backend goes via the
    // link-local address, on eth0.
    for i in 0..WEIGHTS.len() {
        let route = ip(
            &topo,
            &[
                "-6",
                "route",
                "get",
                &routed_backend_address6(i).to_string(),
            ],
        );
        assert!(
            route.contains(&format!("via {ROUTER6_LINK_LOCAL} dev eth0")),
            "route to backend {i}: {route}"
        );
    }
    let lb = topo
        .start_lb(&config(&vips("6", VIP6.into(), &backends6(&WEIGHTS))))
        .expect("lb run");

    let tcp = topo
        .client
        .enter(|| tcp_connections(SocketAddr::from((VIP6, TCP_PORT)), FLOWS_LL))
        .unwrap();
    let udp = topo
        .client
        .enter(|| udp_exchanges(SocketAddr::from((VIP6, UDP_PORT)), FLOWS_LL))
        .unwrap();
    println!("link-local next hop tcp: {tcp:?}\nlink-local next hop udp: {udp:?}");
    let neigh = ip(&topo, &["-6", "neigh", "show", "dev", "eth0"]);
    println!("lb's IPv6 neighbours on eth0:\n{neigh}");
    for (what, tally) in [("tcp", &tcp), ("udp", &udp)] {
        assert_all_served(what, tally, FLOWS_LL, &lb);
    }
    assert_nothing_dropped(&lb);
    // The next hop the load balancer resolved is the link-local one; the
    // router's global address was never needed.
    assert!(
        neigh
            .lines()
            .any(|l| l.starts_with(&format!("{ROUTER6_LINK_LOCAL} "))),
        "no neighbour entry for {ROUTER6_LINK_LOCAL}:\n{neigh}"
    );
    assert!(
        !neigh.lines().any(|l| l.starts_with(&format!("{ROUTER6} "))),
        "{ROUTER6} was resolved, so something routed via it:\n{neigh}"
    );
}

/// `ip ARGS` in the load balancer's namespace, its output as text.
fn ip(topo: &Topology, args: &[&str]) -> String {
    let out = topo.lb.ip(args).expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `flows` attempts, none failed, and every backend of [`WEIGHTS`] answered
/// some.
fn assert_all_served(what: &str, tally: &Tally, flows: usize, lb: &LbProcess) {
    assert_eq!(tally.attempts(), flows, "{what}");
    assert_eq!(
        tally.failures,
        0,
        "{what}: every exchange succeeds; lb log:\n{}",
        lb.log()
    );
    for (name, _) in WEIGHTS {
        assert!(
            tally.by_backend.get(name).copied().unwrap_or(0) > 0,
            "{what}: {name} served none: {tally:?}"
        );
    }
}

/// Every link has an MTU of 1500, so the client's full-sized segments (DF
/// set, as TCP sends them) are 20 bytes too big once encapsulated. The load
/// balancer answers them with ICMP "fragmentation needed"; the client's
/// kernel lowers its path MTU for the VIP and a 10 MB upload, echoed back by
/// the backend, arrives whole.
#[test]
fn path_mtu_discovery_through_the_tunnel_carries_a_10_mb_upload() {
    if !root_or_skip("path_mtu_discovery_through_the_tunnel_carries_a_10_mb_upload") {
        return;
    }
    let topo = Topology::routed(&["b1"]).expect("topology");
    let lb = topo
        .start_lb(&config(&vips("", VIP.into(), &backends4(&[("b1", 1)]))))
        .expect("lb run");

    upload_10_mb(&topo, &lb, VIP.into());
    let answered = lb.stat(Stat::IcmpTooBig).unwrap();
    println!("icmp_too_big: {answered}");
    assert!(answered > 0, "full-sized segments were answered with ICMP");
    assert_eq!(lb.stat(Stat::DropTooBig).unwrap(), 0);
}

/// The IPv6 counterpart: the client's full-sized segments are 40 bytes too
/// big inside an outer IPv6 header. IPv6 routers never fragment, so the load
/// balancer answers them with ICMPv6 "packet too big" (MTU 1460); the
/// client's kernel lowers its path MTU for the IPv6 VIP and the upload
/// arrives whole.
#[test]
fn path_mtu_discovery_through_the_ip6ip6_tunnel_carries_a_10_mb_upload() {
    if !root_or_skip("path_mtu_discovery_through_the_ip6ip6_tunnel_carries_a_10_mb_upload") {
        return;
    }
    let topo = Topology::routed(&["b1"]).expect("topology");
    let lb = topo
        .start_lb(&config(&vips("6", VIP6.into(), &backends6(&[("b1", 1)]))))
        .expect("lb run");

    upload_10_mb(&topo, &lb, VIP6.into());
    let answered = lb.stat(Stat::IcmpPacketTooBig).unwrap();
    println!("icmp_packet_too_big: {answered}");
    assert!(
        answered > 0,
        "full-sized segments were answered with ICMPv6"
    );
    assert_eq!(lb.stat(Stat::DropTooBig).unwrap(), 0);
}

/// Uploads 10 MB to `vip`:80 from the client and asserts the backend (b1)
/// echoed it back byte for byte.
fn upload_10_mb(topo: &Topology, lb: &LbProcess, vip: IpAddr) {
    const SIZE: usize = 10 << 20;
    let echoed = topo
        .client
        .enter(move || -> anyhow::Result<Vec<u8>> {
            let conn = TcpStream::connect_timeout(
                &SocketAddr::new(vip, TCP_PORT),
                Duration::from_secs(5),
            )?;
            // Bounds the transfer: any stall of 10 s fails the test.
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            conn.set_write_timeout(Some(Duration::from_secs(10)))?;
            let mut reader = BufReader::new(conn.try_clone()?);
            let mut name = String::new();
            reader.read_line(&mut name)?;
            anyhow::ensure!(name == "b1\n", "greeting {name:?}");
            // Write on one thread while this one reads the echo, so neither
            // side's buffers fill up and block the other.
            let mut writer = conn.try_clone()?;
            let upload = std::thread::spawn(move || -> std::io::Result<()> {
                writer.write_all(&payload(SIZE))?;
                writer.shutdown(std::net::Shutdown::Write)
            });
            let mut echoed = Vec::with_capacity(SIZE);
            reader.take(SIZE as u64).read_to_end(&mut echoed)?;
            upload.join().expect("upload thread")?;
            Ok(echoed)
        })
        .unwrap();
    let echoed = echoed.unwrap_or_else(|e| panic!("upload to {vip}: {e:#}; lb log:\n{}", lb.log()));
    assert_eq!(echoed.len(), SIZE, "the whole upload came back");
    assert!(
        echoed == payload(SIZE),
        "the echo matches the upload byte for byte"
    );
}

/// A recognisable, non-repeating-per-segment pattern.
fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}
