//! End-to-end tier for observability: the admin listener, a real Prometheus
//! server scraping it, promtool, readiness and `lb status`. Needs root and
//! Debian's `prometheus` package (installed by `cargo xtask setup`).

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_tests::{
    addresses::{HEALTH_PORT, TCP_PORT, UDP_PORT, VIP, backend_address},
    http,
    netns::Netns,
    root::root_or_skip,
    topology::{L2Topology, lb_binary},
    traffic::{tcp_connections, udp_exchanges},
};
use lb_userspace::status::Status;

const ADMIN: &str = "10.77.0.3:9742";
const WEIGHTS: [(&str, u32); 3] = [("b1", 1), ("b2", 1), ("b3", 2)];

/// A web (TCP) and an echo (UDP) VIP over b1..b3 (plus `extra_backend`), the
/// admin listener on the load balancer's address so the client namespace can
/// reach it (with `admin_extra` settings), probes on the health port.
fn config(admin_extra: &str, extra_backend: Option<&str>) -> String {
    let mut backends: String = WEIGHTS
        .iter()
        .enumerate()
        .map(|(i, (_, w))| {
            format!(
                "      - {{ address: {}, weight: {w} }}\n",
                backend_address(i)
            )
        })
        .collect();
    if let Some(addr) = extra_backend {
        backends += &format!("      - {{ address: {addr}, weight: 1 }}\n");
    }
    let vip = |name: &str, port: u16, proto: &str| {
        format!(
            "  - name: {name}\n    address: {VIP}\n    port: {port}\n    protocol: {proto}\n    forwarding: l2\n    \
             health_check: {{ port: {HEALTH_PORT}, interval: 300ms, timeout: 200ms, rise: 2, fall: 2 }}\n    backends:\n{backends}"
        )
    };
    format!(
        "interface: eth0\nadmin: {{ listen: \"{ADMIN}\"{admin_extra} }}\nvips:\n{}{}",
        vip("web", TCP_PORT, "tcp"),
        vip("echo", UDP_PORT, "udp")
    )
}

/// GET `http://{addr}{path}` from inside `ns`: (status code, body).
fn get(ns: &Netns, addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    http::get_in(
        ns.name(),
        &format!("http://{addr}{path}"),
        Duration::from_secs(5),
    )
}

