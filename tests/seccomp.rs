//! Each thread's seccomp filter traps a forbidden system call: proved by making the real
//! threads misbehave through a debug-build test hook, not by reading the JSON.

mod common;

use common::{kvm_available, run_guest, run_observed, Observed};

/// The supervisor saw the VM process die by SIGSYS and reported it once, with the thread and
/// system call the VM process handed over.
fn assert_one_seccomp_alert(o: &Observed, thread: &str) {
    assert_one_seccomp_alert_for(o, thread, 41);
}

/// [`assert_one_seccomp_alert`] for system call `nr`.
fn assert_one_seccomp_alert_for(o: &Observed, thread: &str, nr: u64) {
    assert_eq!(o.alerts.len(), 1, "{:?}", o.alerts);
    let a = &o.alerts[0];
    assert_eq!(a["rule"], "seccomp_violation");
    assert_eq!(a["priority"], "Critical");
    assert_eq!(a["output_fields"]["thread"], thread);
    assert_eq!(a["output_fields"]["syscall"], nr);
    assert_eq!(
        o.metrics
            .value("bulkhead_vm_exit", &[("reason", "seccomp_violation")]),
        1
    );
}

#[test]
fn vcpu_thread_forbidden_syscall_is_trapped_and_reported() {
    if !kvm_available("vcpu_thread_forbidden_syscall_is_trapped_and_reported") {
        return;
    }
    let o = run_observed(
        "seccomp-vcpu",
        "hello",
        &[
            "--test-hook",
            "vcpu-forbidden-syscall",
            "--cmdline",
            "exit=3",
        ],
    );
    assert_one_seccomp_alert(&o, "vcpu0");
    let run = o.run;
    assert_eq!(run.status, 159, "stderr: {}", run.stderr);
    assert!(
        run.stderr
            .contains("seccomp violation: thread vcpu0 made forbidden system call 41"),
        "stderr: {}",
        run.stderr
    );
    assert!(
        !run.stdout.contains("hello from"),
        "guest ran after the violation: {}",
        run.stdout
    );
}

#[test]
fn vmm_thread_forbidden_syscall_is_trapped_and_reported() {
    if !kvm_available("vmm_thread_forbidden_syscall_is_trapped_and_reported") {
        return;
    }
    let o = run_observed(
        "seccomp-vmm",
        "hello",
        &["--test-hook", "vmm-forbidden-syscall"],
    );
    assert_one_seccomp_alert(&o, "vmm");
    let run = o.run;
    assert_eq!(run.status, 159, "stderr: {}", run.stderr);
    assert!(
        run.stderr
            .contains("seccomp violation: thread vmm made forbidden system call 41"),
        "stderr: {}",
        run.stderr
    );
}

#[test]
fn without_seccomp_the_same_syscall_goes_through_and_a_warning_is_printed() {
    if !kvm_available("without_seccomp_the_same_syscall_goes_through_and_a_warning_is_printed") {
        return;
    }
    let run = run_guest(
        "hello",
        &[
            "--test-hook",
            "vcpu-forbidden-syscall",
            "--no-seccomp",
            "--cmdline",
            "exit=3",
        ],
    );
    assert_eq!(run.status, 3, "stderr: {}", run.stderr);
    assert!(
        run.stderr.contains("seccomp filters are OFF"),
        "stderr: {}",
        run.stderr
    );
}

#[test]
fn a_normal_run_makes_no_forbidden_syscall_on_any_thread() {
    if !kvm_available("a_normal_run_makes_no_forbidden_syscall_on_any_thread") {
        return;
    }
    for (guest, args) in [
        ("hello", vec!["--cmdline", "exit=0"]),
        ("smp", vec!["--vcpus", "4"]),
        ("exitcodes", vec!["--cmdline", "mode=halt", "--vcpus", "2"]),
        (
            "exitcodes",
            vec!["--cmdline", "mode=unassigned", "--log-level", "trace"],
        ),
    ] {
        let run = run_guest(guest, &args);
        assert!(
            !run.stderr.contains("seccomp violation"),
            "{guest}: {}",
            run.stderr
        );
        assert_ne!(run.status, 159, "{guest}");
    }
}

#[test]
fn a_vcpu_thread_can_not_signal_its_supervisor() {
    if !kvm_available("a_vcpu_thread_can_not_signal_its_supervisor") {
        return;
    }
    // The vCPU thread tries tgkill(supervisor, SIGKILL): its filter allows tgkill on its own
    // process only, so the VM process dies by SIGSYS and the supervisor lives to report it.
    let o = run_observed(
        "seccomp-signal-parent",
        "hello",
        &["--test-hook", "signal-supervisor"],
    );
    assert_eq!(o.run.status, 159, "{}", o.run.stderr);
    assert_eq!(o.alerts.len(), 1, "{:?}", o.alerts);
    assert_eq!(o.alerts[0]["output_fields"]["syscall"], libc::SYS_tgkill);
    // Without the filters the same call kills the supervisor: the filter is what stops it.
    let run = run_guest(
        "hello",
        &["--test-hook", "signal-supervisor", "--no-seccomp"],
    );
    assert_eq!(run.status, 137, "{}", run.stderr);
}

