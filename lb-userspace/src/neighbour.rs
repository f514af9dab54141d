//! Backend MAC addresses from the kernel's neighbour table (rtnetlink).
//!
//! The XDP program never resolves anything itself: it reads the MAC that
//! userspace copied into the backend's map entry. Here we read the neighbour
//! table and, for backends whose entry is missing or no longer confirmed,
//! provoke the kernel into (re)resolving it by sending one empty UDP datagram
//! to the backend's discard port; the kernel's own ARP (IPv4) or neighbour
//! discovery (IPv6) state machine does the rest, and the next refresh picks
//! up the answer.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use futures::TryStreamExt as _;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::{
    link::LinkAttribute,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMetric},
};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::{
    config::{Config, Forwarding},
    model::{Neighbour, Neighbours},
};

/// The RFC 863 discard port: a datagram there is harmless (at most an ICMP
/// port-unreachable comes back) and is enough to trigger ARP or NDP.
const DISCARD_PORT: u16 = 9;

#[derive(Debug, thiserror::Error)]
pub enum NeighbourError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
}

pub struct NeighbourTable {
    handle: Handle,
}

/// What the neighbour table says about one next hop.
enum Entry {
    /// MAC known, and confirmed lately or being re-confirmed by the kernel.
    Current(Hop),
    /// MAC known but not confirmed lately: usable, worth provoking a probe.
    Stale(Hop),
}

impl NeighbourTable {
    /// Opens a netlink socket; the connection task runs on the current runtime.
    pub fn connect() -> Result<Self, NeighbourError> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// MAC, MTU and name of every interface with a MAC, by index.
    async fn links(&self) -> Result<BTreeMap<u32, Link>, NeighbourError> {
        let mut links = self.handle.link().get().execute();
        let mut found = BTreeMap::new();
        while let Some(link) = links.try_next().await? {
            let mut mac = None;
            let mut mtu = 0;
            let mut name = String::new();
            for attr in &link.attributes {
                match attr {
                    LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                    LinkAttribute::Mtu(m) => mtu = *m,
                    LinkAttribute::IfName(n) => name.clone_from(n),
                    _ => {}
                }
            }
            if let Some(mac) = mac {
                found.insert(link.header.index, Link { mac, mtu, name });
            }
        }
        Ok(found)
    }

