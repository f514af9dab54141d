//! The facts about the world the control plane reacts to, shared by the
//! modules that learn them (health checks, neighbour resolution), the one that
//! turns them into map contents (reconcile) and the one that reports them
//! (status).

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::VipKey;

/// How a backend is reached, as learned from the kernel's routes and
/// neighbour table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    /// The backend's MAC (`l2`), or the next hop's towards it (`ipip`).
    pub mac: [u8; 6],
    /// The MAC of the interface `ifindex`.
    pub src_mac: [u8; 6],
    /// The route's preferred source address (the default outer source).
    pub src_addr: Option<IpAddr>,
    /// MTU of the interface `ifindex` (0 if unknown).
    pub mtu: u32,
}

/// How each backend address is reached; an address not listed is unresolved.
pub type Neighbours = BTreeMap<IpAddr, Neighbour>;

/// Health of each (VIP, backend); a backend not listed counts as up.
pub type Health = BTreeMap<(VipKey, IpAddr), bool>;

/// Whether `health` counts backend `addr` of VIP `vip` as up.
pub fn is_up(health: &Health, vip: VipKey, addr: IpAddr) -> bool {
    health.get(&(vip, addr)).copied().unwrap_or(true)
}
