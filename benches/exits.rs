//! The cost of one port-I/O exit through bulkhead: the `exit_storm` attack guest reads the
//! I/O delay port N times, and the time per exit is the wall-time difference between a long
//! and a short run divided by the difference in N (which cancels start-up and teardown).
//! Run with `cargo bench --bench exits`; `BENCH_RUNS=N` sets the rounds.
//!
//! `BULKHEAD_COMPARE=PATH` also measures another bulkhead binary (an earlier commit, without
//! the telemetry, say), alternating run by run, and prints the ratio. `BULKHEAD_EXTRA="..."`
//! adds flags to this build's runs (`--metrics-file /tmp/m.prom --alerts /tmp/a.jsonl` to
//! measure with every output on).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SHORT: u64 = 20_000;
const LONG: u64 = 120_000;

fn wall(binary: &str, guest: &Path, n: u64, extra: &[String]) -> Duration {
    let start = Instant::now();
    let status = Command::new(binary)
        .args(["run", "--kernel"])
        .arg(guest)
        .args([
            "--cmdline",
            &format!("storm={n}"),
            "--console",
            "none",
            "--log-level",
            "error",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("spawn");
    assert!(status.success(), "{binary}: {status}");
    start.elapsed()
}

fn main() {
    let Some(runs) = common::rounds("exits", 7) else {
        return;
    };
    let guest = common::guest("attacks/exit_storm");
    let this = env!("CARGO_BIN_EXE_bulkhead").to_string();
    let extra: Vec<String> = std::env::var("BULKHEAD_EXTRA")
        .map(|e| e.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let mut builds = vec![("this build", this, extra)];
    if let Ok(other) = std::env::var("BULKHEAD_COMPARE") {
        builds.push(("compared build", other, Vec::new()));
    }
    let mut per_exit: Vec<Vec<f64>> = builds.iter().map(|_| Vec::new()).collect();
    for _ in 0..runs {
        for ((_, binary, extra), out) in builds.iter().zip(per_exit.iter_mut()) {
            let short = wall(binary, &guest, SHORT, extra);
            let long = wall(binary, &guest, LONG, extra);
            let us = long.saturating_sub(short).as_secs_f64() * 1e6 / (LONG - SHORT) as f64;
            out.push(us);
        }
    }
    let medians: Vec<f64> = per_exit.into_iter().map(common::median).collect();
    for ((name, binary, extra), m) in builds.iter().zip(&medians) {
        println!(
            "{name:<16} {m:>6.2} us per port-I/O exit (median of {runs}; {binary} {})",
            extra.join(" ")
        );
    }
    if medians.len() == 2 {
        println!("ratio this/compared: {:.3}", medians[0] / medians[1]);
    }
}
