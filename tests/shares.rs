//! `--share` on this host's own KVM, driven by a hostile test guest (the virtiofs_flood attack
//! guest): the share's virtiofsd answers a real FUSE_INIT, and malformed requests, a
//! descriptor outside RAM and a flood of notifications end neither the VMM nor the host's
//! side; the VM ends with the guest's own status and the backend is gone. Jailed too.

mod common;

use std::time::Duration;

use common::{bulkhead_with_limit, guest, kvm_available, root_and_kvm_available, scratch};

/// True when a virtiofsd is there to serve shares (under CI=true it must be: .ci/run installs
/// it).
fn virtiofsd_available(test: &str) -> bool {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("virtiofsd").is_file()))
        .unwrap_or(false);
    if on_path || std::path::Path::new("/usr/libexec/virtiofsd").is_file() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: no virtiofsd (scripts/setup installs it), and CI=true forbids skipping"
    );
    eprintln!("SKIPPED {test}: no virtiofsd (scripts/setup installs it)");
    false
}

/// Runs the flood guest with one read-only share, with `extra` flags; returns the run.
fn flood(test: &str, extra: &[&str]) -> common::Run {
    let dir = scratch(test);
    let share = dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("file"), b"host file").unwrap();
    let share_arg = format!("{}:fs", share.display());
    let kernel = guest("attacks/virtiofs_flood");
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--share",
        &share_arg,
        "--timeout",
        "60",
    ];
    args.extend_from_slice(extra);
    let run = bulkhead_with_limit(&args, Duration::from_secs(90));
    // The guest's writes never reach a read-only share.
    let names: Vec<_> = std::fs::read_dir(&share).unwrap().flatten().collect();
    assert_eq!(names.len(), 1, "the share changed: {names:?}");
    run
}

fn assert_survived(run: &common::Run) {
    assert_eq!(
        run.status, 0,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout, run.stderr
    );
    for line in [
        "attack: fuse init used 80 error 0",
        // ENOSYS for an opcode nobody knows.
        "attack: unknown opcode used 16 error 38",
        "attack: flooded ",
        "attack: done",
    ] {
        assert!(
            run.stdout.contains(line),
            "missing {line:?} in:\n{}",
            run.stdout
        );
    }
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    // The backend ended with the VM, and the supervisor reaped it.
    assert!(
        !run.stderr.contains("did not end with the VM"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("guest exited with status 0"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_guest_flooding_its_share_with_malformed_requests_ends_in_order_and_leaves_no_backend() {
    let test =
        "a_guest_flooding_its_share_with_malformed_requests_ends_in_order_and_leaves_no_backend";
    if !kvm_available(test) || !virtiofsd_available(test) {
        return;
    }
    assert_survived(&flood(test, &[]));
}

#[test]
fn a_jailed_vm_gets_its_share_and_the_flood_ends_in_order() {
    let test = "a_jailed_vm_gets_its_share_and_the_flood_ends_in_order";
    if !root_and_kvm_available(test) || !virtiofsd_available(test) {
        return;
    }
    let jails = scratch(&format!("{test}-jails"));
    let jails = jails.to_str().unwrap().to_string();
    assert_survived(&flood(test, &["--jail", "--jail-dir", &jails]));
}
