//! Project tasks: `cargo xtask setup | test | demo | bench`.
//!
//! `setup` installs what a fresh machine lacks and is quick when nothing is
//! missing; `test` and `demo` run it first, so each is one command on a fresh
//! machine.

use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// The nightly that builds the eBPF crate. Its LLVM (22) must match
/// bpf-linker 0.10.0's (later bpf-linker releases need LLVM 23).
/// lb-userspace/build.rs names it too.
const NIGHTLY: &str = "nightly-2026-05-20";
const BPF_LINKER_VERSION: &str = "0.10.0";
/// Debian packages the kernel-tier tests and the demo call: `ip`, `ethtool`,
/// `sysctl`, `nsenter`, Prometheus (server and promtool) for the metrics
/// tests, and the BGP daemons of the anycast tests (FRR as the router,
/// ExaBGP on each load balancer).
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "procps",
    "util-linux",
    "prometheus",
    "frr",
    "exabgp",
];

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the pinned nightly, bpf-linker and the Debian packages.
    Setup,
    /// Set up, check formatting and lints, build, and run every test tier
    /// (root tiers need root).
    Test,
    /// Set up, build, and run the demo topology in network namespaces.
    Demo,
    /// Set up, build (release), and run the benchmark; writes
    /// target/bench/results.json.
    Bench,
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup(),
        Task::Test => setup().and_then(|()| test()),
        Task::Demo => setup().and_then(|()| demo()),
        Task::Bench => setup().and_then(|()| bench()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn setup() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]));
    if !installed.is_some_and(|c| c.lines().any(|l| l.starts_with("rust-src"))) {
        eprintln!("setup: installing {NIGHTLY} with rust-src");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }

    // `cargo xtask test` runs both before any test.
    let components = output(Command::new("rustup").args(["component", "list", "--installed"]))
        .unwrap_or_default();
    for component in ["rustfmt", "clippy"] {
        if !components.lines().any(|l| l.starts_with(component)) {
            eprintln!("setup: installing the {component} component");
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }

    let linker = output(Command::new("bpf-linker").arg("--version"));
    if !linker.is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        eprintln!("setup: installing bpf-linker {BPF_LINKER_VERSION}");
        run(Command::new("cargo").arg(format!("+{NIGHTLY}")).args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ]))?;
    }

    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "missing Debian packages {missing:?}; install them as root: apt-get install {}",
                missing.join(" ")
            );
        }
        eprintln!("setup: installing {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|u| u.trim() == "0")
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn test() -> anyhow::Result<()> {
    // Style first: an unformatted file or a lint fails fast, before the
    // minutes of kernel tiers.
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // The end-to-end tests start the `lb` binary, which `cargo test` does not
    // build for another package's tests.
    run(cargo().args(["build", "--package", "lb-userspace", "--bins"]))?;
    // Default members: every crate but lb-ebpf, which only builds for BPF.
    run(cargo().args(["test", "--no-fail-fast"]))
}

fn demo() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo creates network namespaces and attaches XDP programs: run it as root");
    }
    run(cargo().args(["build", "--package", "lb-userspace", "--bins"]))?;
    run(cargo().args(["run", "--quiet", "--package", "lb-tests", "--bin", "demo"]))
}

fn bench() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmark loads XDP programs and creates network namespaces: run it as root");
    }
    run(cargo().args([
        "run",
        "--release",
        "--quiet",
        "--package",
        "lb-tests",
        "--bin",
        "bench",
    ]))
}
