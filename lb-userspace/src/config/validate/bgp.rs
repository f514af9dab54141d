//! The `bgp` section: thresholds, timers and the attributes every
//! announcement carries.

use std::{net::IpAddr, time::Duration};

use super::parse_duration;
use crate::config::{errors::Problems, model::Bgp, raw::RawBgp};

/// More healthy backends than a VIP can have would never be met.
const MIN_HEALTHY_MAX: i64 = lb_common::MAX_BACKENDS as i64;
/// Delays beyond this are a typo (`5m` for `5s`) that would stall a shutdown
/// or keep a dead instance's routes.
const DELAY_MAX: Duration = Duration::from_secs(600);

pub(super) fn validate(p: &mut Problems, raw: Option<&RawBgp>) -> Option<Option<Bgp>> {
    let Some(raw) = raw else {
        return Some(None);
    };
    if !(0..=MIN_HEALTHY_MAX).contains(&raw.min_healthy) {
        p.add(
            "bgp.min_healthy",
            format!("{} is out of range 0..={MIN_HEALTHY_MAX}", raw.min_healthy),
        );
    }
    let mut delay = |field: &str, text: &str| {
        let d = parse_duration(p, field, text)?;
        if d > DELAY_MAX {
            p.add(field, format!("{text} is longer than 10m"));
        }
        Some(d)
    };
    let announce_after = delay("bgp.announce_after", &raw.announce_after);
    let shutdown_delay = delay("bgp.shutdown_delay", &raw.shutdown_delay);
    let feed_grace = delay("bgp.feed_grace", &raw.feed_grace);
    if u32::try_from(raw.med).is_err() {
        p.add(
            "bgp.med",
            format!("{} is out of range 0..={}", raw.med, u32::MAX),
        );
    }
    for (i, c) in raw.communities.iter().enumerate() {
        if !is_community(c) {
            p.add(
                format!("bgp.communities[{i}]"),
                format!("`{c}` is not a community ASN:VALUE (each 0..=65535)"),
            );
        }
    }
    if raw.next_hop != "self" && raw.next_hop.parse::<IpAddr>().is_err() {
        p.add(
            "bgp.next_hop",
            format!("`{}` is neither `self` nor an IP address", raw.next_hop),
        );
    }
    Some(Some(Bgp {
        min_healthy: u32::try_from(raw.min_healthy).ok()?,
        announce_after: announce_after?,
        shutdown_delay: shutdown_delay?,
        feed_grace: feed_grace?,
        med: u32::try_from(raw.med).ok()?,
        communities: raw.communities.clone(),
        next_hop: raw.next_hop.clone(),
    }))
}

/// A standard community: two 16-bit numbers, `65000:80`.
fn is_community(text: &str) -> bool {
    text.split_once(':')
        .is_some_and(|(a, v)| a.parse::<u16>().is_ok() && v.parse::<u16>().is_ok())
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use crate::config::Config;

    const VIPS: &str = "interface: eth0\nvips:\n\
        - name: web\n  address: 192.0.2.10\n  port: 80\n  protocol: tcp\n  forwarding: l2\n  backends:\n\
        \x20   - { address: 198.51.100.11, weight: 1 }\n";

    fn parse(bgp: &str) -> Result<Config, String> {
        Config::parse(&format!("{VIPS}{bgp}"), Path::new("t.yaml")).map_err(|e| e.to_string())
    }

    #[test]
    fn absent_means_no_bgp_and_an_empty_section_takes_the_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.bgp, None);
        assert!(c.vips[0].announce, "announce defaults to true");
        let b = parse("bgp: {}\n").unwrap().bgp.unwrap();
        assert_eq!(b.min_healthy, 1);
        assert_eq!(b.announce_after, Duration::from_secs(2));
        assert_eq!(b.shutdown_delay, Duration::from_secs(5));
        assert_eq!(b.feed_grace, Duration::from_secs(30));
        assert_eq!((b.med, b.next_hop.as_str()), (100, "self"));
        assert!(b.communities.is_empty());
    }

    #[test]
    fn accepts_every_setting() {
        let c = parse(
            "bgp:\n  min_healthy: 2\n  announce_after: 500ms\n  shutdown_delay: 1s\n  \
             feed_grace: 10s\n  med: 7\n  communities: [\"65000:80\"]\n  next_hop: 192.0.2.1\n",
        )
        .unwrap();
        let b = c.bgp.unwrap();
        assert_eq!(b.min_healthy, 2);
        assert_eq!(b.announce_after, Duration::from_millis(500));
        assert_eq!(b.communities, vec!["65000:80"]);
        let off = parse("").unwrap();
        let text = VIPS.replace("forwarding: l2\n", "forwarding: l2\n  announce: false\n");
        let c = Config::parse(&text, Path::new("t.yaml")).unwrap();
        assert!(off.vips[0].announce && !c.vips[0].announce);
    }

    #[test]
    fn errors_name_the_field() {
        for (bgp, field) in [
            ("min_healthy: -1", "bgp.min_healthy: -1 is out of range"),
            (
                "announce_after: soon",
                "bgp.announce_after: `soon` is not a duration",
            ),
            (
                "shutdown_delay: 1h",
                "bgp.shutdown_delay: 1h is longer than 10m",
            ),
            ("feed_grace: x", "bgp.feed_grace: `x` is not a duration"),
            ("med: 4294967296", "bgp.med: 4294967296 is out of range"),
            (
                "communities: [\"65536:1\"]",
                "bgp.communities[0]: `65536:1` is not a community",
            ),
            (
                "communities: [\"80\"]",
                "bgp.communities[0]: `80` is not a community",
            ),
            (
                "next_hop: router",
                "bgp.next_hop: `router` is neither `self` nor an IP address",
            ),
        ] {
            let e = parse(&format!("bgp: {{ {bgp} }}\n")).unwrap_err();
            assert!(e.contains(field), "{bgp}: {e}");
        }
        assert!(
            parse("bgp: { unknown: 1 }\n")
                .unwrap_err()
                .contains("unknown")
        );
    }
}
