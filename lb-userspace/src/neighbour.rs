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
};
use rtnetlink::Handle;

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

/// What is known about one backend after a refresh.
enum Entry {
    /// MAC known, and confirmed lately or being re-confirmed by the kernel.
    Current(Neighbour),
    /// MAC known but not confirmed lately: usable, worth provoking a probe.
    Stale(Neighbour),
}

impl NeighbourTable {
    /// Opens a netlink socket; the connection task runs on the current runtime.
    pub fn connect() -> Result<Self, NeighbourError> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    async fn link_macs(&self) -> Result<BTreeMap<u32, [u8; 6]>, NeighbourError> {
        let mut links = self.handle.link().get().execute();
        let mut macs = BTreeMap::new();
        while let Some(link) = links.try_next().await? {
            for attr in &link.attributes {
                if let LinkAttribute::Address(a) = attr
                    && let Ok(mac) = <[u8; 6]>::try_from(a.as_slice())
                {
                    macs.insert(link.header.index, mac);
                }
            }
        }
        Ok(macs)
    }

    async fn entries(
        &self,
        wanted: &[Ipv4Addr],
    ) -> Result<BTreeMap<Ipv4Addr, Entry>, NeighbourError> {
        let macs = self.link_macs().await?;
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
            let Some(&src_mac) = macs.get(&msg.header.ifindex) else {
                continue;
            };
            let n = Neighbour {
                ifindex: msg.header.ifindex,
                mac,
                src_mac,
            };
            let entry = match msg.header.state {
                NeighbourState::Reachable
                | NeighbourState::Permanent
                | NeighbourState::Noarp
                | NeighbourState::Delay
                | NeighbourState::Probe => Entry::Current(n),
                NeighbourState::Stale => Entry::Stale(n),
                _ => continue,
            };
            found.insert(dst, entry);
        }
        Ok(found)
    }

    /// Reads the MACs of `wanted` and provokes resolution of those that are
    /// missing or stale (in DELAY or PROBE the kernel is already checking).
    /// Returns every usable MAC.
    pub async fn refresh(&self, wanted: &[Ipv4Addr]) -> Result<Neighbours, NeighbourError> {
        let entries = self.entries(wanted).await?;
        let mut usable = Neighbours::new();
        for &addr in wanted {
            match entries.get(&addr) {
                Some(Entry::Current(n)) => {
                    usable.insert(addr, *n);
                }
                Some(Entry::Stale(n)) => {
                    usable.insert(addr, *n);
                    provoke(addr);
                }
                None => provoke(addr),
            }
        }
        Ok(usable)
    }

    /// Refreshes until every address in `wanted` has a MAC or `patience` runs
    /// out; returns what it has. Used at start-up so the first packets do not
    /// meet unresolved backends.
    pub async fn resolve(
        &self,
        wanted: &[Ipv4Addr],
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

/// Makes the kernel resolve (or re-confirm) `addr` by sending it an empty
/// datagram. Failures only mean the next refresh tries again.
fn provoke(addr: Ipv4Addr) {
    let sent = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|s| s.send_to(&[], SocketAddrV4::new(addr, DISCARD_PORT)));
    if let Err(e) = sent {
        tracing::debug!(%addr, error = %e, "could not provoke neighbour resolution");
    }
}