    /// The kernel's route to `dst` (RTM_GETROUTE): the next hop, the egress
    /// interface and the preferred source. `None` when there is no route.
    async fn route(&self, dst: IpAddr) -> Option<Route> {
        let request = match dst {
            IpAddr::V4(d) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d, 32)
                .build(),
            IpAddr::V6(d) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d, 128)
                .build(),
        };
        let mut answers = self.handle.route().get(request).execute();
        let msg = answers.try_next().await.ok()??;
        let mut route = Route {
            via: dst,
            oif: 0,
            src: None,
            mtu: None,
        };
        for attr in msg.attributes {
            match attr {
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => route.via = g.into(),
                RouteAttribute::Gateway(RouteAddress::Inet6(g)) => route.via = g.into(),
                RouteAttribute::Oif(i) => route.oif = i,
                RouteAttribute::PrefSource(RouteAddress::Inet(s)) => route.src = Some(s.into()),
                RouteAttribute::PrefSource(RouteAddress::Inet6(s)) => route.src = Some(s.into()),
                // The route's own `mtu` (or a path MTU the kernel learned).
                RouteAttribute::Metrics(metrics) => {
                    for m in metrics {
                        if let RouteMetric::Mtu(mtu) = m {
                            route.mtu = Some(mtu);
                        }
                    }
                }
                _ => {}
            }
        }
        (route.oif != 0).then_some(route)
    }

    /// The neighbour entries of the addresses in `wanted`, keyed by address
    /// and interface (an IPv6 link-local next hop is only unique per link).
    async fn entries(
        &self,
        wanted: &[IpAddr],
    ) -> Result<BTreeMap<(IpAddr, u32), Entry>, NeighbourError> {
        let mut found = BTreeMap::new();
        // Looked up once per neighbour entry: thousands of backends.
        let wanted: BTreeSet<IpAddr> = wanted.iter().copied().collect();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            self.dump(family, &wanted, &mut found).await?;
        }
        Ok(found)
    }

    async fn dump(
        &self,
        family: AddressFamily,
        wanted: &BTreeSet<IpAddr>,
        found: &mut BTreeMap<(IpAddr, u32), Entry>,
    ) -> Result<(), NeighbourError> {
        let mut dump = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute();
        while let Some(msg) = dump.try_next().await? {
            let mut dst = None;
            let mut lladdr = None;
            for attr in &msg.attributes {
                match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                        dst = Some(IpAddr::from(*a))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                        dst = Some(IpAddr::from(*a))
                    }
                    NeighbourAttribute::LinkLayerAddress(l) => {
                        lladdr = <[u8; 6]>::try_from(l.as_slice()).ok()
                    }
                    _ => {}
                }
            }
            let (Some(dst), Some(mac)) = (dst, lladdr) else {
                continue;
            };
            if !wanted.contains(&dst) {
                continue;
            }
            let hop = Hop {
                ifindex: msg.header.ifindex,
                mac,
            };
            let entry = match msg.header.state {
                NeighbourState::Reachable
                | NeighbourState::Permanent
                | NeighbourState::Noarp
                | NeighbourState::Delay
                | NeighbourState::Probe => Entry::Current(hop),
                NeighbourState::Stale => Entry::Stale(hop),
                _ => continue,
            };
            found.insert((dst, hop.ifindex), entry);
        }
        Ok(())
    }

    /// Reads how to reach every backend in `wanted` and provokes resolution
    /// of MACs that are missing or stale (in DELAY or PROBE the kernel is
    /// already checking). Direct backends need their own MAC; routed ones the
    /// MAC of the next hop on their route. Returns every usable entry, keyed
    /// by backend address.
    pub async fn refresh(&self, wanted: &Wanted) -> Result<Neighbours, NeighbourError> {
        let links = self.links().await?;
        let mut routes = BTreeMap::new();
        for &b in &wanted.routed {
            if let Some(r) = self.route(b).await {
                routes.insert(b, r);
            }
        }
        let hops: Vec<IpAddr> = wanted
            .direct
            .iter()
            .copied()
            .chain(routes.values().map(|r| r.via))
            .collect();
        let entries = self.entries(&hops).await?;
        let mut usable = Neighbours::new();
        let direct = wanted.direct.iter().map(|&b| {
            (
                b,
                Route {
                    via: b,
                    oif: 0,
                    src: None,
                    mtu: None,
                },
            )
        });
        let routed = routes.iter().map(|(&b, &r)| (b, r));
        for (backend, route) in direct.chain(routed) {
            // A routed backend's next hop must sit on the route's interface;
            // a direct backend is wherever the kernel found it.
            let entry = if route.oif != 0 {
                entries.get(&(route.via, route.oif))
            } else {
                entries
                    .range((route.via, 0)..=(route.via, u32::MAX))
                    .next()
                    .map(|(_, e)| e)
            };
            let (hop, stale) = match entry {
                Some(Entry::Current(h)) => (*h, false),
                Some(Entry::Stale(h)) => (*h, true),
                None => {
                    provoke(backend);
                    continue;
                }
            };
            if stale {
                provoke(backend);
            }
            // The interface the frame leaves by is the neighbour's; for a
            // routed backend it is also the route's.
            let Some(link) = links.get(&hop.ifindex) else {
                continue;
            };
            usable.insert(
                backend,
                Neighbour {
                    ifindex: hop.ifindex,
                    mac: hop.mac,
                    src_mac: link.mac,
                    src_addr: route.src,
                    mtu: egress_mtu(link, backend, route.mtu),
                },
            );
        }
        for b in wanted.routed.iter().filter(|b| !routes.contains_key(b)) {
            tracing::debug!(backend = %b, "no route");
        }
        Ok(usable)
    }

    /// Refreshes until every backend in `wanted` is reachable or `patience`
    /// runs out; returns what it has. Used at start-up so the first packets
    /// do not meet unresolved backends.
    pub async fn resolve(
        &self,
        wanted: &Wanted,
        patience: Duration,
    ) -> Result<Neighbours, NeighbourError> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let found = self.refresh(wanted).await?;
            if found.len() == wanted.len() || tokio::time::Instant::now() >= deadline {
                return Ok(found);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The backends to resolve: `direct` ones share a segment with us (`l2`),
/// `routed` ones are reached through their route's next hop (`ipip`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    pub direct: Vec<IpAddr>,
    pub routed: Vec<IpAddr>,
}

