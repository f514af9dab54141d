//! The `lb` binary's command-line contract: exit codes and messages.

use std::process::Command;

fn lb(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(args)
        .output()
        .expect("run lb");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn config_path(name: &str) -> String {
    format!("{}/../config/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_config_prints_vips_backends_and_slot_shares() {
    let (code, out, err) = lb(&["check-config", &config_path("demo.yaml")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("VIP web 10.77.0.100:80/tcp"), "{out}");
    assert!(out.contains("VIP echo-udp 10.77.0.100:5353/udp"), "{out}");
    // Weights 1:1:2 give 25% / 25% / 50% of 65537 slots (to one slot).
    let row = |addr: &str| -> Vec<String> {
        out.lines()
            .find(|l| l.trim_start().starts_with(addr))
            .unwrap_or_else(|| panic!("no row for {addr}: {out}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(row("10.77.0.11")[1], "active");
    assert_eq!(row("10.77.0.11")[4], "25.00%");
    assert_eq!(row("10.77.0.13")[4], "50.00%");
    assert_eq!(row("10.77.0.13")[5], "50.00%");
}

#[test]
fn check_config_lists_draining_backends_without_slots() {
    let (code, out, err) = lb(&["check-config", &config_path("example.yaml")]);
    assert_eq!(code, 0, "{err}");
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.contains("198.51.100.13"))
        .expect("drained backend listed")
        .split_whitespace()
        .collect();
    assert_eq!((row[1], row[3], row[4]), ("drain", "0", "0.00%"), "{out}");
}

#[test]
fn a_bad_config_exits_64_naming_the_field_and_file() {
    let dir = std::env::temp_dir().join(format!("lb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    let text = std::fs::read_to_string(config_path("example.yaml"))
        .unwrap()
        .replace("65537", "65536");
    std::fs::write(&bad, text).unwrap();
    for cmd in [
        vec!["check-config", bad.to_str().unwrap()],
        vec!["run", "--config", bad.to_str().unwrap()],
        vec!["status", "--config", bad.to_str().unwrap()],
        vec!["bgp-feed", "--config", bad.to_str().unwrap()],
    ] {
        let (code, out, err) = lb(&cmd);
        assert_eq!(code, 64, "{cmd:?}: {out}{err}");
        assert!(
            err.contains("Invalid configuration") && err.contains("bad.yaml"),
            "{err}"
        );
        assert!(
            err.contains("maglev.table_size") && err.contains("not prime"),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_file_exits_64() {
    let (code, _, err) = lb(&["check-config", "/nonexistent/lb.yaml"]);
    assert_eq!(code, 64);
    assert!(
        err.contains("/nonexistent/lb.yaml") && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn run_rejects_an_interface_that_does_not_exist() {
    let dir = std::env::temp_dir().join(format!("lb-cli-if-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("noif.yaml");
    let text = std::fs::read_to_string(config_path("example.yaml"))
        .unwrap()
        .replace("interface: eth0", "interface: nosuchif0");
    std::fs::write(&cfg, text).unwrap();
    let (code, _, err) = lb(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("interface") && err.contains("`nosuchif0` does not exist"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_config_against_the_running_config_says_what_moves() {
    let dir = std::env::temp_dir().join(format!("lb-cli-against-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let old = std::fs::read_to_string(config_path("demo.yaml")).unwrap();
    // demo.yaml's web VIP without its third backend.
    let new = old.replacen("      - { address: 10.77.0.13, weight: 2 }\n", "", 1);
    assert_ne!(new, old, "demo.yaml changed shape");
    let (old_path, new_path) = (dir.join("old.yaml"), dir.join("new.yaml"));
    std::fs::write(&old_path, &old).unwrap();
    std::fs::write(&new_path, &new).unwrap();
    let (code, out, err) = lb(&[
        "check-config",
        new_path.to_str().unwrap(),
        "--against",
        old_path.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.contains("VIP web:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("removed 10.77.0.13"), "{line}");
    assert!(
        line.contains("established flows of 10.77.0.13 re-placed"),
        "{line}"
    );

    std::fs::write(&old_path, "interface: [").unwrap();
    let (code, _, err) = lb(&[
        "check-config",
        new_path.to_str().unwrap(),
        "--against",
        old_path.to_str().unwrap(),
    ]);
    assert_eq!(code, 64, "an invalid OLD is a bad config: {err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
