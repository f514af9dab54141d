//! The address plan every test shares, dual-stack on parallel schemes: the
//! IPv4 scheme's 10.77.0.x is fd00:77::x, the routed backends' 10.99.0.x is
//! fd00:99::x. The packet tier uses the same addresses as the namespaces, so
//! a frame in a fixture reads like one captured in an end-to-end test.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
pub const LB: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
pub const TCP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 5353;
/// TCP port of each backend's health listener (see
/// [`Topology::set_health`](crate::topology::Topology::set_health)).
pub const HEALTH_PORT: u16 = 8080;

/// The client's IPv6 address (the IPv4 scheme's 10.77.0.x is fd00:77::x).
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2);
/// The load balancer's IPv6 address.
pub const LB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 3);
/// The IPv6 VIP, held on every backend's loopback next to [`VIP`].
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x100);

/// The i-th backend's address on the load balancer's segment (10.77.0.11,
/// .12, ...).
pub fn backend_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 11 + i as u8)
}

/// The i-th backend's IPv6 address on the load balancer's segment
/// (fd00:77::11, ::12, ...).
pub fn backend_address6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x11 + i as u16)
}

/// The router's address on the load balancer's segment (routed layout).
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The router's address on the backends' segment.
pub const ROUTER_B: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The router's IPv6 address on the load balancer's segment.
pub const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1);
/// The router's IPv6 address on the backends' segment.
pub const ROUTER6_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);

/// The router's fixed link-local address on the load balancer's segment
/// (next to the one the kernel derives from its MAC), the IPv6 next hop of
/// the routed-via-link-local topology.
pub const ROUTER6_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The i-th backend's address behind the router (10.99.0.11, .12, ...).
pub fn routed_backend_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, 11 + i as u8)
}

/// The i-th backend's IPv6 address behind the router (fd00:99::11, ::12,
/// ...).
pub fn routed_backend_address6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x11 + i as u16)
}