impl Wanted {
    pub fn len(&self) -> usize {
        self.direct.len() + self.routed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn all(&self) -> impl Iterator<Item = &IpAddr> {
        self.direct.iter().chain(&self.routed)
    }

    /// The backends of `config`, by how they are reached.
    pub fn of(config: &Config) -> Wanted {
        let mut w = Wanted::default();
        for v in &config.vips {
            let list = match v.forwarding {
                Forwarding::L2 => &mut w.direct,
                Forwarding::Ipip => &mut w.routed,
            };
            list.extend(v.backends.iter().map(|b| b.address));
        }
        for list in [&mut w.direct, &mut w.routed] {
            list.sort();
            list.dedup();
        }
        w
    }
}

/// Logs the backends whose MAC was resolved, changed or lost.
pub fn log_changes(old: &Neighbours, new: &Neighbours) {
    for (addr, n) in new {
        if old.get(addr) != Some(n) {
            tracing::info!(backend = %addr, mac = %mac(&n.mac), ifindex = n.ifindex, "backend MAC resolved");
        }
    }
    for addr in old.keys().filter(|a| !new.contains_key(a)) {
        tracing::warn!(backend = %addr, "backend MAC lost");
    }
}

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[derive(Clone, Copy, Debug)]
struct Route {
    via: IpAddr,
    oif: u32,
    src: Option<IpAddr>,
    /// The route's MTU metric, if it has one.
    mtu: Option<u32>,
}

struct Link {
    mac: [u8; 6],
    mtu: u32,
    name: String,
}

/// The largest packet that may leave `link` towards `backend`: the link's
/// MTU, lowered by the interface's IPv6 MTU for an IPv6 backend (router
/// advertisements lower it without touching the link) and by the route's
/// MTU metric. 0 when unknown.
fn egress_mtu(link: &Link, backend: IpAddr, route_mtu: Option<u32>) -> u32 {
    let ipv6_mtu = backend
        .is_ipv6()
        .then(|| std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{}/mtu", link.name)))
        .and_then(Result::ok)
        .and_then(|s| s.trim().parse::<u32>().ok());
    [Some(link.mtu), ipv6_mtu, route_mtu]
        .into_iter()
        .flatten()
        .filter(|&m| m != 0)
        .min()
        .unwrap_or(0)
}

#[derive(Clone, Copy, Debug)]
struct Hop {
    ifindex: u32,
    mac: [u8; 6],
}

/// Makes the kernel resolve (or re-confirm) `addr` by sending it an empty
/// datagram. Failures only mean the next refresh tries again.
fn provoke(addr: IpAddr) {
    let any: IpAddr = match addr {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let sent = UdpSocket::bind(SocketAddr::new(any, 0))
        .and_then(|s| s.send_to(&[], SocketAddr::new(addr, DISCARD_PORT)));
    if let Err(e) = sent {
        tracing::debug!(%addr, error = %e, "could not provoke neighbour resolution");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_egress_mtu_is_the_smallest_of_link_ipv6_device_and_route() {
        let link = |mtu: u32, name: &str| Link {
            mac: [2; 6],
            mtu,
            name: name.into(),
        };
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(egress_mtu(&link(1500, "nonexistent0"), v4, None), 1500);
        assert_eq!(
            egress_mtu(&link(1500, "nonexistent0"), v6, Some(1400)),
            1400
        );
        assert_eq!(egress_mtu(&link(0, "nonexistent0"), v4, None), 0, "unknown");
        // lo's IPv6 MTU is its link MTU (65536) unless someone lowered it.
        let lo_v6: u32 = std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/mtu")
            .map_or(u32::MAX, |s| s.trim().parse().unwrap());
        assert_eq!(
            egress_mtu(&link(u32::MAX, "lo"), v6, None),
            lo_v6,
            "an IPv6 backend honours the interface's IPv6 MTU"
        );
        assert_eq!(egress_mtu(&link(u32::MAX, "lo"), v4, None), u32::MAX);
    }
}
