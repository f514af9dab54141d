//! The benchmark behind `cargo xtask bench`: prints the table and writes the
//! same figures as JSON to target/bench/results.json. `--smoke` runs a few
//! iterations of everything and writes target/bench/smoke.json instead.

use std::path::PathBuf;

use anyhow::Context as _;
use lb_tests::bench::{self, Settings};

fn main() -> anyhow::Result<()> {
    let smoke = std::env::args().any(|a| a == "--smoke");
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the benchmark loads XDP programs: run it as root"
    );
    let settings = if smoke {
        Settings::smoke()
    } else {
        Settings::full()
    };
    let report = bench::run(&settings)?;
    print!("{}", bench::render(&report));
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("bench");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(if smoke { "smoke.json" } else { "results.json" });
    std::fs::write(&file, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", file.display()))?;
    println!("\nWrote {}", file.display());
    Ok(())
}
