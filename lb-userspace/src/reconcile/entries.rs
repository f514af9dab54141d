//! The `BACKENDS` entries the reconciler writes, built from the config, the
//! plan, health and the neighbour table.

use std::net::IpAddr;

use lb_common::{
    BACKEND_F_HEALTHY, BACKEND_F_ICMP_TOO_BIG, BACKEND_F_KEEP_FLOWS, BACKEND_F_RESOLVED,
    BackendEntry, FORWARD_IP6, FORWARD_IPIP, FORWARD_L2, addr_key,
};

use crate::{
    config::{Forwarding, Vip},
    model::Neighbour,
};

/// `vip_id` of a backend entry whose id is free.
pub const NO_VIP: u32 = u32::MAX;

/// What one backend entry says, apart from what the config gives.
pub struct BackendFacts<'a> {
    pub vip_id: u32,
    pub generation: u32,
    pub neighbour: Option<&'a Neighbour>,
    /// The plan lets its established flows stay.
    pub keep_flows: bool,
    pub healthy: bool,
}

/// The entry of backend `addr` of `vip`.
pub fn backend_entry(vip: &Vip, addr: IpAddr, facts: BackendFacts) -> BackendEntry {
    // The outer header is of the backend's family (config validation keeps
    // IPv6 VIPs off IPv4 backends).
    let forwarding = match (vip.forwarding, addr) {
        (Forwarding::L2, _) => FORWARD_L2,
        (Forwarding::Ipip, IpAddr::V4(_)) => FORWARD_IPIP,
        (Forwarding::Ipip, IpAddr::V6(_)) => FORWARD_IP6,
    };
    let mut entry = BackendEntry {
        addr: addr_key(addr),
        vip_id: facts.vip_id,
        forwarding,
        ..placeholder(facts.generation)
    };
    if let Some(n) = facts.neighbour {
        entry.dst_mac = n.mac;
        entry.src_mac = n.src_mac;
        entry.ifindex = n.ifindex;
        entry.mtu = n.mtu;
        // An IPIP backend is usable only with an outer source address.
        let src = vip.encap_source.or(n.src_addr);
        if let Some(src) = src {
            entry.encap_src = addr_key(src);
        }
        if vip.forwarding == Forwarding::L2 || src.is_some() {
            entry.flags |= BACKEND_F_RESOLVED;
        }
        if vip.forwarding == Forwarding::Ipip && vip.icmp_too_big {
            entry.flags |= BACKEND_F_ICMP_TOO_BIG;
        }
    }
    if facts.keep_flows {
        entry.flags |= BACKEND_F_KEEP_FLOWS;
    }
    if facts.healthy {
        entry.flags |= BACKEND_F_HEALTHY;
    }
    entry
}

/// What a newly handed-out id holds first: its generation and nothing else.
/// The program copies entries without locks, so a packet could otherwise
/// combine the old generation with the new flags and keep a dead backend's
/// flow.
pub fn placeholder(generation: u32) -> BackendEntry {
    BackendEntry {
        addr: [0; 16],
        dst_mac: [0; 6],
        src_mac: [0; 6],
        ifindex: 0,
        flags: 0,
        vip_id: NO_VIP,
        forwarding: 0,
        encap_src: [0; 16],
        mtu: 0,
        generation,
    }
}

/// `entry` once its backend is removed: it keeps no flow (a flow that still
/// names it is re-placed) and belongs to no VIP.
pub fn released(entry: BackendEntry) -> BackendEntry {
    BackendEntry {
        flags: 0,
        vip_id: NO_VIP,
        ..entry
    }
}
