//! Two load balancers behind a BGP router that spreads the VIPs' traffic
//! over both by ECMP (the `bgp` end-to-end tests):
//! ```text
//!   client 10.66.0.2 fd00:66::2 ── router eth1 10.66.0.1 fd00:66::1 (FRR)
//!                                  router eth0 10.77.0.1 fd00:77::1 ─┐
//!   lb0    10.77.0.3 fd00:77::3 (lb run + ExaBGP)                   ├─ br0
//!   lb1    10.77.0.4 fd00:77::4 (lb run + ExaBGP)                   │
//!   b1..bN 10.77.0.11+ fd00:77::11+ (the VIPs on lo)               ─┘
//! ```
//! The router learns 10.77.0.100/32 and fd00:77::100/128 from both load
//! balancers (AS 65001) over one IPv4 and one IPv6 session each and hashes
//! flows over them on ports (`fib_multipath_hash_policy=1`). Backends answer
//! the client through the router (direct server return).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::Ebpf;

use super::{
    LbProcess,
    build::{attach_pass, backend, namespace, plug, plug_as, switch},
    servers::Server,
};
use crate::{
    addresses::{ROUTER, ROUTER6, backend_address, backend_address6},
    netns::{Netns, veth},
    routing::Frr,
};

/// The router's AS and the load balancers'.
pub const ROUTER_AS: u32 = 65000;
pub const LB_AS: u32 = 65001;

const CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 1);
const CLIENT_SIDE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x66, 0, 0, 0, 0, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 2);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x66, 0, 0, 0, 0, 0, 2);

/// Load balancer `i`'s addresses (10.77.0.3, .4; fd00:77::3, ::4).
pub fn lb_address(i: usize) -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::new(10, 77, 0, 3 + i as u8),
        Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 3 + i as u16),
    )
}

/// Fields drop in declaration order: servers and FRR stop before the
/// namespaces they live in are deleted.
pub struct Anycast {
    servers: Vec<Server>,
    pub frr: Frr,
    _peer_pass: Vec<Ebpf>,
    pub client: Netns,
    pub router: Netns,
    pub lbs: Vec<Netns>,
    pub backends: Vec<Netns>,
    _switch: Netns,
}

impl Anycast {
    /// `lbs` load balancers and one backend per name, FRR running and
    /// waiting for the load balancers' sessions.
    pub fn new(lbs: usize, backend_names: &[&str]) -> anyhow::Result<Anycast> {
        let front = switch()?;
        let router = namespace("router")?;
        plug_as(&front, &router, "p-router", "eth0", ROUTER, ROUTER6)?;
        let client = namespace("client")?;
        veth(&client, "eth0", &router, "eth1")?;
        for (ns, dev, a, a6) in [
            (&client, "eth0", CLIENT, CLIENT6),
            (&router, "eth1", CLIENT_SIDE, CLIENT_SIDE6),
        ] {
            ns.ip(&["addr", "add", &format!("{a}/24"), "dev", dev])?;
            ns.ip(&["addr", "add", &format!("{a6}/64"), "dev", dev, "nodad"])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        client.ip(&["route", "add", "default", "via", &CLIENT_SIDE.to_string()])?;
        client.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &CLIENT_SIDE6.to_string(),
        ])?;
        // Complete checksums: XDP_TX drops the "finish it later" promise.
        client.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            // Hash flows over the next hops on their ports too.
            ("net.ipv4.fib_multipath_hash_policy", "1"),
            ("net.ipv6.fib_multipath_hash_policy", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.eth0.rp_filter", "0"),
            ("net.ipv4.conf.eth1.rp_filter", "0"),
        ] {
            router.sysctl(key, value)?;
        }

        let mut lb_nets = Vec::new();
        let mut peer_pass = Vec::new();
        for i in 0..lbs {
            let ns = namespace(&format!("lb{i}"))?;
            let (a, a6) = lb_address(i);
            let port = format!("p-lb{i}");
            plug(&front, &ns, &port, a, a6)?;
            ns.sysctl("net.ipv4.ip_forward", "0")?;
            ns.sysctl("net.ipv6.conf.all.forwarding", "0")?;
            // veth drops what XDP_TX sends unless the peer runs XDP.
            peer_pass.push(front.enter(move || attach_pass(&port))??);
            lb_nets.push(ns);
        }

        let mut backends = Vec::new();
        let mut servers = Vec::new();
        for (i, name) in backend_names.iter().enumerate() {
            let ns = backend(name, &front, backend_address(i), backend_address6(i), false)?;
            ns.ip(&["route", "add", "10.66.0.0/24", "via", &ROUTER.to_string()])?;
            ns.ip(&[
                "-6",
                "route",
                "add",
                "fd00:66::/64",
                "via",
                &ROUTER6.to_string(),
            ])?;
            servers.push(Server::start(&ns, name)?);
            backends.push(ns);
        }

        let frr = Frr::start(&router, &bgpd_conf(lbs))?;
        Ok(Anycast {
            servers,
            frr,
            _peer_pass: peer_pass,
            client,
            router,
            lbs: lb_nets,
            backends,
            _switch: front,
        })
    }

    /// Starts `lb run` on load balancer `i` with `config` (not waited for).
    pub fn start_lb(&self, i: usize, config: &str) -> anyhow::Result<LbProcess> {
        LbProcess::start(&self.lbs[i], config)
    }

    /// Opens or closes backend `i`'s health port (TCP 8080).
    pub fn set_health(&mut self, i: usize, on: bool) -> anyhow::Result<()> {
        self.servers[i].set_health(&self.backends[i], on)
    }

    /// The router's kernel next hops for `vip` (empty: no route).
    pub fn next_hops(&self, vip: IpAddr) -> anyhow::Result<Vec<IpAddr>> {
        let (family, prefix) = match vip {
            IpAddr::V4(a) => ("-4", format!("{a}/32")),
            IpAddr::V6(a) => ("-6", format!("{a}/128")),
        };
        let out = self.router.ip(&[family, "route", "show", &prefix])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        Ok(words
            .windows(2)
            .filter(|w| w[0] == "via")
            .filter_map(|w| w[1].parse().ok())
            .collect())
    }
}

/// The router's bgpd: eBGP to every load balancer, IPv4 routes over the
/// IPv4 sessions and IPv6 over the IPv6 ones, timers 1 s / 3 s, multipath
/// (on by default), no policy needed.
fn bgpd_conf(lbs: usize) -> String {
    let peers: Vec<(IpAddr, IpAddr)> = (0..lbs)
        .map(|i| {
            let (a, a6) = lb_address(i);
            (a.into(), a6.into())
        })
        .collect();
    let mut c = format!(
        "router bgp {ROUTER_AS}\n bgp router-id {ROUTER}\n no bgp ebgp-requires-policy\n \
         no bgp default ipv4-unicast\n timers bgp 1 3\n"
    );
    for (a, a6) in &peers {
        for p in [a, a6] {
            c += &format!(" neighbor {p} remote-as {LB_AS}\n neighbor {p} timers connect 1\n");
        }
    }
    c += " address-family ipv4 unicast\n";
    for (a, _) in &peers {
        c += &format!("  neighbor {a} activate\n");
    }
    c += " exit-address-family\n address-family ipv6 unicast\n";
    for (_, a6) in &peers {
        c += &format!("  neighbor {a6} activate\n");
    }
    c += " exit-address-family\n";
    c
}
