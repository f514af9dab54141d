//! The config's parsing and validation, through `Config::parse` as `lb`
//! uses it, with the error texts users see.

use std::{net::IpAddr, time::Duration};

use super::{validate::is_prime, *};

const GOOD: &str = r#"
interface: eth0
xdp_mode: native
maglev:
  table_size: 65537
  seed: 0x5eed
vips:
  - name: web
    address: 192.0.2.10
    port: 80
    protocol: tcp
    forwarding: l2
    backends:
      - { address: 198.51.100.11, weight: 100 }
      - { address: 198.51.100.12, weight: 100 }
  - name: dns
    address: 192.0.2.10
    port: 53
    protocol: udp
    forwarding: l2
    backends:
      - { address: 198.51.100.11, weight: 1 }
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("test.yaml"))
}

/// Parses GOOD with `from` replaced by `to` and returns the error text.
fn error_with(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "test fixture lacks {from:?}");
    let text = GOOD.replacen(from, to, 1);
    match parse(&text) {
        Ok(c) => panic!("accepted {to:?}: {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn accepts_the_documented_example() {
    let c = parse(GOOD).expect("valid");
    assert_eq!(c.interface, "eth0");
    assert_eq!(c.xdp_mode, XdpMode::Native);
    assert_eq!(
        (c.table_size, c.seed, c.max_vips),
        (65537, 0x5eed, DEFAULT_MAX_VIPS)
    );
    assert_eq!(c.vips.len(), 2);
    assert_eq!(c.vips[0].address, IpAddr::from([192, 0, 2, 10]));
    assert_eq!(c.vips[1].protocol, Protocol::Udp);
    assert_eq!(
        c.vips[0].backends[1],
        Backend {
            address: IpAddr::from([198, 51, 100, 12]),
            weight: 100,
            state: BackendState::Active,
        }
    );
}

#[test]
fn the_shipped_configs_are_valid() {
    for name in ["demo.yaml", "example.yaml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../config")
            .join(name);
        Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn rejects_a_non_prime_table_size() {
    let e = error_with("table_size: 65537", "table_size: 65536");
    assert!(
        e.contains("maglev.table_size") && e.contains("not prime"),
        "{e}"
    );
}

#[test]
fn rejects_an_out_of_range_table_size() {
    for size in ["7", "1000003", "-5"] {
        let e = error_with("table_size: 65537", &format!("table_size: {size}"));
        assert!(
            e.contains("maglev.table_size") && e.contains("out of range"),
            "{e}"
        );
    }
}

#[test]
fn rejects_a_duplicate_vip() {
    let e = error_with("port: 53\n    protocol: udp", "port: 80\n    protocol: tcp");
    assert!(
        e.contains("vips[1]") && e.contains("duplicate VIP 192.0.2.10:80/tcp"),
        "{e}"
    );
}

#[test]
fn rejects_a_duplicate_vip_name() {
    let e = error_with("name: dns", "name: web");
    assert!(e.contains("vips[1].name") && e.contains("duplicate"), "{e}");
}

#[test]
fn rejects_a_duplicate_backend() {
    let e = error_with("198.51.100.12", "198.51.100.11");
    assert!(
        e.contains("vips[0].backends[1].address") && e.contains("duplicate backend"),
        "{e}"
    );
}

#[test]
fn rejects_zero_and_negative_weights() {
    for w in ["0", "-3", "70000"] {
        let e = error_with("weight: 1 }", &format!("weight: {w} }}"));
        assert!(
            e.contains("vips[1].backends[0].weight") && e.contains("out of range"),
            "{e}"
        );
    }
}

#[test]
fn rejects_an_unknown_protocol() {
    let e = error_with("protocol: tcp", "protocol: sctp");
    assert!(
        e.contains("vips[0].protocol") && e.contains("unknown variant `sctp`"),
        "{e}"
    );
}

#[test]
fn rejects_an_unknown_forwarding_mode() {
    let e = error_with("forwarding: l2", "forwarding: gre");
    assert!(
        e.contains("vips[0].forwarding") && e.contains("unknown variant `gre`"),
        "{e}"
    );
}

#[test]
fn rejects_an_unknown_xdp_mode() {
    let e = error_with("xdp_mode: native", "xdp_mode: offload");
    assert!(
        e.contains("xdp_mode") && e.contains("unknown variant `offload`"),
        "{e}"
    );
}

#[test]
fn rejects_unparsable_addresses() {
    let e = error_with("address: 192.0.2.10", "address: 192.0.2.300");
    assert!(
        e.contains("vips[0].address") && e.contains("not an IP address"),
        "{e}"
    );
    let e = error_with("198.51.100.11, weight: 100", "backend-1, weight: 100");
    assert!(
        e.contains("vips[0].backends[0].address") && e.contains("not an IP address"),
        "{e}"
    );
}

#[test]
fn accepts_ipv6_wherever_it_accepts_ipv4() {
    let text = GOOD
        .replacen("address: 192.0.2.10", "address: 2001:db8::10", 1)
        .replace("198.51.100.1", "2001:db8:1::1")
        .replacen(
            "forwarding: l2",
            "forwarding: ipip\n    encap_source: 2001:db8::1",
            1,
        );
    let c = parse(&text).expect("valid");
    assert_eq!(c.vips[0].address, "2001:db8::10".parse::<IpAddr>().unwrap());
    assert_eq!(
        c.vips[0].backends[1].address,
        "2001:db8:1::12".parse::<IpAddr>().unwrap()
    );
    assert_eq!(c.vips[0].encap_source, Some("2001:db8::1".parse().unwrap()));
}

#[test]
fn rejects_addresses_nothing_can_be_balanced_to() {
    for (address, why) in [
        ("\"::\"", "unspecified"),
        ("\"::1\"", "loopback"),
        ("\"ff02::1\"", "multicast"),
        ("\"fe80::1\"", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("127.0.0.1", "loopback"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "broadcast"),
    ] {
        let e = error_with(
            "198.51.100.11, weight: 100",
            &format!("{address}, weight: 100"),
        );
        assert!(
            e.contains("vips[0].backends[0].address") && e.contains(why),
            "{address}: {e}"
        );
    }
}

#[test]
fn rejects_ipv4_mapped_ipv6_addresses() {
    let e = error_with("address: 192.0.2.10", "address: \"::ffff:192.0.2.10\"");
    assert!(
        e.contains("vips[0].address") && e.contains("IPv4-mapped"),
        "{e}"
    );
}

#[test]
fn rejects_tunnel_family_combinations_ipip_does_not_support() {
    let ipip = |vip: &str, b0: &str, src: &str| {
        let text = GOOD
            .replacen("address: 192.0.2.10", &format!("address: {vip}"), 1)
            .replacen("198.51.100.11,", &format!("{b0},"), 1)
            .replacen("forwarding: l2", &format!("forwarding: ipip{src}"), 1);
        match parse(&text) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    // IPv4 in IPv6 (every backend IPv6) is supported.
    let v4_in_v6 = GOOD
        .replacen("forwarding: l2", "forwarding: ipip", 1)
        .replace("198.51.100.1", "2001:db8:1::1");
    parse(&v4_in_v6).expect("IPv4 VIP with IPv6 backends");
    // IPv6 VIP to an IPv4 backend: IPv6 in IPv4 is not.
    let e = ipip("2001:db8::10", "198.51.100.11", "");
    assert!(
        e.contains("vips[0].backends") && e.contains("IPv6 in IPv4 is not supported"),
        "{e}"
    );
    // Mixed families under one VIP.
    let e = ipip("192.0.2.10", "2001:db8:1::11", "");
    assert!(
        e.contains("vips[0].backends[1].address") && e.contains("share one family"),
        "{e}"
    );
    // An outer source of the other family.
    let e = ipip(
        "192.0.2.10",
        "198.51.100.11",
        "\n    encap_source: 2001:db8::1",
    );
    assert!(
        e.contains("vips[0].encap_source") && e.contains("backends' family"),
        "{e}"
    );
    // Errors name the backend's place in the file, unparsable ones
    // included.
    let text = GOOD
        .replacen("forwarding: l2", "forwarding: ipip", 1)
        .replacen("198.51.100.11", "bogus", 1)
        .replacen(
            "      - { address: 198.51.100.12, weight: 100 }\n",
            "      - { address: 198.51.100.12, weight: 100 }\n      - { address: \"2001:db8:1::13\", weight: 1 }\n",
            1,
        );
    let e = parse(&text).unwrap_err().to_string();
    assert!(
        e.contains("vips[0].backends[2].address: is IPv6 but backends[1] is IPv4"),
        "{e}"
    );
    // l2 only rewrites MACs: any family goes.
    parse(&GOOD.replace("198.51.100.1", "2001:db8:1::1")).expect("l2 with IPv6 backends");
}

#[test]
fn rejects_a_bad_port() {
    let e = error_with("port: 80", "port: 0");
    assert!(e.contains("vips[0].port"), "{e}");
    let e = error_with("port: 80", "port: 65536");
    assert!(e.contains("vips[0].port"), "{e}");
}

#[test]
fn accepts_ipip_with_an_encap_source_and_rejects_it_for_l2() {
    let text = GOOD.replacen(
        "forwarding: l2",
        "forwarding: ipip\n    encap_source: 203.0.113.1",
        1,
    );
    let c = parse(&text).expect("valid");
    assert_eq!(c.vips[0].forwarding, Forwarding::Ipip);
    assert_eq!(c.vips[0].encap_source, Some(IpAddr::from([203, 0, 113, 1])));
    let e = error_with(
        "forwarding: l2",
        "forwarding: l2\n    encap_source: 203.0.113.1",
    );
    assert!(
        e.contains("vips[0].encap_source") && e.contains("only applies to forwarding: ipip"),
        "{e}"
    );
    let e = error_with("forwarding: l2", "forwarding: l2\n    icmp_too_big: false");
    assert!(
        e.contains("vips[0].icmp_too_big") && e.contains("only applies to forwarding: ipip"),
        "{e}"
    );
    let ipip_default = GOOD.replacen("forwarding: l2", "forwarding: ipip", 1);
    assert!(parse(&ipip_default).expect("valid").vips[0].icmp_too_big);
    let ipip_off = GOOD.replacen(
        "forwarding: l2",
        "forwarding: ipip\n    icmp_too_big: false",
        1,
    );
    assert!(!parse(&ipip_off).expect("valid").vips[0].icmp_too_big);
    let e = error_with(
        "forwarding: l2",
        "forwarding: ipip\n    encap_source: nowhere",
    );
    assert!(
        e.contains("vips[0].encap_source") && e.contains("not an IP address"),
        "{e}"
    );
}

#[test]
fn rejects_interface_names_that_are_paths() {
    for name in ["..", ".", "eth0/../x"] {
        let e = error_with("interface: eth0", &format!("interface: \"{name}\""));
        assert!(
            e.contains("interface") && e.contains("not an interface name"),
            "{e}"
        );
    }
}

#[test]
fn rejects_unknown_fields() {
    let e = error_with("xdp_mode: native", "xdp_mode: native\ncolour: blue");
    assert!(e.contains("unknown field `colour`"), "{e}");
    let e = error_with("weight: 1 }", "weight: 1, port: 8080 }");
    assert!(
        e.contains("vips[1].backends[0]") && e.contains("unknown field `port`"),
        "{e}"
    );
}

#[test]
fn rejects_a_vip_without_backends() {
    let text = GOOD.replace(
        "    backends:\n      - { address: 198.51.100.11, weight: 1 }\n",
        "    backends: []\n",
    );
    let e = parse(&text).expect_err("no backends").to_string();
    assert!(
        e.contains("vips[1].backends") && e.contains("at least one"),
        "{e}"
    );
}

#[test]
fn reports_every_problem_and_the_file() {
    let text = GOOD
        .replace("port: 80", "port: 0")
        .replace("weight: 1 }", "weight: 0 }");
    let e = parse(&text).expect_err("two problems");
    assert_eq!(e.problems().len(), 2, "{e}");
    assert!(e.to_string().starts_with("test.yaml: "), "{e}");
}

#[test]
fn defaults_for_health_flows_and_pinning() {
    let c = parse(GOOD).expect("valid");
    let h = &c.vips[0].health_check;
    assert_eq!((h.kind, h.port, h.path.as_str()), (HealthKind::Tcp, 80, ""));
    assert_eq!(
        (h.interval, h.timeout, h.rise, h.fall),
        (Duration::from_secs(2), Duration::from_secs(1), 2, 3)
    );
    assert_eq!(
        c.vips[1].health_check.port, 53,
        "defaults to the VIP's port"
    );
    assert_eq!(c.vips[0].on_all_down, OnAllDown::FailOpen);
    assert_eq!(c.vips[0].backends[0].state, BackendState::Active);
    assert_eq!(
        (c.max_flows, c.udp_idle_timeout),
        (DEFAULT_FLOW_TABLE_SIZE, Duration::from_secs(30))
    );
    assert_eq!(c.flow_idle_evict, Duration::from_secs(60));
    assert_eq!(c.pin_path, Path::new("/sys/fs/bpf/lb/eth0"));
    assert_eq!(c.admin_listen, "127.0.0.1:9742".parse().unwrap());
    assert_eq!(c.shutdown_grace, Duration::ZERO);
    assert_eq!(c.admin_max_connections, 64);
}

#[test]
fn accepts_a_full_health_check_and_backend_states() {
    let text = GOOD
        .replace(
            "    forwarding: l2\n    backends:\n      - { address: 198.51.100.11, weight: 100 }",
            "    forwarding: l2\n    health_check: { kind: http, port: 8080, path: /healthz, interval: 500ms, timeout: 200ms, rise: 1, fall: 4 }\n    on_all_down: drop\n    backends:\n      - { address: 198.51.100.11, weight: 100, state: drain }",
        )
        .replace("xdp_mode: native", "xdp_mode: native\npin_path: /sys/fs/bpf/x\nflow_table: { max_flows: 2048, udp_idle_timeout: 5s }");
    let c = parse(&text).expect("valid");
    let h = &c.vips[0].health_check;
    assert_eq!(
        (h.kind, h.port, h.path.as_str()),
        (HealthKind::Http, 8080, "/healthz")
    );
    assert_eq!(
        (h.interval, h.timeout, h.rise, h.fall),
        (Duration::from_millis(500), Duration::from_millis(200), 1, 4)
    );
    assert_eq!(c.vips[0].on_all_down, OnAllDown::Drop);
    assert_eq!(c.vips[0].backends[0].state, BackendState::Drain);
    assert_eq!(
        (c.max_flows, c.udp_idle_timeout, c.pin_path.as_path()),
        (2048, Duration::from_secs(5), Path::new("/sys/fs/bpf/x"))
    );
}

/// Parses GOOD with a health_check for the first VIP and returns the error.
fn health_error(check: &str) -> String {
    error_with(
        "    forwarding: l2\n    backends:\n      - { address: 198.51.100.11",
        &format!(
            "    forwarding: l2\n    health_check: {check}\n    backends:\n      - {{ address: 198.51.100.11"
        ),
    )
}

#[test]
fn rejects_nonsense_health_checks() {
    for (check, field, words) in [
        (
            "{ timeout: 2s, interval: 2s }",
            "health_check.timeout",
            "below the interval",
        ),
        ("{ timeout: 0s }", "health_check.timeout", "above 0"),
        (
            "{ interval: soon }",
            "health_check.interval",
            "not a duration",
        ),
        (
            "{ interval: 1ms, timeout: 500us }",
            "health_check.interval",
            "at least 10ms",
        ),
        ("{ rise: 0 }", "health_check.rise", "out of range"),
        ("{ fall: -1 }", "health_check.fall", "out of range"),
        ("{ port: 70000 }", "health_check.port", "not a port"),
        (
            "{ kind: tcp, path: /x }",
            "health_check.path",
            "only applies to kind: http",
        ),
        (
            "{ kind: http, path: healthz }",
            "health_check.path",
            "must start with /",
        ),
        (
            "{ kind: icmp }",
            "health_check.kind",
            "unknown variant `icmp`",
        ),
    ] {
        let e = health_error(check);
        assert!(
            e.contains(&format!("vips[0].{field}")) && e.contains(words),
            "{check}: {e}"
        );
    }
}

#[test]
fn rejects_unknown_states_policies_and_bad_flow_settings() {
    let e = error_with("weight: 1 }", "weight: 1, state: sleeping }");
    assert!(
        e.contains("state") && e.contains("unknown variant `sleeping`"),
        "{e}"
    );
    let e = error_with(
        "    forwarding: l2\n    backends:\n      - { address: 198.51.100.11",
        "    forwarding: l2\n    on_all_down: panic\n    backends:\n      - { address: 198.51.100.11",
    );
    assert!(
        e.contains("on_all_down") && e.contains("unknown variant `panic`"),
        "{e}"
    );
    let e = error_with(
        "xdp_mode: native",
        "xdp_mode: native\nflow_table: { max_flows: 10 }",
    );
    assert!(
        e.contains("flow_table.max_flows") && e.contains("out of range"),
        "{e}"
    );
    let e = error_with(
        "xdp_mode: native",
        "xdp_mode: native\nflow_table: { udp_idle_timeout: 100ms }",
    );
    assert!(
        e.contains("flow_table.udp_idle_timeout") && e.contains("at least 1s"),
        "{e}"
    );
    let e = error_with(
        "xdp_mode: native",
        "xdp_mode: native\nflow_table: { idle_evict: 10ms }",
    );
    assert!(
        e.contains("flow_table.idle_evict") && e.contains("at least 1s"),
        "{e}"
    );
    let e = error_with(
        "xdp_mode: native",
        "xdp_mode: native\nadmin: { listen: localhost }",
    );
    assert!(
        e.contains("admin.listen") && e.contains("not an address:port"),
        "{e}"
    );
    let e = error_with(
        "xdp_mode: native",
        "xdp_mode: native\nadmin: { shutdown_grace: never }",
    );
    assert!(
        e.contains("admin.shutdown_grace") && e.contains("not a duration"),
        "{e}"
    );
    let e = error_with(
        "xdp_mode: native",
        "xdp_mode: native\nadmin: { max_connections: 0 }",
    );
    assert!(e.contains("admin.max_connections"), "{e}");
    let e = error_with(
        "xdp_mode: native",
        "xdp_mode: native\npin_path: relative/dir",
    );
    assert!(
        e.contains("pin_path") && e.contains("not an absolute path"),
        "{e}"
    );
}

#[test]
fn primes() {
    let primes: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
    assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
    assert!(is_prime(65537) && is_prime(655373) && !is_prime(65535));
}

#[test]
fn enums_parse_serialize_and_print_as_the_files_words() {
    assert_eq!(
        serde_json::to_string(&OnAllDown::FailOpen).unwrap(),
        "\"fail_open\""
    );
    assert_eq!(
        serde_yaml::from_str::<OnAllDown>("fail_open").unwrap(),
        OnAllDown::FailOpen
    );
    assert_eq!(
        serde_json::to_string(&BackendState::Disabled).unwrap(),
        "\"disabled\""
    );
    assert_eq!(
        (XdpMode::Generic.as_str(), Forwarding::Ipip.as_str()),
        ("generic", "ipip")
    );
    assert_eq!(
        format!("{}/{}", HealthKind::Http, Protocol::Udp),
        "http/udp"
    );
    // Widths apply, as in the tables of `check-config` and `lb status`.
    assert_eq!(format!("{:<8}|", BackendState::Drain), "drain   |");
}

#[test]
fn a_reload_names_exactly_the_fixed_settings_it_changes() {
    let running = parse(GOOD).expect("valid").fixed();
    let changed = |from: &str, to: &str| {
        assert!(GOOD.contains(from), "test fixture lacks {from:?}");
        let new = parse(&GOOD.replacen(from, to, 1)).expect("valid");
        running.changed(&new.fixed())
    };
    assert!(changed("seed: 0x5eed", "seed: 7").is_empty(), "not fixed");
    assert!(
        changed("weight: 1 }", "weight: 2 }").is_empty(),
        "not fixed"
    );
    for (from, to, names) in [
        (
            "interface: eth0",
            "interface: eth1",
            // The default pin_path is named for the interface.
            &["interface", "pin_path"][..],
        ),
        ("xdp_mode: native", "xdp_mode: generic", &["xdp_mode"]),
        (
            "table_size: 65537",
            "table_size: 257",
            &["maglev.table_size"],
        ),
        ("xdp_mode: native", "max_vips: 4", &["max_vips"]),
        (
            "xdp_mode: native",
            "flow_table: { max_flows: 2048 }",
            &["flow_table.max_flows", "flow_table.max_flows_v6"],
        ),
        (
            "xdp_mode: native",
            "flow_table: { max_flows_v6: 2048 }",
            &["flow_table.max_flows_v6"],
        ),
        (
            "xdp_mode: native",
            "flow_table: { idle_evict: 5m }",
            &["flow_table.idle_evict"],
        ),
        ("xdp_mode: native", "pin_path: /sys/fs/bpf/x", &["pin_path"]),
        (
            "xdp_mode: native",
            "admin: { listen: \"127.0.0.1:9000\" }",
            &["admin.listen"],
        ),
    ] {
        assert_eq!(changed(from, to), names, "{to}");
    }
}

#[test]
fn the_maps_are_sized_from_the_fixed_settings() {
    let text = GOOD.replacen(
        "xdp_mode: native",
        "max_vips: 4\nflow_table: { max_flows: 2048, max_flows_v6: 4096, idle_evict: 2m }",
        1,
    );
    let c = parse(&text).expect("valid");
    assert_eq!(
        c.sizes(),
        crate::loader::Sizes {
            table_size: 65537,
            max_vips: 4,
            max_flows: 2048,
            max_flows_v6: 4096,
            idle_evict: Duration::from_secs(120),
        }
    );
    assert_eq!(c.fixed().sizes, c.sizes());
}
