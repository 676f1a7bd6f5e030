//! Fair sharing of the VMM thread: a guest that floods one queue can not hold back the rest
//! of the VM, and long requests are served in pieces.

mod common;

use std::time::Duration;

use common::{bulkhead_with_limit, guest, kvm_available, observed, scratch};

/// A disk whose every 32-bit word holds its own byte offset, which the flood guest checks.
fn offset_disk(path: &std::path::Path, mib: usize) {
    let bytes: Vec<u8> = (0..(mib << 20) as u32)
        .step_by(4)
        .flat_map(u32::to_le_bytes)
        .collect();
    std::fs::write(path, bytes).unwrap();
}

/// The number after `flood: the device used ` on the guest's console.
fn chains_seen_by_guest(stdout: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("flood: the device used "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the guest did not report its chains: {stdout}"))
}

#[test]
fn a_guest_flooding_a_disk_from_one_vcpu_can_not_hold_back_its_exit_from_another() {
    if !kvm_available(
        "a_guest_flooding_a_disk_from_one_vcpu_can_not_hold_back_its_exit_from_another",
    ) {
        return;
    }
    let dir = scratch("flood-exit");
    let disk = dir.join("disk.img");
    offset_disk(&disk, 4);
    let (metrics, alerts) = (dir.join("vm.prom"), dir.join("alerts.jsonl"));
    let kernel = guest("flood");
    // The AP keeps a 256-entry queue of 2 MiB reads full; the BSP waits for 50 of them, checks
    // the data and writes the exit port. A device that serves "while there is more" never
    // returns to the event loop, and the VM would run until the limit.
    let run = bulkhead_with_limit(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--vcpus",
            "2",
            "--disk",
            disk.to_str().unwrap(),
            "--cmdline",
            "flood=blk chains=50",
            "--metrics-file",
            metrics.to_str().unwrap(),
            "--alerts",
            alerts.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    let seen = observed(run, &metrics, &alerts);
    let run = &seen.run;
    assert_eq!(
        run.status, 0,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    assert!(
        run.stdout.contains("flood: the AP floods virtio-blk"),
        "{}",
        run.stdout
    );
    // Each 2 MiB request was moved in pieces, over several wakeups, to the right places.
    assert!(
        run.stdout
            .contains("flood: the 2 MiB read holds the right bytes"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("flood: exiting"), "{}", run.stdout);
    let device = [("device", "virtio-blk0")];
    let requests = seen
        .metrics
        .value("bulkhead_virtio_requests_total", &device);
    let yields = seen.metrics.value("bulkhead_virtio_yields_total", &device);
    assert!(requests >= chains_seen_by_guest(&run.stdout), "{requests}");
    // Every request needs more wakeups than one: 2 MiB is eight times what one may move.
    assert!(
        yields >= requests,
        "{yields} yields for {requests} requests"
    );
    assert!(
        seen.alerts.is_empty(),
        "a flood is not an attack: {:?}",
        seen.alerts
    );
}

/// Runs the flood guest with `cmdline` and `extra` flags; the run and its metrics.
fn flood_run(dir: &std::path::Path, cmdline: &str, extra: &[&str]) -> common::Observed {
    let (metrics, alerts) = (dir.join("vm.prom"), dir.join("alerts.jsonl"));
    let _ = std::fs::remove_file(&metrics);
    let kernel = guest("flood");
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--metrics-file",
        metrics.to_str().unwrap(),
        "--alerts",
        alerts.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let seen = observed(
        bulkhead_with_limit(&args, Duration::from_secs(60)),
        &metrics,
        &alerts,
    );
    assert_eq!(
        seen.run.status, 0,
        "stdout: {}\nstderr: {}",
        seen.run.stdout, seen.run.stderr
    );
    seen
}

/// Asserts `measured` is within 10% of `limit`.
fn within_ten_percent(what: &str, measured: f64, limit: f64) {
    let ratio = measured / limit;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "{what}: measured {measured:.1}, limit {limit:.1} ({:.0}%)",
        ratio * 100.0
    );
    eprintln!(
        "{what}: measured {measured:.1}, limit {limit:.1} ({:.1}%)",
        ratio * 100.0
    );
}

#[test]
fn disk_and_entropy_rate_limits_hold_the_guest_to_within_ten_percent_of_the_limit() {
    if !kvm_available(
        "disk_and_entropy_rate_limits_hold_the_guest_to_within_ten_percent_of_the_limit",
    ) {
        return;
    }
    let dir = scratch("rate-limits");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 16 << 20]).unwrap();
    let disk = disk.to_str().unwrap().to_string();

    // Each guest times its work from a mark after the full bucket it starts with is spent and
    // the limit holds it back, so what it measures is the limit alone.
    // Bandwidth: 8 MiB/s as a 1 MiB bucket refilled every 125 ms: the first 16 requests of
    // 64 KiB empty it; the guest times the 240 after the 32nd.
    let read = "flood=none work=blk blk_mib=17 mark=32";
    let limited = format!("{disk},bw_size=1048576,bw_refill_time=125");
    let run = flood_run(&dir, read, &["--disk", &limited]);
    let (requests, secs) = after_the_mark(&run);
    within_ten_percent("disk bandwidth, MiB/s", requests as f64 / 16.0 / secs, 8.0);
    let throttled = [("device", "virtio-blk0")];
    assert!(
        run.metrics
            .value("bulkhead_virtio_throttled_total", &throttled)
            > 0
    );

    // Operations: 100 requests a second, with 50 more once: 150 go at once; the guest times
    // the 102 after the 170th.
    let read = "flood=none work=blk blk_mib=17 mark=170";
    let limited = format!("{disk},ops_size=100,ops_refill_time=1000,ops_one_time_burst=50");
    let run = flood_run(&dir, read, &["--disk", &limited]);
    let (requests, secs) = after_the_mark(&run);
    within_ten_percent("disk requests per second", requests as f64 / secs, 100.0);

    // Entropy: 256 KiB/s as a 64 KiB bucket refilled every 250 ms, against the AP's flood of
    // 4 KiB requests: the first 16 empty it; the guest times the 168 after the 32nd.
    let run = flood_run(
        &dir,
        "flood=rng chains=200 mark=32",
        &[
            "--vcpus",
            "2",
            "--rng-limit",
            "bw_size=65536,bw_refill_time=250",
        ],
    );
    let (chains, secs) = after_the_mark(&run);
    within_ten_percent("entropy, KiB/s", chains as f64 * 4.0 / secs, 256.0);
}

/// What the flood guest timed itself after its mark: (units, seconds).
fn after_the_mark(run: &common::Observed) -> (u64, f64) {
    let line = run
        .run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("flood: after the mark "))
        .unwrap_or_else(|| panic!("no timing in {}", run.run.stdout));
    let words: Vec<&str> = line.split_whitespace().collect();
    let units: u64 = words[0].parse().unwrap();
    let ns: u64 = words[3].parse().unwrap();
    (units, ns as f64 / 1e9)
}
