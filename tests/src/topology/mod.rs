//! The direct-server-return test topologies, dual-stack: a client, the load
//! balancer and backends, each in its own namespace, every interface with an
//! IPv4 and an IPv6 address on parallel schemes.
//!
//! Same segment ([`Topology::new`], `l2` forwarding):
//! ```text
//!   client 10.77.0.2   fd00:77::2   ─┐
//!   lb     10.77.0.3   fd00:77::3   ─┼─ br0 (namespace "sw")
//!   b1..bN 10.77.0.11+ fd00:77::11+ ─┘   backends hold the VIPs 10.77.0.100
//!                                        and fd00:77::100 on lo
//! ```
//! Routed ([`Topology::routed`], `ipip` forwarding): the backends sit on
//! 10.99.0.0/24 and fd00:99::/64 behind a router (10.77.0.1 / fd00:77::1 on
//! the front segment, 10.99.0.1 / fd00:99::1 on the back one) and run
//! `lb decap`. [`Topology::routed_via_link_local`] is the same, except that
//! the client and the load balancer reach fd00:99::/64 via the router's
//! link-local address fe80::1 on eth0, as real IPv6 routes usually do.
//!
//! The client routes the VIPs via the load balancer; the load balancer's
//! namespace forwards neither IPv4 nor IPv6, so only the XDP program (MAC
//! rewrite or encapsulation) can deliver a packet to a backend, and backends
//! answer the client directly.

pub mod anycast;
mod build;
mod decap;
mod lb;
mod process;
mod servers;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aya::Ebpf;

use self::{build::switch, servers::Server};
pub use self::{
    decap::DecapProcess,
    lb::{LbProcess, swaps_of},
    process::lb_binary,
};
use crate::{
    addresses::{
        TCP_PORT, UDP_PORT, backend_address, backend_address6, routed_backend_address,
        routed_backend_address6,
    },
    netns::Netns,
};

pub struct Backend {
    pub name: String,
    pub address: Ipv4Addr,
    pub address6: Ipv6Addr,
    pub ns: Netns,
}

/// Where the backends are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// On the load balancer's segment (`l2` forwarding).
    SameSegment,
    /// On another segment behind a router, each running `lb decap`
    /// (`ipip` forwarding). IPv6 goes via the router's global address
    /// [`ROUTER6`](crate::addresses::ROUTER6).
    Routed,
    /// [`Routed`](Self::Routed), but the client and the load balancer route
    /// fd00:99::/64 via the router's link-local
    /// [`ROUTER6_LINK_LOCAL`](crate::addresses::ROUTER6_LINK_LOCAL) on eth0
    /// (IPv4 still via [`ROUTER`](crate::addresses::ROUTER)).
    RoutedViaLinkLocal,
}

/// Fields drop in declaration order: servers, decap processes and the load
/// balancer stop before the namespaces they live in are deleted.
pub struct Topology {
    servers: Vec<Server>,
    _decaps: Vec<DecapProcess>,
    _peer_pass: Ebpf,
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Backend>,
    _router: Option<Netns>,
    _switches: Vec<Netns>,
}

/// The topology most tests use: everything on one segment.
pub type L2Topology = Topology;

impl Topology {
    /// Everything on one segment (see the module docs).
    pub fn new(backend_names: &[&str]) -> anyhow::Result<Topology> {
        Self::build(backend_names, Layout::SameSegment)
    }

    /// Backends on 10.99.0.0/24 and fd00:99::/64 behind a router (10.77.0.1
    /// / fd00:77::1 and 10.99.0.1 / fd00:99::1), each running `lb decap`;
    /// the load balancer routes to them via the router and still does not
    /// forward IP itself.
    pub fn routed(backend_names: &[&str]) -> anyhow::Result<Topology> {
        Self::build(backend_names, Layout::Routed)
    }

    /// [`routed`](Self::routed) with the IPv6 routes to fd00:99::/64 via the
    /// router's link-local address `fe80::1` on eth0 (see
    /// [`Layout::RoutedViaLinkLocal`]).
    pub fn routed_via_link_local(backend_names: &[&str]) -> anyhow::Result<Topology> {
        Self::build(backend_names, Layout::RoutedViaLinkLocal)
    }

    /// Deletes the load balancer's interface and plugs a new one of the
    /// same name, MAC and addresses (a re-created veth: a new ifindex, no
    /// XDP program on it).
    pub fn recreate_lb_interface(&mut self) -> anyhow::Result<()> {
        self._peer_pass = build::replug_load_balancer(&self._switches[0], &self.lb)?;
        Ok(())
    }

