//! End-to-end tier: real kernel TCP and UDP through `lb run` in network
//! namespaces, L2 direct server return, to an IPv4 VIP and to an IPv6 VIP.
//! Needs root.

use std::net::{IpAddr, SocketAddr};

use lb_tests::{
    addresses::{HEALTH_PORT, TCP_PORT, UDP_PORT, VIP, VIP6, backend_address, backend_address6},
    root::root_or_skip,
    topology::L2Topology,
    traffic::tcp_connections,
};

const WEIGHTS: [(&str, u32); 3] = [("b1", 1), ("b2", 1), ("b3", 2)];
const FLOWS: usize = 1500;

#[test]
fn l2_dsr_spreads_tcp_and_udp_over_backends_by_weight_native_xdp() {
    if root_or_skip("l2_dsr_spreads_tcp_and_udp_over_backends_by_weight_native_xdp") {
        spreads_by_weight("native", Family::V4);
    }
}

#[test]
fn l2_dsr_spreads_tcp_and_udp_over_backends_by_weight_generic_xdp() {
    if root_or_skip("l2_dsr_spreads_tcp_and_udp_over_backends_by_weight_generic_xdp") {
        spreads_by_weight("generic", Family::V4);
    }
}

#[test]
fn l2_dsr_spreads_ipv6_tcp_and_udp_over_backends_by_weight_native_xdp() {
    if root_or_skip("l2_dsr_spreads_ipv6_tcp_and_udp_over_backends_by_weight_native_xdp") {
        spreads_by_weight("native", Family::V6);
    }
}

#[test]
fn l2_dsr_spreads_ipv6_tcp_and_udp_over_backends_by_weight_generic_xdp() {
    if root_or_skip("l2_dsr_spreads_ipv6_tcp_and_udp_over_backends_by_weight_generic_xdp") {
        spreads_by_weight("generic", Family::V6);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn vip(self) -> IpAddr {
        match self {
            Family::V4 => VIP.into(),
            Family::V6 => VIP6.into(),
        }
    }

    /// The i-th backend's address on the segment, of this family.
    fn backend(self, i: usize) -> IpAddr {
        match self {
            Family::V4 => backend_address(i).into(),
            Family::V6 => backend_address6(i).into(),
        }
    }
}

/// A web (TCP) and an echo (UDP) VIP of `family` over the segment's
/// backends with [`WEIGHTS`], as YAML list items. Addresses are quoted: an
/// IPv6 address is full of colons.
fn vips(family: Family) -> String {
    let backends: String = WEIGHTS
        .iter()
        .enumerate()
        .map(|(i, (_, w))| {
            format!(
                "      - {{ address: \"{}\", weight: {w} }}\n",
                family.backend(i)
            )
        })
        .collect();
    let vip = |name: &str, port: u16, proto: &str| {
        format!(
            "  - name: {name}\n    address: \"{}\"\n    port: {port}\n    protocol: {proto}\n    forwarding: l2\n    health_check: {{ port: {HEALTH_PORT} }}\n    backends:\n{backends}",
            family.vip()
        )
    };
    let suffix = if family == Family::V6 { "6" } else { "" };
    vip(&format!("web{suffix}"), TCP_PORT, "tcp") + &vip(&format!("echo{suffix}"), UDP_PORT, "udp")
}

fn spreads_by_weight(xdp_mode: &str, family: Family) {
    let names: Vec<&str> = WEIGHTS.iter().map(|w| w.0).collect();
    let topo = L2Topology::new(&names).expect("topology");
    // The IPv6 run also carries the IPv4 VIPs: one program, both families.
    let all_vips = match family {
        Family::V4 => vips(Family::V4),
        Family::V6 => vips(Family::V6) + &vips(Family::V4),
    };
    let config = format!(
        "interface: eth0\nxdp_mode: {xdp_mode}\nmaglev: {{ table_size: 65537, seed: 0x5eed }}\nvips:\n{all_vips}"
    );
    let mut lb = topo.start_lb(&config).expect("lb run");

    topo.assert_spread_by_weight(&lb, family.vip(), &WEIGHTS, FLOWS);
    if family == Family::V6 {
        // The IPv4 VIPs of the same program keep working next to the IPv6
        // ones (the spread of this smaller sample is not asserted).
        let v4 = topo
            .client
            .enter(|| tcp_connections(SocketAddr::from((VIP, TCP_PORT)), 100))
            .unwrap();
        println!("ipv4 next to ipv6: {v4:?}");
        assert_eq!(
            (v4.attempts(), v4.failures),
            (100, 0),
            "IPv4 VIP in a dual-stack config; lb log:\n{}",
            lb.log()
        );
    }

    // SIGTERM ends lb but not forwarding: the program stays attached.
    let (status, log) = lb.terminate().expect("lb stops");
    assert!(status.success(), "lb exits 0 on SIGTERM: {status}\n{log}");
    // The mode is logged in the config's own word.
    assert!(log.contains(&format!("mode={xdp_mode}")), "{log}");
    let vip = family.vip();
    let after = topo
        .client
        .enter(move || tcp_connections(SocketAddr::new(vip, TCP_PORT), 50))
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
