//! A guest's way of ending reaches the caller as bulkhead's exit status, and its serial output
//! arrives on stdout.

mod common;

use common::{kvm_available, run_guest, run_observed};

#[test]
fn guest_chosen_exit_status_becomes_bulkheads_exit_status() {
    if !kvm_available("guest_chosen_exit_status_becomes_bulkheads_exit_status") {
        return;
    }
    for status in [0, 7, 255] {
        let run = run_guest("hello", &["--cmdline", &format!("exit={status}")]);
        assert_eq!(run.status, status, "stderr: {}", run.stderr);
    }
}

#[test]
fn serial_output_reaches_stdout_and_boot_complete_is_logged_once() {
    if !kvm_available("serial_output_reaches_stdout_and_boot_complete_is_logged_once") {
        return;
    }
    let run = run_guest("hello", &[]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    assert_eq!(
        run.stdout_count("hello from the bulkhead test guest"),
        1,
        "stdout: {}",
        run.stdout
    );
    assert_eq!(
        run.stderr.matches("guest boot complete in ").count(),
        1,
        "stderr: {}",
        run.stderr
    );
}

#[test]
fn console_input_on_stdin_reaches_the_guests_serial_port() {
    if !kvm_available("console_input_on_stdin_reaches_the_guests_serial_port") {
        return;
    }
    let run = common::run_guest_with_input("exitcodes", &["--cmdline", "mode=echo"], Some(b"42\n"));
    assert_eq!(
        run.status, 42,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    assert_eq!(
        run.stdout_count("42"),
        1,
        "guest did not echo its input: {}",
        run.stdout
    );
}

#[test]
fn console_file_receives_guest_output_and_stdout_stays_clean() {
    if !kvm_available("console_file_receives_guest_output_and_stdout_stays_clean") {
        return;
    }
    let dir = common::scratch("console-file");
    let log = dir.join("console.log");
    let run = run_guest("hello", &["--console", &format!("file:{}", log.display())]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    assert!(run.stdout.is_empty(), "stdout: {}", run.stdout);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("hello from the bulkhead test guest"),
        "console file: {text}"
    );
    let none = run_guest("hello", &["--console", "none"]);
    assert_eq!(none.status, 0);
    assert!(none.stdout.is_empty());
}

#[test]
fn guest_reset_through_the_i8042_ends_the_run_with_status_zero() {
    if !kvm_available("guest_reset_through_the_i8042_ends_the_run_with_status_zero") {
        return;
    }
    let run = run_guest("exitcodes", &["--cmdline", "mode=reset"]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    assert!(run.stdout.contains("resetting through the i8042"));
    assert!(
        run.stderr.contains("guest reset the machine"),
        "stderr: {}",
        run.stderr
    );
}

#[test]
fn acpi_power_off_and_reset_end_the_run_with_status_zero_and_say_which() {
    if !kvm_available("acpi_power_off_and_reset_end_the_run_with_status_zero_and_say_which") {
        return;
    }
    // The guest finds the registers and values in the FADT and DSDT, as Linux does.
    for (mode, line, reason) in [
        ("poweroff", "guest powered off (ACPI S5)", "power_off"),
        (
            "acpi-reset",
            "guest reset the machine through the ACPI reset register",
            "reset",
        ),
        (
            "reset",
            "guest reset the machine through the i8042",
            "reset",
        ),
    ] {
        let o = run_observed(
            &format!("exit-{mode}"),
            "exitcodes",
            &["--cmdline", &format!("mode={mode}")],
        );
        assert_eq!(o.run.status, 0, "{mode}: {}", o.run.stderr);
        assert!(o.run.stderr.contains(line), "{mode}: {}", o.run.stderr);
        assert_eq!(
            o.metrics.value("bulkhead_vm_exit", &[("reason", reason)]),
            1,
            "{mode}"
        );
    }
}

#[test]
fn a_guest_panic_ends_the_run_with_status_87_and_is_counted() {
    if !kvm_available("a_guest_panic_ends_the_run_with_status_87_and_is_counted") {
        return;
    }
    let o = run_observed("exit-panic", "exitcodes", &["--cmdline", "mode=panic"]);
    assert_eq!(o.run.status, 87, "{}", o.run.stderr);
    assert!(
        o.run.stderr.contains("the guest kernel panicked"),
        "{}",
        o.run.stderr
    );
    let panics = |event| {
        o.metrics
            .value("bulkhead_guest_panics_total", &[("event", event)])
    };
    assert_eq!((panics("panicked"), panics("crash_loaded")), (1, 0));
    assert_eq!(
        o.metrics
            .value("bulkhead_vm_exit", &[("reason", "guest_panic")]),
        1
    );
    // A panic with a crash kernel loaded is counted, and the guest goes on (here to exit 0).
    let o = run_observed(
        "exit-crash",
        "exitcodes",
        &["--cmdline", "mode=crash-loaded"],
    );
    assert_eq!(o.run.status, 0, "{}", o.run.stderr);
    let panics = |event| {
        o.metrics
            .value("bulkhead_guest_panics_total", &[("event", event)])
    };
    assert_eq!((panics("panicked"), panics("crash_loaded")), (0, 1));
}

#[test]
fn without_acpi_tables_the_power_and_panic_ports_do_not_exist() {
    if !kvm_available("without_acpi_tables_the_power_and_panic_ports_do_not_exist") {
        return;
    }
    for mode in ["poweroff", "acpi-reset", "panic"] {
        let run = run_guest(
            "exitcodes",
            &["--no-acpi", "--cmdline", &format!("mode={mode}")],
        );
        assert_eq!(run.status, 0x7e, "{mode}: {}", run.stderr);
    }
    // A guest that writes to the ports anyway reaches no device: three unhandled writes.
    let o = run_observed(
        "exit-blind",
        "exitcodes",
        &["--no-acpi", "--cmdline", "mode=blind-power"],
    );
    assert_eq!(o.run.status, 0x7d, "{}", o.run.stderr);
    assert_eq!(
        o.metrics
            .value("bulkhead_unhandled_pio_total", &[("direction", "write")]),
        3
    );
    // With the tables, the first write already powers off.
    let run = run_guest("exitcodes", &["--cmdline", "mode=blind-power"]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert!(run.stderr.contains("guest powered off"), "{}", run.stderr);
}

#[test]
fn triple_fault_ends_the_run_with_status_81() {
    if !kvm_available("triple_fault_ends_the_run_with_status_81") {
        return;
    }
    let run = run_guest("exitcodes", &["--cmdline", "mode=triple"]);
    assert_eq!(run.status, 81, "stderr: {}", run.stderr);
    assert!(
        run.stderr.contains("vCPU 0 triple-faulted"),
        "stderr: {}",
        run.stderr
    );
    // Where it faulted: the guest's ud2 under an IDT of limit 0 (a #UD, vector 6); on AMD,
    // KVM resets the vCPU before the exit and says only that.
    assert!(
        (run.stderr.contains("triple-faulted at rip 0x")
            && run.stderr.contains("idt 0x0+0x0; exception: nr 6 "))
            || run
                .stderr
                .contains("KVM reset the vCPU before reporting it"),
        "stderr: {}",
        run.stderr
    );
}

#[test]
fn halt_with_interrupts_off_on_every_vcpu_ends_the_run_with_status_80() {
    if !kvm_available("halt_with_interrupts_off_on_every_vcpu_ends_the_run_with_status_80") {
        return;
    }
    // With two vCPUs the second is never started, so it waits for a SIPI forever too.
    for vcpus in ["1", "2"] {
        let run = run_guest("exitcodes", &["--cmdline", "mode=halt", "--vcpus", vcpus]);
        assert_eq!(run.status, 80, "vcpus {vcpus}, stderr: {}", run.stderr);
        assert!(
            run.stderr.contains("all vCPUs halted"),
            "stderr: {}",
            run.stderr
        );
    }
}

#[test]
fn unassigned_port_and_mmio_reads_are_all_ones_and_every_access_is_counted() {
    if !kvm_available("unassigned_port_and_mmio_reads_are_all_ones_and_every_access_is_counted") {
        return;
    }
    let o = common::run_observed("unassigned", "exitcodes", &["--cmdline", "mode=unassigned"]);
    assert_eq!(
        o.run.status, 0,
        "guest saw a read that was not all-ones; stderr: {}",
        o.run.stderr
    );
    let m = &o.metrics;
    let dir = |d| [("direction", d)];
    assert_eq!(m.value("bulkhead_unhandled_pio_total", &dir("read")), 3);
    assert_eq!(m.value("bulkhead_unhandled_pio_total", &dir("write")), 1);
    assert_eq!(m.value("bulkhead_unhandled_mmio_total", &dir("read")), 1);
    assert_eq!(m.value("bulkhead_unhandled_mmio_total", &dir("write")), 1);
    // Each is an exit of its kind on vCPU 0.
    let exits = |r| m.value("bulkhead_vcpu_exits_total", &[("vcpu", "0"), ("reason", r)]);
    assert!(exits("io_in") >= 3 && exits("mmio_read") >= 1 && exits("mmio_write") >= 1);
    // Probes before the boot has settled raise no alert.
    assert!(o.alerts.is_empty(), "{:?}", o.alerts);
}

/// What exitcodes mode=chatter prints for `n` bytes.
fn chatter_pattern(n: usize) -> String {
    (0..n)
        .map(|i| {
            if i % 64 == 63 {
                '\n'
            } else {
                char::from(b'0' + ((i / 64 + i % 64) % 64) as u8)
            }
        })
        .collect()
}

#[test]
fn polled_console_bytes_skip_their_exits_yet_arrive_whole_in_order_and_counted() {
    let test = "polled_console_bytes_skip_their_exits_yet_arrive_whole_in_order_and_counted";
    if !kvm_available(test) {
        return;
    }
    // The guest polls the line status before each byte, then writes the data register with
    // the transmit interrupt off: once enough of those have exited, KVM holds the writes back
    // and bulkhead handles each before the next exit. Then the guest writes the divisor latch
    // through the same port (held back too) and reads it back (an exit): it reads what it
    // wrote only if the held-back write was handled before the read.
    let bytes = 3000;
    let o = run_observed(
        "coalesced-console",
        "exitcodes",
        &["--cmdline", &format!("mode=chatter chatter={bytes}")],
    );
    assert_eq!(
        o.run.status, 0,
        "the divisor did not read back; stderr: {}",
        o.run.stderr
    );
    let expected = format!("{}\nexitcodes: divisor read back\n", chatter_pattern(bytes));
    assert!(
        o.run.stdout.contains(&expected),
        "console output lost or out of order: {:?}",
        o.run.stdout
    );
    let held = o.metrics.value("bulkhead_coalesced_pio_writes_total", &[]);
    let outs = o.metrics.value(
        "bulkhead_vcpu_exits_total",
        &[("vcpu", "0"), ("reason", "io_out")],
    );
    assert!(
        held as usize >= bytes / 2,
        "only {held} of {bytes} console bytes were held back ({outs} port-write exits)"
    );
    assert_eq!(
        held + outs,
        expected.len() as u64 + 4,
        "each console byte, the divisor, two LCR writes and the exit port: held back or \
         exiting, once each"
    );

    // A guest that prints a line and ends never has its writes held back: registering the
    // zone would cost its teardown an SRCU grace period (12-17 ms).
    let short = run_observed(
        "coalesced-console-short",
        "exitcodes",
        &["--cmdline", "mode=chatter chatter=100"],
    );
    assert_eq!(short.run.status, 0, "stderr: {}", short.run.stderr);
    assert_eq!(
        short
            .metrics
            .value("bulkhead_coalesced_pio_writes_total", &[]),
        0
    );
}

#[test]
fn console_writes_exit_again_while_the_transmit_interrupt_is_on_and_in_order() {
    let test = "console_writes_exit_again_while_the_transmit_interrupt_is_on_and_in_order";
    if !kvm_available(test) {
        return;
    }
    // 600 quiet bytes (the zone is registered after the first 256), 100 with the transmit
    // interrupt on (each must exit: the UART raises an interrupt for it), then 100 quiet ones
    // again: fewer than the doubled threshold, so they exit too.
    let o = run_observed(
        "coalesced-console-thri",
        "exitcodes",
        &["--cmdline", "mode=chatter chatter=600 thri=100 quiet=100"],
    );
    assert_eq!(o.run.status, 0, "stderr: {}", o.run.stderr);
    let expected = format!(
        "{}{}{}\nexitcodes: divisor read back\n",
        chatter_pattern(600),
        chatter_pattern(100),
        chatter_pattern(100)
    );
    assert!(
        o.run.stdout.contains(&expected),
        "console output lost or out of order: {:?}",
        o.run.stdout
    );
    let held = o.metrics.value("bulkhead_coalesced_pio_writes_total", &[]);
    assert_eq!(
        held,
        600 - 256,
        "only the quiet bytes after the first 256 were held back"
    );
}

#[test]
fn a_guests_last_console_line_arrives_while_it_spins_without_an_exit() {
    let test = "a_guests_last_console_line_arrives_while_it_spins_without_an_exit";
    if !kvm_available(test) {
        return;
    }
    // After enough output that KVM holds its console writes back, the guest writes its last
    // line and spins for good without an exit: nothing on its vCPU would hand the newline
    // over, and its thread never sleeps for the halt watchdog to kick, so the VMM's tick must.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["run", "--kernel"])
        .arg(common::guest("exitcodes"))
        .args(["--cmdline", "mode=spin chatter=1000", "--timeout", "60"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = Vec::new();
    let mut byte = [0u8; 1];
    let stdout = child.stdout.as_mut().unwrap();
    while !said.ends_with(b"exitcodes: spinning\n") {
        use std::io::Read;
        if stdout.read(&mut byte).unwrap_or(0) != 1 {
            break;
        }
        said.push(byte[0]);
    }
    // Stopped by us once the line is in: had it come only with the VM's end, the end would
    // be the time limit's, not this signal's.
    // SAFETY: kill with a child's pid and a signal number touches no memory.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!("{}exitcodes: spinning\n", chatter_pattern(1000));
    assert!(
        said.ends_with(expected.as_bytes()),
        "stdout: {:?}",
        String::from_utf8_lossy(&said)
    );
    assert!(
        stderr.contains("stopped on signal 15"),
        "the line only came when the VM ended: {stderr}"
    );
}