fn status(ns: &Netns) -> Status {
    let (code, body) = get(ns, ADMIN, "/status").unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// A Prometheus server in the client namespace scraping lb every second;
/// killed on drop.
struct Prometheus {
    child: Child,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(client: &Netns) -> anyhow::Result<Prometheus> {
        let dir = std::env::temp_dir().join(format!("{}-prometheus", client.name()));
        std::fs::create_dir_all(dir.join("data"))?;
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
                 rule_files: [ {rules} ]\n\
                 scrape_configs:\n  - job_name: lb\n    static_configs:\n      - targets: [ \"{ADMIN}\" ]\n",
                rules = concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../config/prometheus-rules.yaml"
                ),
            ),
        )?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let mut command = Command::new("ip");
        lb_tests::netns::die_with_parent(&mut command);
        let child = command
            .args(["netns", "exec", client.name(), "prometheus"])
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:9090")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting prometheus")?;
        Ok(Prometheus { child, dir })
    }

    /// Runs an instant query; returns the value of each result series.
    fn query(&self, client: &Netns, promql: &str) -> anyhow::Result<Vec<f64>> {
        let q: String = promql.bytes().map(|b| format!("%{b:02X}")).collect();
        let (code, body) = get(
            client,
            "127.0.0.1:9090",
            &format!("/api/v1/query?query={q}"),
        )?;
        anyhow::ensure!(code == 200, "query {promql}: {code} {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        anyhow::ensure!(v["status"] == "success", "query {promql}: {body}");
        Ok(v["data"]["result"]
            .as_array()
            .context("result")?
            .iter()
            .filter_map(|r| r["value"][1].as_str()?.parse().ok())
            .collect())
    }

    /// Polls `promql` until `ok` accepts its values (at most 30 s).
    fn wait_for(&self, client: &Netns, promql: &str, ok: impl Fn(&[f64]) -> bool) -> Vec<f64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.query(client, promql).unwrap_or_default();
            if ok(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{promql} stayed at {v:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_real_scrape_passes_promtool_and_so_do_the_rules() {
    if !root_or_skip("a_real_scrape_passes_promtool_and_so_do_the_rules") {
        return;
    }
    let topo = L2Topology::new(&["b1", "b2", "b3"]).unwrap();
    let _lb = topo.start_lb(&config("", None)).unwrap();
    topo.client
        .enter(|| tcp_connections(SocketAddr::from((VIP, TCP_PORT)), 20))
        .unwrap();
    let (code, metrics) = get(&topo.client, ADMIN, "/metrics").unwrap();
    assert_eq!(code, 200);
    for family in [
        "lb_vip_packets_total",
        "lb_backend_new_flows_total",
        "lb_xdp_actions_total",
        "lb_drops_total",
        "lb_flow_table_lookups_total",
        "lb_backend_table_share",
        "lb_vip_healthy_backends",
        "lb_health_checks_total",
        "lb_health_check_duration_seconds_bucket",
        "lb_maglev_rebuilds_total",
        "lb_maglev_build_duration_seconds_bucket",
        "lb_vip_backend_skew",
        "lb_config_last_reload_successful 1",
        "lb_config_last_reload_timestamp_seconds",
        "lb_xdp_attached{interface=\"eth0\",mode=\"native\"} 1",
        "lb_build_info",
    ] {
        assert!(
            metrics.contains(family),
            "no {family} in the scrape:\n{metrics}"
        );
    }

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), metrics.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}"
    );

    let rules = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/prometheus-rules.yaml"
    );
    let out = Command::new("promtool")
        .args(["check", "rules", rules])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn prometheus_counts_exactly_what_the_client_sent_and_sees_a_backend_go_down() {
    if !root_or_skip("prometheus_counts_exactly_what_the_client_sent_and_sees_a_backend_go_down") {
        return;
    }
    let mut topo = L2Topology::new(&["b1", "b2", "b3"]).unwrap();
    let _lb = topo.start_lb(&config("", None)).unwrap();
    let prometheus = Prometheus::start(&topo.client).unwrap();

    // UDP: one datagram per exchange reaches the VIP, nothing else does.
    const SENT: usize = 600;
    let udp = topo
        .client
        .enter(|| udp_exchanges(SocketAddr::from((VIP, UDP_PORT)), SENT))
        .unwrap();
    assert_eq!(udp.failures, 0);
    let echo = format!("{VIP}:{UDP_PORT}");
    let per_backend = prometheus.wait_for(
        &topo.client,
        &format!("lb_backend_packets_total{{vip=\"{echo}\"}}"),
        |v| v.len() == 3 && v.iter().sum::<f64>() == SENT as f64,
    );
    println!("per-backend packets for {echo}: {per_backend:?} (sent {SENT})");
    let vip_total = prometheus
        .query(
            &topo.client,
            &format!("lb_vip_packets_total{{vip=\"{echo}\"}}"),
        )
        .unwrap();
    assert_eq!(vip_total, [SENT as f64]);

    // TCP: what Prometheus has equals what lb counts, backend by backend.
    topo.client
        .enter(|| tcp_connections(SocketAddr::from((VIP, TCP_PORT)), 100))
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let web = status(&topo.client)
        .vips
        .into_iter()
        .find(|v| v.name == "web")
        .unwrap();
    let web_sum: u64 = web.backends.iter().map(|b| b.packets).sum();
    let seen = prometheus.wait_for(
        &topo.client,
        &format!("sum(lb_backend_packets_total{{vip=\"{VIP}:{TCP_PORT}\"}})"),
        |v| v == [web_sum as f64],
    );
    assert_eq!(
        seen,
        [web.packets as f64],
        "VIP total equals the sum of its backends"
    );

    // Every dashboard query is valid PromQL against real data.
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../config/grafana-dashboard.json")).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            prometheus
                .query(&topo.client, expr)
                .unwrap_or_else(|e| panic!("dashboard query {expr}: {e:#}"));
        }
    }

    // A backend taken down shows up as lb_backend_up 0.
    topo.set_health(1, false).unwrap();
    let b2 = backend_address(1);
    prometheus.wait_for(
        &topo.client,
        &format!("lb_backend_up{{backend=\"{b2}\",vip=\"{echo}\"}}"),
        |v| v == [0.0],
    );
    prometheus.wait_for(
        &topo.client,
        &format!("lb_vip_healthy_backends{{vip=\"{echo}\"}}"),
        |v| v == [2.0],
    );
}

