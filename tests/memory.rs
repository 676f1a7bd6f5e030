//! Each VM gets its own RAM, zeroed at boot.

mod common;

use common::{kvm_available, run_guest};

#[test]
fn guest_ram_reads_zero_at_boot_and_keeps_what_the_guest_writes() {
    if !kvm_available("guest_ram_reads_zero_at_boot_and_keeps_what_the_guest_writes") {
        return;
    }
    let run = run_guest("memcheck", &["--mem-mib", "48"]);
    assert_eq!(
        run.status, 0,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    // 48 MiB less the guest's image and bulkhead's boot pages: most of it was sampled.
    let pages: u64 = run
        .stdout
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output: {}", run.stdout));
    assert!(
        pages > (48 << 20) / 4096 - 300,
        "only {pages} pages checked"
    );
}

#[test]
fn memory_size_given_is_the_memory_the_guest_sees() {
    if !kvm_available("memory_size_given_is_the_memory_the_guest_sees") {
        return;
    }
    let count = |mib: &str| -> u64 {
        let run = run_guest("memcheck", &["--mem-mib", mib]);
        assert_eq!(run.status, 0, "stderr: {}", run.stderr);
        run.stdout
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let (small, large) = (count("16"), count("32"));
    assert_eq!(large - small, (16 << 20) / 4096);
}
