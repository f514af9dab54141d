//! Builds the XDP programs (lb-ebpf) with the pinned nightly and bpf-linker,
//! so `cargo build` produces one `lb` binary with the object embedded.

use anyhow::{Context as _, anyhow};

/// Must match `xtask`'s `NIGHTLY`, which installs it (its LLVM matches
/// bpf-linker 0.10.0's).
const NIGHTLY: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("no parent of {manifest_dir}"))?
        .join("lb-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {root:?}"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(NIGHTLY),
    )
}