    /// Builds the topology with one backend per name, each running a TCP
    /// server on port 80 and UDP servers on VIP:5353 and [VIP6]:5353 that
    /// answer with the backend's name, in both families.
    pub fn build(backend_names: &[&str], layout: Layout) -> anyhow::Result<Topology> {
        let front = switch()?;
        let client = build::client(&front)?;
        let (lb, peer_pass) = build::load_balancer(&front)?;
        let (router, back) = match layout {
            Layout::SameSegment => (None, None),
            Layout::Routed | Layout::RoutedViaLinkLocal => {
                let (router, back) = build::router(&front, layout, [&client, &lb])?;
                (Some(router), Some(back))
            }
        };

        let mut backends = Vec::new();
        let mut servers = Vec::new();
        let mut decaps = Vec::new();
        for (i, name) in backend_names.iter().enumerate() {
            let (segment, address, address6) = match &back {
                None => (&front, backend_address(i), backend_address6(i)),
                Some(back) => (back, routed_backend_address(i), routed_backend_address6(i)),
            };
            let ns = build::backend(name, segment, address, address6, back.is_some())?;
            if back.is_some() {
                decaps.push(DecapProcess::start(&ns)?);
            }
            servers.push(Server::start(&ns, name)?);
            backends.push(Backend {
                name: name.to_string(),
                address,
                address6,
                ns,
            });
        }

        Ok(Topology {
            servers,
            _decaps: decaps,
            _peer_pass: peer_pass,
            client,
            lb,
            backends,
            _router: router,
            _switches: std::iter::once(front).chain(back).collect(),
        })
    }

    /// Starts `lb run` inside the load balancer's namespace with `config` and
    /// waits until it is ready (its program attached).
    pub fn start_lb(&self, config: &str) -> anyhow::Result<LbProcess> {
        let mut lb = LbProcess::start(&self.lb, config)?;
        lb.wait_ready()?;
        Ok(lb)
    }

    /// Starts `lb run` and returns at once (see [`LbProcess::wait_ready`]).
    pub fn start_lb_unwaited(&self, config: &str) -> anyhow::Result<LbProcess> {
        LbProcess::start(&self.lb, config)
    }

    /// Per backend: (name, TCP connections accepted, UDP datagrams answered).
    pub fn served(&self) -> Vec<(String, usize, usize)> {
        self.servers.iter().map(Server::served).collect()
    }

    /// Makes `flows` TCP connections (to `vip`:80) and `flows` UDP exchanges
    /// (to `vip`:5353) from the client and asserts that every one succeeds,
    /// that each protocol's shares are within 15% of `weights`, and that the
    /// servers answered exactly those (nothing twice).
    pub fn assert_spread_by_weight(
        &self,
        lb: &LbProcess,
        vip: IpAddr,
        weights: &[(&str, u32)],
        flows: usize,
    ) {
        use crate::traffic::{tcp_connections, udp_exchanges};
        // The servers count for the topology's lifetime; compare the change.
        let served = || -> usize { self.served().iter().map(|s| s.1 + s.2).sum() };
        let before = served();
        let tcp = self
            .client
            .enter(move || tcp_connections(SocketAddr::new(vip, TCP_PORT), flows))
            .unwrap();
        let udp = self
            .client
            .enter(move || udp_exchanges(SocketAddr::new(vip, UDP_PORT), flows))
            .unwrap();
        println!("{vip} tcp: {tcp:?}\n{vip} udp: {udp:?}");
        for (what, tally) in [("tcp", &tcp), ("udp", &udp)] {
            assert_eq!(tally.attempts(), flows);
            assert_eq!(
                tally.failures,
                0,
                "{what}: every exchange succeeds; lb log:\n{}",
                lb.log()
            );
            let off = tally.off_weight(weights, 0.15);
            assert!(
                off.is_empty(),
                "{what}: shares off weight by > 15%: {off:?}"
            );
        }
        assert_eq!(
            served() - before,
            2 * flows,
            "every backend answer was one client exchange"
        );
    }

    /// Opens or closes backend `i`'s service port (TCP 80). Closing refuses
    /// new connections; established ones keep being served.
    pub fn set_service(&mut self, i: usize, on: bool) -> anyhow::Result<()> {
        self.servers[i].set_service(&self.backends[i].ns, on)
    }

    /// Opens or closes backend `i`'s health port (TCP 8080).
    pub fn set_health(&mut self, i: usize, on: bool) -> anyhow::Result<()> {
        self.servers[i].set_health(&self.backends[i].ns, on)
    }
}