#[test]
fn an_aborting_thread_is_reported_as_a_crash_not_as_a_seccomp_violation() {
    if !kvm_available("an_aborting_thread_is_reported_as_a_crash_not_as_a_seccomp_violation") {
        return;
    }
    // abort() raises SIGABRT on its own thread with tgkill, which every filter allows.
    let o = run_observed("seccomp-abort", "hello", &["--test-hook", "vcpu-abort"]);
    assert_eq!(o.run.status, 128 + libc::SIGABRT, "{}", o.run.stderr);
    assert!(
        o.run.stderr.contains("killed by signal 6"),
        "{}",
        o.run.stderr
    );
    assert!(o.alerts.is_empty(), "{:?}", o.alerts);
    assert_eq!(
        o.metrics.value("bulkhead_vm_exit", &[("reason", "killed")]),
        1
    );
}

#[test]
fn a_panicking_vcpu_thread_ends_the_vm_and_is_counted_as_a_vmm_panic_and_a_vcpu_failure() {
    if !kvm_available(
        "a_panicking_vcpu_thread_ends_the_vm_and_is_counted_as_a_vmm_panic_and_a_vcpu_failure",
    ) {
        return;
    }
    let o = run_observed("seccomp-panic", "hello", &["--test-hook", "vcpu-panic"]);
    // 85: a vCPU thread failed.
    assert_eq!(o.run.status, 85, "{}", o.run.stderr);
    assert!(o.run.stderr.contains("vcpu-panic"), "{}", o.run.stderr);
    assert_eq!(o.metrics.value("bulkhead_vmm_panics_total", &[]), 1);
    assert_eq!(o.metrics.value("bulkhead_vcpu_failures_total", &[]), 1);
    assert!(o.alerts.is_empty(), "{:?}", o.alerts);
}

/// Each tightened rule: the call a thread's filter allows only with other arguments, made
/// with the arguments it does not allow, traps, and the report names the system call.
#[test]
fn each_tightened_argument_rule_traps_the_call_it_no_longer_allows() {
    if !kvm_available("each_tightened_argument_rule_traps_the_call_it_no_longer_allows") {
        return;
    }
    // (hook, the thread, the system call number the report names)
    let cases = [
        ("vmm-forbidden-call:socket-inet", "vmm", 41),
        ("vmm-forbidden-call:socket-dgram", "vmm", 41),
        // No socket, no connect: a VMM thread taken over reaches no host socket.
        ("vmm-forbidden-call:socket-unix-stream", "vmm", 41),
        ("vmm-forbidden-call:connect-unix", "vmm", 42),
        ("vcpu-forbidden-call:connect-unix", "vcpu0", 42),
        ("vmm-forbidden-call:futex-requeue", "vmm", 202),
        ("vmm-forbidden-call:futex-shared", "vmm", 202),
        ("vmm-forbidden-call:madvise-mergeable", "vmm", 28),
        ("vmm-forbidden-call:mmap-shared", "vmm", 9),
        ("vmm-forbidden-call:mmap-file", "vmm", 9),
        ("vmm-forbidden-call:mremap-fixed", "vmm", 25),
        ("vmm-forbidden-call:tgkill-other-signal", "vmm", 234),
        ("vcpu-forbidden-call:futex-requeue", "vcpu0", 202),
        ("vcpu-forbidden-call:futex-shared", "vcpu0", 202),
        ("vcpu-forbidden-call:madvise-mergeable", "vcpu0", 28),
        ("vcpu-forbidden-call:mmap-shared", "vcpu0", 9),
        ("vcpu-forbidden-call:mmap-file", "vcpu0", 9),
        ("vcpu-forbidden-call:mremap-fixed", "vcpu0", 25),
        ("vcpu-forbidden-call:tgkill-other-signal", "vcpu0", 234),
    ];
    for (hook, thread, nr) in cases {
        let name = format!("seccomp-args-{}", hook.replace(':', "-"));
        let o = run_observed(&name, "hello", &["--test-hook", hook]);
        let run = &o.run;
        assert_eq!(run.status, 159, "{hook}: stderr: {}", run.stderr);
        let said = format!("seccomp violation: thread {thread} made forbidden system call {nr}");
        assert!(run.stderr.contains(&said), "{hook}: stderr: {}", run.stderr);
        assert_one_seccomp_alert_for(&o, thread, nr);
    }
    // The same calls with the arguments bulkhead uses go through: every other test's runs,
    // and this one without the hook.
    let o = run_observed("seccomp-args-none", "hello", &[]);
    assert_eq!(o.run.status, 0, "stderr: {}", o.run.stderr);
}
