//! The routes `lb bgp-feed` wants announced, and ExaBGP's text API for
//! them: `announce route PREFIX next-hop NH origin igp med N [community
//! [..]]` and `withdraw route PREFIX next-hop NH`, one line per route.

use std::{collections::BTreeMap, net::IpAddr};

use crate::status::Status;

/// RFC 8326: routers that honour it move traffic away from a path carrying
/// it (lowest preference), keeping the path only as a backup.
pub const GRACEFUL_SHUTDOWN: &str = "65535:0";

/// One host route (a /32 or /128) with the attributes it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub prefix: IpAddr,
    pub next_hop: String,
    pub med: u32,
    pub communities: Vec<String>,
}

impl Route {
    pub fn announce(&self) -> String {
        let mut line = format!(
            "announce route {} next-hop {} origin igp med {}",
            host_prefix(self.prefix),
            self.next_hop,
            self.med
        );
        if !self.communities.is_empty() {
            line += &format!(" community [{}]", self.communities.join(" "));
        }
        line
    }

    pub fn withdraw(&self) -> String {
        format!(
            "withdraw route {} next-hop {}",
            host_prefix(self.prefix),
            self.next_hop
        )
    }
}

fn host_prefix(a: IpAddr) -> String {
    match a {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

/// The routes `status` asks for, by address. Several VIPs (ports) may share
/// an address: its route is announced while any of them is.
pub fn wanted(status: &Status) -> BTreeMap<IpAddr, Route> {
    let Some(bgp) = &status.bgp else {
        return BTreeMap::new();
    };
    let mut routes = BTreeMap::new();
    for v in status.vips.iter().filter(|v| v.bgp.announced) {
        let Some(prefix) = vip_address(&v.vip) else {
            continue;
        };
        let mut communities = bgp.settings.communities.clone();
        if v.bgp.graceful_shutdown {
            communities.push(GRACEFUL_SHUTDOWN.into());
        }
        // `next_hop` as an address applies to the VIPs of its family.
        let next_hop = match bgp.settings.next_hop.parse::<IpAddr>() {
            Ok(a) if a.is_ipv4() == prefix.is_ipv4() => a.to_string(),
            _ => "self".to_string(),
        };
        routes.entry(prefix).or_insert(Route {
            prefix,
            next_hop,
            med: bgp.settings.med,
            communities,
        });
    }
    routes
}

/// Every VIP address in `status`, announced or not.
pub fn addresses(status: &Status) -> Vec<IpAddr> {
    status
        .vips
        .iter()
        .filter_map(|v| vip_address(&v.vip))
        .collect()
}

/// `/status` shows a VIP as `address:port` (`[v6]:port`).
fn vip_address(vip: &str) -> Option<IpAddr> {
    vip.parse::<std::net::SocketAddr>().ok().map(|s| s.ip())
}

/// The lines that turn `sent` into `wanted`: withdrawals first, then
/// announcements of new routes and of routes whose attributes changed (a
/// new announcement replaces the old one).
pub fn changes(sent: &BTreeMap<IpAddr, Route>, wanted: &BTreeMap<IpAddr, Route>) -> Vec<String> {
    let withdraw = sent
        .iter()
        .filter(|(a, _)| !wanted.contains_key(a))
        .map(|(_, r)| r.withdraw());
    let announce = wanted
        .iter()
        .filter(|(a, r)| sent.get(a) != Some(r))
        .map(|(_, r)| r.announce());
    withdraw.chain(announce).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, communities: &[&str]) -> Route {
        Route {
            prefix: prefix.parse().unwrap(),
            next_hop: "self".into(),
            med: 100,
            communities: communities.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn lines_follow_exabgp_syntax() {
        assert_eq!(
            route("10.77.0.100", &[]).announce(),
            "announce route 10.77.0.100/32 next-hop self origin igp med 100"
        );
        assert_eq!(
            route("fd00:77::100", &["65000:80", GRACEFUL_SHUTDOWN]).announce(),
            "announce route fd00:77::100/128 next-hop self origin igp med 100 community [65000:80 65535:0]"
        );
        assert_eq!(
            route("fd00:77::100", &[]).withdraw(),
            "withdraw route fd00:77::100/128 next-hop self"
        );
    }

    #[test]
    fn changes_withdraw_what_is_gone_and_announce_what_is_new_or_different() {
        let a = route("10.0.0.1", &[]);
        let b = route("10.0.0.2", &[]);
        let b_draining = route("10.0.0.2", &[GRACEFUL_SHUTDOWN]);
        let c = route("10.0.0.3", &[]);
        let map = |rs: &[&Route]| -> BTreeMap<IpAddr, Route> {
            rs.iter().map(|r| (r.prefix, (*r).clone())).collect()
        };
        assert_eq!(
            changes(&map(&[&a, &b]), &map(&[&b_draining, &c])),
            vec![a.withdraw(), b_draining.announce(), c.announce()]
        );
        assert!(changes(&map(&[&a]), &map(&[&a])).is_empty());
    }
}
