//! Tests that need root never skip silently: under CI (`CI=true`) a missing
//! privilege is a failure, so a green CI run means the kernel tiers ran.

/// True when the caller may run a root-only test. Outside CI a non-root run
/// prints why the test is skipped; under CI it panics.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} needs root, and CI=true forbids skipping it");
    }
    eprintln!("SKIPPED {test}: needs root (set CI=true to make this a failure)");
    false
}
