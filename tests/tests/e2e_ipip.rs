//! End-to-end tier for `forwarding: ipip`: backends on another subnet behind
//! a router, running `lb decap` with the VIP on loopback; the load balancer's
//! namespace does not forward IP, so only its XDP program's encapsulation can
//! reach them, and they answer the client directly. Real TCP and UDP.
//! Needs root.

use std::net::SocketAddr;

use lb_common::Stat;
use lb_tests::{
    root::root_or_skip,
    topology::{HEALTH_PORT, TCP_PORT, Topology, UDP_PORT, VIP, routed_backend_address},
    traffic::{tcp_connections, udp_exchanges},
};

const WEIGHTS: [(&str, u32); 3] = [("b1", 1), ("b2", 1), ("b3", 2)];
const FLOWS: usize = 1500;

#[test]
fn ipip_spreads_tcp_and_udp_over_routed_backends_by_weight() {
    if !root_or_skip("ipip_spreads_tcp_and_udp_over_routed_backends_by_weight") {
        return;
    }
    let names: Vec<&str> = WEIGHTS.iter().map(|w| w.0).collect();
    let topo = Topology::routed(&names).expect("topology");
    let backends: String = WEIGHTS
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
    let config = format!(
        "interface: eth0\nmaglev: {{ table_size: 65537, seed: 0x5eed }}\nvips:\n{}{}",
        vip("web", TCP_PORT, "tcp"),
        vip("echo", UDP_PORT, "udp")
    );
    let lb = topo.start_lb(&config).expect("lb run");

    let tcp = topo
        .client
        .enter(|| tcp_connections(SocketAddr::from((VIP, TCP_PORT)), FLOWS))
        .unwrap();
    let udp = topo
        .client
        .enter(|| udp_exchanges(SocketAddr::from((VIP, UDP_PORT)), FLOWS))
        .unwrap();
    println!("tcp: {tcp:?}\nudp: {udp:?}");
    for (what, tally) in [("tcp", &tcp), ("udp", &udp)] {
        assert_eq!(tally.attempts(), FLOWS);
        assert_eq!(
            tally.failures,
            0,
            "{what}: every exchange succeeds; lb log:\n{}",
            lb.log()
        );
        let off = tally.off_weight(&WEIGHTS, 0.15);
        assert!(
            off.is_empty(),
            "{what}: shares off weight by > 15%: {off:?}"
        );
    }
    let served: usize = topo.served().iter().map(|s| s.1 + s.2).sum();
    assert_eq!(
        served,
        2 * FLOWS,
        "every backend answer was one client exchange"
    );
    for s in [Stat::DropNoNeighbour, Stat::DropTooBig] {
        assert_eq!(lb.stat(s).unwrap(), 0, "{}", s.name());
    }
}
