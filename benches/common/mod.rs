//! What the benchmarks share: how many rounds to run, and the test guests they boot.

#![allow(dead_code)] // each bench uses part of this.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Rounds for `bench` (`BENCH_RUNS`, else `default`) under `cargo bench`, one under `cargo test
/// --benches` (a smoke test); None, with the reason printed, when /dev/kvm is missing.
pub fn rounds(bench: &str, default: usize) -> Option<usize> {
    if !Path::new("/dev/kvm").exists() {
        println!("{bench} bench skipped: /dev/kvm missing");
        return None;
    }
    // `cargo bench` passes --bench; `cargo test --benches` does not.
    if !std::env::args().any(|a| a == "--bench") {
        return Some(1);
    }
    Some(
        std::env::var("BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// Builds the test guests; returns the path of the guest `name` (e.g. `attacks/exit_storm`).
pub fn guest(name: &str) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = manifest.join("target/guest-images");
    let ok = Command::new("make")
        .args(["-s", "-C"])
        .arg(manifest.join("guest-images"))
        .arg(format!("OUT={}", out.display()))
        .status()
        .expect("make")
        .success();
    assert!(ok, "building the test guests failed");
    out.join(name)
}

/// The median of `v` (which must not be empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
