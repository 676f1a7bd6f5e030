//! Every vCPU given with --vcpus is listed in the MP table, the ACPI MADT and CPUID, starts,
//! and checks in; CPUID hides nested virtualization.

mod common;

use common::{kvm_available, run_guest};

#[test]
fn every_vcpu_checks_in_through_the_serial_port() {
    if !kvm_available("every_vcpu_checks_in_through_the_serial_port") {
        return;
    }
    for vcpus in [1u32, 2, 4] {
        let run = run_guest("smp", &["--vcpus", &vcpus.to_string()]);
        assert_eq!(
            run.status, 0,
            "vcpus {vcpus}: stdout {}\nstderr {}",
            run.stdout, run.stderr
        );
        assert!(
            run.stdout
                .contains(&format!("smp: MP table lists {vcpus} processors")),
            "stdout: {}",
            run.stdout
        );
        assert!(
            run.stdout
                .contains(&format!("smp: MADT lists the same {vcpus} processors")),
            "stdout: {}",
            run.stdout
        );
        assert!(
            run.stdout
                .contains("cpuid: nested virtualization hidden, hypervisor bit set"),
            "stdout: {}",
            run.stdout
        );
        for id in 0..vcpus {
            assert_eq!(
                run.stdout_count(&format!("vcpu {id} checked in")),
                1,
                "stdout: {}",
                run.stdout
            );
        }
        assert!(run
            .stdout
            .contains(&format!("smp: all {vcpus} vcpus checked in")));
    }
}

#[test]
fn without_acpi_the_mp_table_alone_brings_up_every_vcpu() {
    if !kvm_available("without_acpi_the_mp_table_alone_brings_up_every_vcpu") {
        return;
    }
    let run = run_guest("smp", &["--vcpus", "2", "--no-acpi"]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert!(run.stdout.contains("smp: no ACPI tables"), "{}", run.stdout);
    assert!(run.stdout.contains("smp: all 2 vcpus checked in"));
}
