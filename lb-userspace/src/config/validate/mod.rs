//! Raw settings to the model, by scope: [`global`] settings, each VIP
//! ([`vip`], with its [`health_check`]) and each of its backends
//! ([`backend`]). Every problem is collected, named by its field's path in
//! the file (`vips[1].backends[0].weight`), so one run reports them all.

mod backend;
mod bgp;
mod global;
mod health_check;
mod vip;

use std::{net::IpAddr, time::Duration};

pub use backend::WEIGHT_MAX;
pub use global::{FLOW_TABLE_SIZE_MAX, FLOW_TABLE_SIZE_MIN, TABLE_SIZE_MAX, TABLE_SIZE_MIN};

use super::{
    errors::{Problem, Problems},
    model::Config,
    raw::RawConfig,
};

pub(super) fn validate(raw: RawConfig) -> Result<Config, Vec<Problem>> {
    let mut p = Problems::default();
    let global = global::validate(&mut p, &raw);
    let bgp = bgp::validate(&mut p, raw.bgp.as_ref());
    let vips = vip::validate_all(&mut p, raw.vips);
    match (global, bgp) {
        (Some(global), Some(bgp)) if p.is_empty() => Ok(global.with(bgp, vips)),
        _ => Err(p.into_vec()),
    }
}

fn parse_duration(p: &mut Problems, field: &str, text: &str) -> Option<Duration> {
    match humantime::parse_duration(text) {
        Ok(d) => Some(d),
        Err(e) => {
            p.add(
                field,
                format!("`{text}` is not a duration like 2s or 500ms: {e}"),
            );
            None
        }
    }
}

fn parse_port(p: &mut Problems, field: &str, n: i64) -> Option<u16> {
    match u16::try_from(n) {
        Ok(port) if port != 0 => Some(port),
        _ => {
            p.add(field, format!("{n} is not a port (1..=65535)"));
            None
        }
    }
}

fn parse_ip(p: &mut Problems, field: &str, text: &str) -> Option<IpAddr> {
    match text.parse::<IpAddr>() {
        // The maps hold IPv4 addresses IPv4-mapped: such an IPv6 address
        // would be the IPv4 one there, while packets carry it as IPv6.
        Ok(IpAddr::V6(a)) if a.to_ipv4_mapped().is_some() => {
            p.add(
                field,
                format!("`{text}` is an IPv4-mapped IPv6 address; write the IPv4 address"),
            );
            None
        }
        Ok(a) => match unusable(a) {
            Some(why) => {
                p.add(field, format!("`{text}` is {why}"));
                None
            }
            None => Some(a),
        },
        Err(_) => {
            p.add(field, format!("`{text}` is not an IP address"));
            None
        }
    }
}

/// Why `a` cannot be a VIP, backend or tunnel source address: the load
/// balancer neither sends to nor answers from these, and an IPv6 link-local
/// address would need a zone (interface) the config has no place for.
fn unusable(a: IpAddr) -> Option<&'static str> {
    match a {
        a if a.is_unspecified() => Some("the unspecified address"),
        a if a.is_loopback() => Some("a loopback address"),
        a if a.is_multicast() => Some("a multicast address"),
        IpAddr::V4(a) if a.is_broadcast() => Some("the broadcast address"),
        IpAddr::V6(a) if a.is_unicast_link_local() => {
            Some("a link-local address (it needs an interface zone)")
        }
        _ => None,
    }
}

pub(super) fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = n as u64;
    (2..)
        .take_while(|d| d * d <= n)
        .all(|d| !n.is_multiple_of(d))
}