#[test]
fn ready_is_503_until_attached_200_after_and_503_once_shutdown_starts() {
    if !root_or_skip("ready_is_503_until_attached_200_after_and_503_once_shutdown_starts") {
        return;
    }
    let topo = L2Topology::new(&["b1", "b2", "b3"]).unwrap();
    // A fourth backend that no host answers for keeps start-up waiting for
    // its MAC (3 s), while the admin listener is already up.
    let text = config(", shutdown_grace: 3s", Some("10.77.0.99"));
    let mut lb = topo.start_lb_unwaited(&text).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let before_attach = loop {
        match get(&topo.client, ADMIN, "/ready") {
            Ok((code, _)) => break code,
            Err(_) => {
                assert!(
                    Instant::now() < deadline,
                    "admin listener never came up:\n{}",
                    lb.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    assert_eq!(lb.attach_count(), 0, "checked before attaching");
    assert_eq!(before_attach, 503);
    assert_eq!(
        get(&topo.client, ADMIN, "/healthz").unwrap().0,
        200,
        "alive while starting"
    );
    lb.wait_ready().unwrap();
    assert_eq!(get(&topo.client, ADMIN, "/ready").unwrap().0, 200);

    let pid = lb.pid().expect("lb runs") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (code, _) = get(&topo.client, ADMIN, "/ready").unwrap();
        if code == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/ready still {code} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        lb.is_running(),
        "503 is served during the grace period, before lb exits"
    );
    let (status, _) = lb.wait_exit().unwrap();
    assert!(status.success());
}

#[test]
fn lb_status_lists_every_vip_and_backend_with_the_counters_of_status() {
    if !root_or_skip("lb_status_lists_every_vip_and_backend_with_the_counters_of_status") {
        return;
    }
    let topo = L2Topology::new(&["b1", "b2", "b3"]).unwrap();
    let lb = topo.start_lb(&config("", None)).unwrap();
    topo.client
        .enter(|| udp_exchanges(SocketAddr::from((VIP, UDP_PORT)), 90))
        .unwrap();
    topo.client
        .enter(|| tcp_connections(SocketAddr::from((VIP, TCP_PORT)), 30))
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let run = |json: bool| {
        let mut args = vec![format!("--net=/var/run/netns/{}", topo.client.name())];
        args.push(lb_binary().unwrap().display().to_string());
        args.extend(["status".into(), "--admin".into(), ADMIN.into()]);
        if json {
            args.push("--json".into());
        }
        let out = Command::new("nsenter").args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let table = run(false);
    let json: Status = serde_json::from_str(&run(true)).unwrap();
    println!("{table}");
    assert_eq!(json.vips.len(), 2);
    for v in &json.vips {
        let header = table
            .lines()
            .find(|l| l.starts_with(&format!("VIP {} {}/{}", v.name, v.vip, v.protocol)))
            .unwrap();
        assert!(
            header.contains(&format!("{} packets", v.packets)),
            "{header}"
        );
        for b in &v.backends {
            // The row of this backend inside this VIP's block.
            let block: Vec<&str> = table
                .split("\nVIP ")
                .filter(|blk| blk.contains(&v.vip) && blk.contains(&v.name))
                .collect();
            let row = block[0]
                .lines()
                .find(|l| l.trim_start().starts_with(&b.address.to_string()))
                .unwrap();
            let cols: Vec<&str> = row.split_whitespace().collect();
            assert_eq!(cols[1], b.state.as_str());
            assert_eq!(cols[2], if b.up { "up" } else { "down" });
            assert_eq!(cols[3], b.weight.to_string());
            assert_eq!(cols[4], format!("{:.2}", b.table_share * 100.0));
            assert_eq!(cols[5], b.packets.to_string());
            assert_eq!(cols[6], b.bytes.to_string());
            assert_eq!(cols[7], b.new_flows.to_string());
        }
        assert!(v.packets > 0, "traffic was counted for {}", v.name);
    }
    assert_eq!(
        json.vips.iter().find(|v| v.name == "echo").unwrap().packets,
        90
    );
    drop(lb);
}
