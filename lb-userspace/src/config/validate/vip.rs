//! Each VIP: its name, address and port (unique across VIPs), its health
//! check and backends, and what `ipip` forwarding needs of its families.

use lb_common::VipKey;
use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
};

use super::{backend, health_check, parse_ip, parse_port};
use crate::config::{
    errors::Problems,
    model::{Backend, Forwarding, Protocol, Vip},
    raw::RawVip,
};

/// What VIPs must not share, and the backends counted so far.
#[derive(Default)]
struct Seen {
    names: HashSet<String>,
    keys: HashSet<(IpAddr, u16, Protocol)>,
    backends: usize,
}

pub(super) fn validate_all(p: &mut Problems, raw: Vec<RawVip>) -> Vec<Vip> {
    let mut seen = Seen::default();
    let vips = raw
        .into_iter()
        .enumerate()
        .filter_map(|(i, v)| validate_one(p, &mut seen, &format!("vips[{i}]"), v))
        .collect();
    if seen.backends > lb_common::MAX_BACKENDS as usize {
        p.add(
            "vips",
            format!(
                "{} backends in all exceed the limit of {}",
                seen.backends,
                lb_common::MAX_BACKENDS
            ),
        );
    }
    vips
}

/// `at` is the VIP's place in the file, `vips[i]`.
fn validate_one(p: &mut Problems, seen: &mut Seen, at: &str, v: RawVip) -> Option<Vip> {
    if v.name.is_empty() {
        p.add(format!("{at}.name"), "must not be empty");
    } else if !seen.names.insert(v.name.clone()) {
        p.add(
            format!("{at}.name"),
            format!("duplicate VIP name `{}`", v.name),
        );
    }
    let address = parse_ip(p, &format!("{at}.address"), &v.address);
    let port = parse_port(p, &format!("{at}.port"), v.port);
    if let (Some(a), Some(port)) = (address, port)
        && !seen.keys.insert((a, port, v.protocol))
    {
        p.add(
            at,
            format!("duplicate VIP {}/{}", SocketAddr::new(a, port), v.protocol),
        );
    }

    let health_check =
        health_check::validate(p, &format!("{at}.health_check"), v.health_check, port);
    let backends = backend::validate_all(p, at, v.backends);
    seen.backends += backends.len();
    let encap_source = match (v.encap_source, v.forwarding) {
        (None, _) => None,
        (Some(_), Forwarding::L2) => {
            p.add(
                format!("{at}.encap_source"),
                "only applies to forwarding: ipip",
            );
            None
        }
        (Some(text), Forwarding::Ipip) => parse_ip(p, &format!("{at}.encap_source"), &text),
    };
    if v.forwarding == Forwarding::Ipip {
        check_tunnel_families(p, at, address, encap_source, &backends);
    }
    if v.icmp_too_big.is_some() && v.forwarding == Forwarding::L2 {
        p.add(
            format!("{at}.icmp_too_big"),
            "only applies to forwarding: ipip",
        );
    }
    let (address, port) = (address?, port?);
    Some(Vip {
        name: v.name,
        key: VipKey::new(address, port, v.protocol.number()),
        address,
        port,
        protocol: v.protocol,
        forwarding: v.forwarding,
        encap_source,
        icmp_too_big: v.icmp_too_big.unwrap_or(true),
        health_check: health_check?,
        on_all_down: v.on_all_down,
        announce: v.announce,
        backends: backends.into_iter().map(|(_, b)| b).collect(),
    })
}

/// The encapsulations `ipip` supports: IPIP (IPv4 in IPv4), IP6IP6 and
/// IPv4-in-IPv6. One VIP has one outer family, so its backends and its
/// `encap_source` must all be of it. `backends` come with their index in
/// the file.
fn check_tunnel_families(
    p: &mut Problems,
    at: &str,
    vip: Option<IpAddr>,
    encap_source: Option<IpAddr>,
    backends: &[(usize, Backend)],
) {
    let Some((first, first_backend)) = backends.first() else {
        return;
    };
    let outer_v6 = first_backend.address.is_ipv6();
    let family = |v6: bool| if v6 { "IPv6" } else { "IPv4" };
    for (j, b) in backends {
        if b.address.is_ipv6() != outer_v6 {
            p.add(
                format!("{at}.backends[{j}].address"),
                format!(
                    "is {} but backends[{first}] is {}: the backends of an ipip VIP share one family",
                    family(!outer_v6),
                    family(outer_v6)
                ),
            );
        }
    }
    if vip.is_some_and(|v| v.is_ipv6()) && !outer_v6 {
        p.add(
            format!("{at}.backends"),
            "an IPv6 VIP needs IPv6 backends with forwarding: ipip (IPv6 in IPv4 is not supported)",
        );
    }
    if let Some(src) = encap_source
        && src.is_ipv6() != outer_v6
    {
        p.add(
            format!("{at}.encap_source"),
            format!(
                "is {} but the backends are {}: the outer header is of the backends' family",
                family(src.is_ipv6()),
                family(outer_v6)
            ),
        );
    }
}
