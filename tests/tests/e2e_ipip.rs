//! End-to-end tier for `forwarding: ipip`: backends on another subnet behind
//! a router, running `lb decap` with the VIP on loopback; the load balancer's
//! namespace does not forward IP, so only its XDP program's encapsulation can
//! reach them, and they answer the client directly. Real TCP and UDP.
//! Needs root.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use lb_common::Stat;
use lb_tests::{
    root::root_or_skip,
    topology::{HEALTH_PORT, TCP_PORT, Topology, UDP_PORT, VIP, routed_backend_address},
};

const WEIGHTS: [(&str, u32); 3] = [("b1", 1), ("b2", 1), ("b3", 2)];
const FLOWS: usize = 1500;

/// A TCP VIP and a UDP VIP on the same address, both `ipip` to the routed
/// backends with these weights.
fn config(weights: &[(&str, u32)]) -> String {
    let backends: String = weights
        .iter()
        .enumerate()
        .map(|(i, (_, w))| {
            format!(
                "      - {{ address: {}, weight: {w} }}\n",
                routed_backend_address(i)
            )
        })
        .collect();
    let vip = |name: &str, port: u16, proto: &str| {
        format!(
            "  - name: {name}\n    address: {VIP}\n    port: {port}\n    protocol: {proto}\n    forwarding: ipip\n    \
             health_check: {{ port: {HEALTH_PORT} }}\n    backends:\n{backends}"
        )
    };
    format!(
        "interface: eth0\nmaglev: {{ table_size: 65537, seed: 0x5eed }}\nvips:\n{}{}",
        vip("web", TCP_PORT, "tcp"),
        vip("echo", UDP_PORT, "udp")
    )
}

#[test]
fn ipip_spreads_tcp_and_udp_over_routed_backends_by_weight() {
    if !root_or_skip("ipip_spreads_tcp_and_udp_over_routed_backends_by_weight") {
        return;
    }
    let names: Vec<&str> = WEIGHTS.iter().map(|w| w.0).collect();
    let topo = Topology::routed(&names).expect("topology");
    let lb = topo.start_lb(&config(&WEIGHTS)).expect("lb run");

    topo.assert_spread_by_weight(&lb, &WEIGHTS, FLOWS);
    for s in [Stat::DropNoNeighbour, Stat::DropTooBig] {
        assert_eq!(lb.stat(s).unwrap(), 0, "{}", s.name());
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
    const SIZE: usize = 10 << 20;
    let topo = Topology::routed(&["b1"]).expect("topology");
    let lb = topo.start_lb(&config(&[("b1", 1)])).expect("lb run");

    let echoed = topo
        .client
        .enter(|| -> anyhow::Result<Vec<u8>> {
            let conn = TcpStream::connect_timeout(
                &SocketAddr::from((VIP, TCP_PORT)),
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
    let echoed = echoed.unwrap_or_else(|e| panic!("upload: {e:#}; lb log:\n{}", lb.log()));
    assert_eq!(echoed.len(), SIZE, "the whole upload came back");
    assert!(
        echoed == payload(SIZE),
        "the echo matches the upload byte for byte"
    );
    let answered = lb.stat(Stat::IcmpTooBig).unwrap();
    println!("icmp_too_big: {answered}");
    assert!(answered > 0, "full-sized segments were answered with ICMP");
    assert_eq!(lb.stat(Stat::DropTooBig).unwrap(), 0);
}

/// A recognisable, non-repeating-per-segment pattern.
fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}
