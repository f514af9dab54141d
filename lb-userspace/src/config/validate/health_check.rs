//! A VIP's health check: port, kind and path, timing and thresholds.

use std::time::Duration;

use super::{parse_duration, parse_port};
use crate::config::{
    errors::Problems,
    model::{HealthCheck, HealthKind},
    raw::RawHealthCheck,
};

/// `at` is the check's place in the file (`vips[i].health_check`); the port
/// defaults to the VIP's, `vip_port` (`None` if that is invalid).
pub(super) fn validate(
    p: &mut Problems,
    at: &str,
    raw: RawHealthCheck,
    vip_port: Option<u16>,
) -> Option<HealthCheck> {
    let port = match raw.port {
        None => vip_port,
        Some(n) => parse_port(p, &format!("{at}.port"), n),
    };
    let path = match (raw.kind, raw.path) {
        (HealthKind::Http, None) => "/".to_string(),
        (HealthKind::Http, Some(path))
            if path.starts_with('/') && !path.contains(char::is_whitespace) =>
        {
            path
        }
        (HealthKind::Http, Some(path)) => {
            p.add(
                format!("{at}.path"),
                format!("`{path}` must start with / and contain no spaces"),
            );
            String::new()
        }
        (HealthKind::Tcp, None) => String::new(),
        (HealthKind::Tcp, Some(_)) => {
            p.add(format!("{at}.path"), "only applies to kind: http");
            String::new()
        }
    };
    let interval = parse_duration(p, &format!("{at}.interval"), &raw.interval);
    let timeout = parse_duration(p, &format!("{at}.timeout"), &raw.timeout);
    if let Some(i) = interval
        && i < Duration::from_millis(10)
    {
        p.add(format!("{at}.interval"), "must be at least 10ms");
    }
    if let (Some(i), Some(t)) = (interval, timeout)
        && (t.is_zero() || t >= i)
    {
        p.add(
            format!("{at}.timeout"),
            format!(
                "must be above 0 and below the interval ({})",
                humantime::format_duration(i)
            ),
        );
    }
    for (name, value) in [("rise", raw.rise), ("fall", raw.fall)] {
        if !(1..=100).contains(&value) {
            p.add(
                format!("{at}.{name}"),
                format!("{value} is out of range 1..=100"),
            );
        }
    }
    Some(HealthCheck {
        kind: raw.kind,
        port: port?,
        path,
        interval: interval?,
        timeout: timeout?,
        rise: raw.rise.clamp(1, 100) as u32,
        fall: raw.fall.clamp(1, 100) as u32,
    })
}
