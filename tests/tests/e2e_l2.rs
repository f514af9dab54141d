//! End-to-end tier: real kernel TCP and UDP through `lb run` in network
//! namespaces, L2 direct server return. Needs root.

use std::net::SocketAddr;

use lb_tests::{
    root::root_or_skip,
    topology::{HEALTH_PORT, L2Topology, TCP_PORT, UDP_PORT, VIP},
    traffic::tcp_connections,
};

const WEIGHTS: [(&str, u32); 3] = [("b1", 1), ("b2", 1), ("b3", 2)];
const FLOWS: usize = 1500;

#[test]
fn l2_dsr_spreads_tcp_and_udp_over_backends_by_weight_native_xdp() {
    if root_or_skip("l2_dsr_spreads_tcp_and_udp_over_backends_by_weight_native_xdp") {
        spreads_by_weight("native");
    }
}

#[test]
fn l2_dsr_spreads_tcp_and_udp_over_backends_by_weight_generic_xdp() {
    if root_or_skip("l2_dsr_spreads_tcp_and_udp_over_backends_by_weight_generic_xdp") {
        spreads_by_weight("generic");
    }
}

fn spreads_by_weight(xdp_mode: &str) {
    let names: Vec<&str> = WEIGHTS.iter().map(|w| w.0).collect();
    let topo = L2Topology::new(&names).expect("topology");
    let backends: String = WEIGHTS
        .iter()
        .enumerate()
        .map(|(i, (_, w))| {
            format!(
                "      - {{ address: {}, weight: {w} }}\n",
                lb_tests::topology::backend_address(i)
            )
        })
        .collect();
    let vip = |name: &str, port: u16, proto: &str| {
        format!(
            "  - name: {name}\n    address: {VIP}\n    port: {port}\n    protocol: {proto}\n    forwarding: l2\n    health_check: {{ port: {HEALTH_PORT} }}\n    backends:\n{backends}"
        )
    };
    let config = format!(
        "interface: eth0\nxdp_mode: {xdp_mode}\nmaglev: {{ table_size: 65537, seed: 0x5eed }}\nvips:\n{}{}",
        vip("web", TCP_PORT, "tcp"),
        vip("echo", UDP_PORT, "udp")
    );
    let mut lb = topo.start_lb(&config).expect("lb run");

    topo.assert_spread_by_weight(&lb, &WEIGHTS, FLOWS);

    // SIGTERM ends lb but not forwarding: the program stays attached.
    let (status, log) = lb.terminate().expect("lb stops");
    assert!(status.success(), "lb exits 0 on SIGTERM: {status}\n{log}");
    assert!(
        log.contains(&format!(
            "mode={}",
            xdp_mode[..1].to_uppercase() + &xdp_mode[1..]
        )),
        "{log}"
    );
    let after = topo
        .client
        .enter(|| tcp_connections(SocketAddr::from((VIP, TCP_PORT)), 50))
        .unwrap();
    assert_eq!(after.failures, 0, "forwarding continues after lb exits");
    // `lb stop` detaches.
    let said = lb.lb_stop().expect("lb stop");
    assert!(said.contains("detached"), "{said}");
    let link = topo.lb.ip(&["link", "show", "eth0"]).unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(!link.contains("xdp"), "program detached by lb stop: {link}");
    assert!(!lb.pin_path().exists(), "pins removed");
}
