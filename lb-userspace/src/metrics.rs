//! Prometheus metrics. Event metrics (probes, table builds, reloads) live in a
//! registry updated where the events happen; everything read from the maps or
//! the current state is rendered afresh from a [`Status`] at each scrape, so
//! the exposition always matches the kernel's counters.

use prometheus::{
    Encoder as _, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder, core::Collector,
};

use crate::status::Status;

/// How a health probe ended: the `result` label of `lb_health_checks_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    Success,
    Refused,
    Timeout,
    BadStatus,
    Error,
}

impl ProbeResult {
    const ALL: [ProbeResult; 5] = [
        ProbeResult::Success,
        ProbeResult::Refused,
        ProbeResult::Timeout,
        ProbeResult::BadStatus,
        ProbeResult::Error,
    ];

    fn label(self) -> &'static str {
        match self {
            ProbeResult::Success => "success",
            ProbeResult::Refused => "refused",
            ProbeResult::Timeout => "timeout",
            ProbeResult::BadStatus => "bad_status",
            ProbeResult::Error => "error",
        }
    }
}

/// The event metrics, written only through its methods, which also remove
/// the series of what is gone.
pub struct Metrics {
    registry: Registry,
    health_checks: IntCounterVec,
    health_check_duration: HistogramVec,
    health_probe_local_errors: IntCounterVec,
    maglev_rebuilds: IntCounterVec,
    maglev_build_duration: HistogramVec,
    reload_successful: IntGauge,
    reload_timestamp: Gauge,
    reload_failures: IntCounter,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Only fails for malformed names or label sets, which are constants here.
    r.expect("metric definition")
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let m = Metrics {
            health_checks: must(IntCounterVec::new(
                Opts::new("lb_health_checks_total", "Health probes by result."),
                &["vip", "proto", "backend", "result"],
            )),
            health_check_duration: must(HistogramVec::new(
                HistogramOpts::new(
                    "lb_health_check_duration_seconds",
                    "Duration of health probes.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
                &["vip", "proto"],
            )),
            health_probe_local_errors: must(IntCounterVec::new(
                Opts::new(
                    "lb_health_probe_local_errors_total",
                    "Health probes this host could not run (out of file descriptors or memory); \
                     retried, never counted against the backend.",
                ),
                &["vip", "proto", "backend"],
            )),
            maglev_rebuilds: must(IntCounterVec::new(
                Opts::new(
                    "lb_maglev_rebuilds_total",
                    "Maglev tables built and swapped in.",
                ),
                &["vip", "proto"],
            )),
            maglev_build_duration: must(HistogramVec::new(
                HistogramOpts::new(
                    "lb_maglev_build_duration_seconds",
                    "Time to build a Maglev table.",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                ]),
                &["vip", "proto"],
            )),
            reload_successful: must(IntGauge::new(
                "lb_config_last_reload_successful",
                "1 if the last config (re)load was applied, 0 if it was rejected.",
            )),
            reload_timestamp: must(Gauge::new(
                "lb_config_last_reload_timestamp_seconds",
                "Unix time of the last config (re)load attempt.",
            )),
            reload_failures: must(IntCounter::new(
                "lb_config_reload_failures_total",
                "Config reloads rejected, or that failed to apply (each retry counts).",
            )),
            registry,
        };
        let collectors: [Box<dyn Collector>; 8] = [
            Box::new(m.health_checks.clone()),
            Box::new(m.health_check_duration.clone()),
            Box::new(m.health_probe_local_errors.clone()),
            Box::new(m.maglev_rebuilds.clone()),
            Box::new(m.maglev_build_duration.clone()),
            Box::new(m.reload_successful.clone()),
            Box::new(m.reload_timestamp.clone()),
            Box::new(m.reload_failures.clone()),
        ];
        for c in collectors {
            must(m.registry.register(c));
        }
        m
    }

    /// Records a config (re)load attempt.
    pub fn reloaded(&self, ok: bool) {
        self.reload_successful.set(ok as i64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.reload_timestamp.set(now.as_secs_f64());
    }

    /// Records a reload that was rejected or failed to apply.
    pub fn reload_failed(&self) {
        self.reloaded(false);
        self.reload_failures.inc();
    }

    /// Counts one health probe of `backend` and how long it took.
    pub fn probed(
        &self,
        vip: &str,
        proto: &str,
        backend: &str,
        result: ProbeResult,
        took: std::time::Duration,
    ) {
        self.health_checks
            .with_label_values(&[vip, proto, backend, result.label()])
            .inc();
        self.health_check_duration
            .with_label_values(&[vip, proto])
            .observe(took.as_secs_f64());
    }

    /// Counts a Maglev table built for a VIP and swapped in.
    pub fn table_built(&self, vip: &str, proto: &str, took: std::time::Duration) {
        let labels = [vip, proto];
        self.maglev_rebuilds.with_label_values(&labels).inc();
        self.maglev_build_duration
            .with_label_values(&labels)
            .observe(took.as_secs_f64());
    }

    /// Forgets the series of a VIP that is gone, so they do not linger at
    /// their last values.
    pub fn forget_vip(&self, vip: &str, proto: &str) {
        let labels = [vip, proto];
        let _ = self.maglev_rebuilds.remove_label_values(&labels);
        let _ = self.maglev_build_duration.remove_label_values(&labels);
        let _ = self.health_check_duration.remove_label_values(&labels);
    }

    /// Forgets the probe series of a backend no longer probed (removed, or
    /// its check changed and a new task takes over).
    pub fn forget_probe(&self, vip: &str, proto: &str, backend: &str) {
        for result in ProbeResult::ALL {
            let _ = self
                .health_checks
                .remove_label_values(&[vip, proto, backend, result.label()]);
        }
        let _ = self
            .health_probe_local_errors
            .remove_label_values(&[vip, proto, backend]);
    }

    /// Counts a probe that could not run on this host (no file descriptor,
    /// no buffer): not a result about the backend.
    pub fn probe_local_error(&self, vip: &str, proto: &str, backend: &str) {
        self.health_probe_local_errors
            .with_label_values(&[vip, proto, backend])
            .inc();
    }

    /// The text exposition: the event metrics plus everything in `status`.
    pub fn render(&self, status: &Status) -> String {
        let scrape = Registry::new();
        register_status(&scrape, status);
        let mut families = self.registry.gather();
        families.extend(scrape.gather());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&families, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = must(IntCounterVec::new(Opts::new(name, help), labels));
    must(r.register(Box::new(c.clone())));
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::GaugeVec {
    let g = must(prometheus::GaugeVec::new(Opts::new(name, help), labels));
    must(r.register(Box::new(g.clone())));
    g
}

/// Fresh metric families from one snapshot: counters start at zero and are
/// raised to the kernel's totals.
fn register_status(r: &Registry, s: &Status) {
    let vip_packets = counter(
        r,
        "lb_vip_packets_total",
        "Packets that matched the VIP.",
        &["vip", "proto"],
    );
    let vip_bytes = counter(
        r,
        "lb_vip_bytes_total",
        "Bytes of packets that matched the VIP.",
        &["vip", "proto"],
    );
    let be = ["vip", "proto", "backend"];
    let be_packets = counter(
        r,
        "lb_backend_packets_total",
        "Packets forwarded to the backend.",
        &be,
    );
    let be_bytes = counter(
        r,
        "lb_backend_bytes_total",
        "Bytes forwarded to the backend.",
        &be,
    );
    let be_new = counter(
        r,
        "lb_backend_new_flows_total",
        "Flows placed on the backend by the Maglev table.",
        &be,
    );
    let be_up = gauge(
        r,
        "lb_backend_up",
        "1 if the backend passes its health checks.",
        &be,
    );
    let be_weight = gauge(
        r,
        "lb_backend_weight",
        "Configured weight of the backend.",
        &be,
    );
    let be_share = gauge(
        r,
        "lb_backend_table_share",
        "Fraction of the VIP's Maglev table slots.",
        &be,
    );
    let healthy = gauge(
        r,
        "lb_vip_healthy_backends",
        "Enabled backends passing health checks.",
        &["vip", "proto"],
    );
    let all_down = gauge(
        r,
        "lb_vip_all_down",
        "1 while no active backend is healthy (on_all_down applies).",
        &["vip", "proto"],
    );
    let skew = gauge(
        r,
        "lb_vip_backend_skew",
        "Largest ratio of a backend's share of new flows since the previous scrape to its table share.",
        &["vip", "proto"],
    );
    let announced = gauge(
        r,
        "lb_bgp_announced",
        "1 while this instance wants the VIP announced over BGP (lb bgp-feed announces it).",
        &["vip", "proto"],
    );
    for v in &s.vips {
        let vl = [v.vip.as_str(), v.protocol.as_str()];
        announced
            .with_label_values(&vl)
            .set(v.bgp.announced as u8 as f64);
        vip_packets.with_label_values(&vl).inc_by(v.packets);
        vip_bytes.with_label_values(&vl).inc_by(v.bytes);
        healthy
            .with_label_values(&vl)
            .set(v.healthy_backends as f64);
        all_down.with_label_values(&vl).set(v.all_down as u8 as f64);
        skew.with_label_values(&vl).set(v.skew.unwrap_or(0.0));
        for b in &v.backends {
            let addr = b.address.to_string();
            let bl = [v.vip.as_str(), v.protocol.as_str(), addr.as_str()];
            be_packets.with_label_values(&bl).inc_by(b.packets);
            be_bytes.with_label_values(&bl).inc_by(b.bytes);
            be_new.with_label_values(&bl).inc_by(b.new_flows);
            be_up.with_label_values(&bl).set(b.up as u8 as f64);
            be_weight.with_label_values(&bl).set(b.weight as f64);
            be_share.with_label_values(&bl).set(b.table_share);
        }
    }

    let actions = counter(
        r,
        "lb_xdp_actions_total",
        "Verdicts of the XDP program.",
        &["action"],
    );
    let drops = counter(
        r,
        "lb_drops_total",
        "Packets dropped, by reason.",
        &["reason"],
    );
    let passes = counter(
        r,
        "lb_passes_total",
        "Packets passed to the kernel, by reason.",
        &["reason"],
    );
    let lookups = counter(
        r,
        "lb_flow_table_lookups_total",
        "Flow-table results for VIP packets.",
        &["result"],
    );
    let evictions = counter(
        r,
        "lb_flow_table_evictions_total",
        "Flow-table entries a new flow took from another flow, by kind (closed, expired, single_packet, idle).",
        &["kind"],
    );
    let untracked = counter(
        r,
        "lb_flow_table_untracked_total",
        "Flows placed without a flow-table entry (their bucket held only active established flows): forwarded by the Maglev table.",
        &[],
    );
    let entries = gauge(
        r,
        "lb_flow_table_entries",
        "Flow-table entries in use, by family.",
        &["family"],
    );
    for (family, &n) in &s.flow_table_entries {
        entries.with_label_values(&[family]).set(n as f64);
    }
    let icmp = counter(
        r,
        "lb_icmp_replies_total",
        "ICMP errors the XDP program sent back to clients, by kind.",
        &["kind"],
    );
    for (name, &value) in &s.counters {
        if let Some(action) = name.strip_prefix("action_") {
            actions.with_label_values(&[action]).inc_by(value);
        } else if let Some(reason) = name.strip_prefix("drop_") {
            drops.with_label_values(&[reason]).inc_by(value);
        } else if let Some(reason) = name.strip_prefix("pass_") {
            passes.with_label_values(&[reason]).inc_by(value);
        } else if let Some(result) = name.strip_prefix("flow_") {
            lookups.with_label_values(&[result]).inc_by(value);
        } else if let Some(kind) = name.strip_prefix("evict_") {
            evictions.with_label_values(&[kind]).inc_by(value);
        } else if name == "untracked" {
            untracked.with_label_values::<&str>(&[]).inc_by(value);
        } else if let Some(kind) = name.strip_prefix("icmp_") {
            icmp.with_label_values(&[kind]).inc_by(value);
        }
    }

    let attached = must(IntGaugeVec::new(
        Opts::new("lb_xdp_attached", "1 while the XDP program is attached."),
        &["interface", "mode"],
    ));
    must(r.register(Box::new(attached.clone())));
    attached
        .with_label_values(&[s.interface.as_str(), s.xdp_mode.as_str()])
        .set(s.attached as i64);
    let build = must(IntGaugeVec::new(
        Opts::new("lb_build_info", "Version of lb."),
        &["version"],
    ));
    must(r.register(Box::new(build.clone())));
    build.with_label_values(&[s.version.as_str()]).set(1);
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::IpAddr};

    use super::*;
    use crate::{
        config::{BackendState, Forwarding, OnAllDown, Protocol, XdpMode},
        status::{BackendStatus, VipStatus},
    };

    fn status() -> Status {
        Status {
            version: "0.1.0".into(),
            interface: "eth0".into(),
            xdp_mode: XdpMode::Native,
            attached: true,
            ready: true,
            config: Default::default(),
            bgp: None,
            counters: BTreeMap::from([
                ("action_tx".into(), 7),
                ("drop_no_backend".into(), 2),
                ("pass_not_vip".into(), 3),
                ("flow_hit".into(), 5),
                ("icmp_too_big".into(), 4),
                ("evict_single_packet".into(), 6),
                ("untracked".into(), 8),
            ]),
            flow_table_entries: BTreeMap::from([("ipv4".into(), 10), ("ipv6".into(), 1)]),
            vips: vec![VipStatus {
                name: "web".into(),
                vip: "10.0.0.1:80".into(),
                protocol: Protocol::Tcp,
                forwarding: Forwarding::L2,
                on_all_down: OnAllDown::FailOpen,
                healthy_backends: 1,
                all_down: false,
                packets: 9,
                bytes: 900,
                new_flows: 2,
                skew: Some(1.5),
                bgp: crate::bgp::VipBgp {
                    announced: true,
                    graceful_shutdown: false,
                    reason: crate::bgp::Reason::Announced,
                },
                backends: vec![BackendStatus {
                    address: IpAddr::from([10, 0, 0, 2]),
                    state: BackendState::Active,
                    up: true,
                    weight: 3,
                    table_share: 1.0,
                    packets: 7,
                    bytes: 700,
                    new_flows: 2,
                }],
            }],
        }
    }

    #[test]
    fn renders_every_family_with_the_snapshots_values() {
        let m = Metrics::new();
        m.reloaded(true);
        m.table_built("10.0.0.1:80", "tcp", std::time::Duration::from_millis(1));
        let text = m.render(&status());
        for line in [
            r#"lb_vip_packets_total{proto="tcp",vip="10.0.0.1:80"} 9"#,
            r#"lb_backend_packets_total{backend="10.0.0.2",proto="tcp",vip="10.0.0.1:80"} 7"#,
            r#"lb_backend_new_flows_total{backend="10.0.0.2",proto="tcp",vip="10.0.0.1:80"} 2"#,
            r#"lb_backend_up{backend="10.0.0.2",proto="tcp",vip="10.0.0.1:80"} 1"#,
            r#"lb_backend_weight{backend="10.0.0.2",proto="tcp",vip="10.0.0.1:80"} 3"#,
            r#"lb_backend_table_share{backend="10.0.0.2",proto="tcp",vip="10.0.0.1:80"} 1"#,
            r#"lb_vip_backend_skew{proto="tcp",vip="10.0.0.1:80"} 1.5"#,
            r#"lb_vip_all_down{proto="tcp",vip="10.0.0.1:80"} 0"#,
            r#"lb_bgp_announced{proto="tcp",vip="10.0.0.1:80"} 1"#,
            r#"lb_xdp_actions_total{action="tx"} 7"#,
            r#"lb_drops_total{reason="no_backend"} 2"#,
            r#"lb_passes_total{reason="not_vip"} 3"#,
            r#"lb_flow_table_lookups_total{result="hit"} 5"#,
            r#"lb_flow_table_evictions_total{kind="single_packet"} 6"#,
            "lb_flow_table_untracked_total 8",
            r#"lb_flow_table_entries{family="ipv4"} 10"#,
            r#"lb_flow_table_entries{family="ipv6"} 1"#,
            r#"lb_icmp_replies_total{kind="too_big"} 4"#,
            r#"lb_xdp_attached{interface="eth0",mode="native"} 1"#,
            r#"lb_build_info{version="0.1.0"} 1"#,
            "lb_config_last_reload_successful 1",
            r#"lb_maglev_rebuilds_total{proto="tcp",vip="10.0.0.1:80"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
    }
}
