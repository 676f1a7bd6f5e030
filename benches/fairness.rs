//! What a flooding device leaves the others: the `flood` guest reads its disk in 64 KiB
//! requests, one at a time, on the BSP, while its AP keeps virtio-rng's 256-entry queue full
//! (4 KiB per chain). Disk throughput is the difference between a long and a short read run
//! (which cancels start-up, and the flood's own start): alone, beside an AP that only spins,
//! beside the flood, and with the reading vCPU itself keeping the rng queue full before each
//! request (two busy threads on two CPUs: only the VMM thread is shared).
//! Run with `cargo bench --bench fairness`; `BENCH_RUNS=N` sets the rounds.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SHORT_MIB: u64 = 16;
const LONG_MIB: u64 = 144;

fn wall(guest: &Path, disk: &Path, flood: &str, mib: u64) -> Duration {
    let start = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["run", "--kernel"])
        .arg(guest)
        .args(["--vcpus", "2", "--disk"])
        .arg(disk)
        .args([
            "--cmdline",
            &format!("flood={flood} work=blk blk_mib={mib}"),
            "--console",
            "none",
            "--log-level",
            "error",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("spawn");
    assert!(status.success(), "flood={flood} blk_mib={mib}: {status}");
    start.elapsed()
}

fn main() {
    let Some(runs) = common::rounds("fairness", 5) else {
        return;
    };
    let guest = common::guest("flood");
    let disk = std::env::temp_dir().join(format!("bulkhead-fairness-{}.img", std::process::id()));
    std::fs::write(&disk, vec![0x5au8; 16 << 20]).expect("disk");
    // The AP spinning on its own shows what sharing the host's CPUs costs, whatever the VMM
    // does; the flood adds the competition for the VMM thread.
    let mut rates: Vec<(&str, &str, Vec<f64>)> = vec![
        ("alone", "none", Vec::new()),
        ("AP spins", "spin", Vec::new()),
        ("rng flood", "rng", Vec::new()),
        ("rng flood from the reading vCPU", "rng-bsp", Vec::new()),
    ];
    for _ in 0..runs {
        for (_, flood, out) in rates.iter_mut() {
            let short = wall(&guest, &disk, flood, SHORT_MIB);
            let long = wall(&guest, &disk, flood, LONG_MIB);
            let secs = long.saturating_sub(short).as_secs_f64();
            out.push((LONG_MIB - SHORT_MIB) as f64 / secs);
        }
    }
    let _ = std::fs::remove_file(&disk);
    let medians: Vec<f64> = rates
        .iter()
        .map(|(_, _, v)| common::median(v.clone()))
        .collect();
    for ((name, _, _), m) in rates.iter().zip(&medians) {
        println!("disk reads, {name:<32} {m:>8.1} MiB/s (64 KiB requests, median of {runs})");
    }
    println!(
        "beside the AP's flood the disk keeps {:.0}% of its throughput alone, {:.0}% of it beside a spinning vCPU",
        100.0 * medians[2] / medians[0],
        100.0 * medians[2] / medians[1]
    );
    println!(
        "with the flood from its own vCPU (no CPU overcommitted) it keeps {:.0}%",
        100.0 * medians[3] / medians[0]
    );
}
