//! The benign suite: the test guests in their honest modes raise no alert at Notice or above,
//! under the default policy, so an alert means something. (The `hostile` mode and the attack
//! corpus must raise them; they are tested elsewhere. The net and vsock guests' clean runs are
//! in virtio.rs, beside the host side they need.)

mod common;

use common::{kvm_available, run_observed, scratch, Observed};

fn assert_silent(what: &str, o: &Observed) {
    let loud = o.alerts_at_least("Notice", &[]);
    assert!(
        loud.is_empty(),
        "{what} raised alerts: {loud:?}\nstdout: {}\nstderr: {}",
        o.run.stdout,
        o.run.stderr
    );
    assert_eq!(o.metrics.sum("bulkhead_alerts_total", &[]), 0, "{what}");
    assert_eq!(
        o.metrics.sum("bulkhead_alerts_suppressed_total", &[]),
        0,
        "{what}"
    );
    assert_eq!(
        o.metrics
            .sum("bulkhead_telemetry_events_invalid_total", &[]),
        0,
        "{what}"
    );
}

#[test]
fn honest_guests_raise_no_alert() {
    if !kvm_available("honest_guests_raise_no_alert") {
        return;
    }
    let cases: &[(&str, &[&str], i32)] = &[
        ("hello", &["--cmdline", "exit=0"], 0),
        ("hello-pvh", &["--cmdline", "exit=0"], 0),
        ("hello.bzImage", &["--cmdline", "exit=0"], 0),
        ("exitcodes", &["--cmdline", "mode=exit exit=5"], 5),
        ("exitcodes", &["--cmdline", "mode=reset"], 0),
        ("exitcodes", &["--cmdline", "mode=halt", "--vcpus", "2"], 80),
        ("exitcodes", &["--cmdline", "mode=unassigned"], 0),
        ("memcheck", &[], 0),
        ("smp", &["--vcpus", "4"], 0),
        ("virtio", &["--cmdline", "mode=rng"], 0),
    ];
    for (i, (guest, args, status)) in cases.iter().enumerate() {
        let what = format!("{guest} {args:?}");
        let o = run_observed(&format!("benign-{i}"), guest, args);
        assert_eq!(o.run.status, *status, "{what}: {}", o.run.stderr);
        assert_silent(&what, &o);
    }
}

#[test]
fn an_honest_block_driver_raises_no_alert() {
    if !kvm_available("an_honest_block_driver_raises_no_alert") {
        return;
    }
    let dir = scratch("benign-blk");
    let disk = dir.join("disk.img");
    let bytes: Vec<u8> = (0..128u8).flat_map(|n| [n; 512]).collect();
    std::fs::write(&disk, bytes).unwrap();
    let arg = format!("{},id=data", disk.display());
    let o = run_observed(
        "benign-blk-run",
        "virtio",
        &[
            "--disk",
            &arg,
            "--cmdline",
            "mode=blk clean=1 expect_id=data",
        ],
    );
    assert_eq!(o.run.status, 0, "{}", o.run.stdout);
    assert_silent("virtio mode=blk clean=1", &o);
    assert_eq!(o.metrics.total_refusals("virtio-blk0"), 0);
    assert!(
        o.metrics.value(
            "bulkhead_virtio_requests_total",
            &[("device", "virtio-blk0")]
        ) > 0
    );
}
