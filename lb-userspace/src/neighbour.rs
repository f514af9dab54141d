//! Backend MAC addresses from the kernel's neighbour table (rtnetlink).
//!
//! The XDP program never resolves anything itself: it reads the MAC that
//! userspace copied into the backend's map entry. Here we read the neighbour
//! table and, for backends whose entry is missing or no longer confirmed,
//! provoke the kernel into (re)resolving it by sending one empty UDP datagram
//! to the backend's discard port; the kernel's own ARP state machine does the
//! rest, and the next refresh picks up the answer.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use futures::TryStreamExt as _;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::{
    link::LinkAttribute,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
    route::{RouteAddress, RouteAttribute},
};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::reconcile::{Neighbour, Neighbours};

/// The RFC 863 discard port: a datagram there is harmless (at most an ICMP
/// port-unreachable comes back) and is enough to trigger ARP.
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

    /// MAC (if any) and MTU of every interface, by index.
    async fn links(&self) -> Result<BTreeMap<u32, ([u8; 6], u32)>, NeighbourError> {
        let mut links = self.handle.link().get().execute();
        let mut found = BTreeMap::new();
        while let Some(link) = links.try_next().await? {
            let mut mac = None;
            let mut mtu = 0;
            for attr in &link.attributes {
                match attr {
                    LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                    LinkAttribute::Mtu(m) => mtu = *m,
                    _ => {}
                }
            }
            if let Some(mac) = mac {
                found.insert(link.header.index, (mac, mtu));
            }
        }
        Ok(found)
    }

    /// The kernel's route to `dst` (RTM_GETROUTE): the next hop, the egress
    /// interface and the preferred source. `None` when there is no route.
    async fn route(&self, dst: Ipv4Addr) -> Option<Route> {
        let request = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .build();
        let mut answers = self.handle.route().get(request).execute();
        let msg = answers.try_next().await.ok()??;
        let mut route = Route {
            via: dst,
            oif: 0,
            src: None,
        };
        for attr in msg.attributes {
            match attr {
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => route.via = g,
                RouteAttribute::Oif(i) => route.oif = i,
                RouteAttribute::PrefSource(RouteAddress::Inet(s)) => route.src = Some(s),
                _ => {}
            }
        }
        (route.oif != 0).then_some(route)
    }

    async fn entries(
        &self,
        wanted: &[Ipv4Addr],
    ) -> Result<BTreeMap<Ipv4Addr, Entry>, NeighbourError> {
        let mut dump = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute();
        let mut found = BTreeMap::new();
        while let Some(msg) = dump.try_next().await? {
            let mut dst = None;
            let mut lladdr = None;
            for attr in &msg.attributes {
                match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => dst = Some(*a),
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
            found.insert(dst, entry);
        }
        Ok(found)
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
        let hops: Vec<Ipv4Addr> = wanted
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
                },
            )
        });
        let routed = routes.iter().map(|(&b, &r)| (b, r));
        for (backend, route) in direct.chain(routed) {
            let (hop, stale) = match entries.get(&route.via) {
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
            let Some(&(src_mac, mtu)) = links.get(&hop.ifindex) else {
                continue;
            };
            usable.insert(
                backend,
                Neighbour {
                    ifindex: hop.ifindex,
                    mac: hop.mac,
                    src_mac,
                    src_addr: route.src,
                    mtu,
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
    pub direct: Vec<Ipv4Addr>,
    pub routed: Vec<Ipv4Addr>,
}

impl Wanted {
    pub fn len(&self) -> usize {
        self.direct.len() + self.routed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn all(&self) -> impl Iterator<Item = &Ipv4Addr> {
        self.direct.iter().chain(&self.routed)
    }
}

#[derive(Clone, Copy, Debug)]
struct Route {
    via: Ipv4Addr,
    oif: u32,
    src: Option<Ipv4Addr>,
}

#[derive(Clone, Copy, Debug)]
struct Hop {
    ifindex: u32,
    mac: [u8; 6],
}

/// Makes the kernel resolve (or re-confirm) `addr` by sending it an empty
/// datagram. Failures only mean the next refresh tries again.
fn provoke(addr: Ipv4Addr) {
    let sent = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|s| s.send_to(&[], SocketAddrV4::new(addr, DISCARD_PORT)));
    if let Err(e) = sent {
        tracing::debug!(%addr, error = %e, "could not provoke neighbour resolution");
    }
}
