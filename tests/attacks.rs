//! The attack corpus: for each alert rule, the guest in guest-images/attacks/ that performs
//! exactly that attack. Each test proves the named rule fired with the right evidence, that no
//! other rule at Warning or above fired, and that bulkhead survived or stopped as its policy
//! says: by default (the device put in NEEDS_RESET for virtio rules), with `log`, and with
//! `stop-vm`.

mod common;

use std::path::PathBuf;

use common::{kvm_available, run_observed, scratch, Observed, TestTap};
use serde_json::{json, Value};

/// How a rule's attack ends under the default policy.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ends {
    /// The guest finishes and exits 0.
    Survives,
    /// The VM ends with this status whatever the policy.
    Status(i32),
}

struct Attack {
    rule: &'static str,
    /// Flags the guest needs (devices).
    flags: Vec<String>,
    /// Words for the guest's command line.
    cmdline: Vec<String>,
    /// The evidence the first alert must carry.
    evidence: Vec<(&'static str, Value)>,
    ends: Ends,
    /// The virtio device the attack targets, for rules whose default response resets it.
    device: Option<&'static str>,
}

impl Attack {
    fn new(rule: &'static str) -> Attack {
        Attack {
            rule,
            flags: Vec::new(),
            cmdline: Vec::new(),
            evidence: Vec::new(),
            ends: Ends::Survives,
            device: None,
        }
    }

    fn flags(mut self, flags: &[&str]) -> Attack {
        self.flags.extend(flags.iter().map(|s| s.to_string()));
        self
    }

    fn cmdline(mut self, words: &[&str]) -> Attack {
        self.cmdline.extend(words.iter().map(|s| s.to_string()));
        self
    }

    fn evidence(mut self, evidence: &[(&'static str, Value)]) -> Attack {
        self.evidence.extend(evidence.iter().cloned());
        self
    }

    fn resets(mut self, device: &'static str) -> Attack {
        self.device = Some(device);
        self
    }

    fn ends(mut self, status: i32) -> Attack {
        self.ends = Ends::Status(status);
        self
    }

    fn run(&self, policy: Option<&str>) -> Observed {
        let mut args: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        if let Some(p) = policy {
            args.extend(["--on-violation", p]);
        }
        let mut cmdline = self.cmdline.clone();
        if policy == Some("stop-vm") {
            // The guest waits for the stop (ended early by it), however long the supervisor
            // takes to act on a loaded host.
            cmdline.push("linger_ms=20000".into());
        }
        let cmdline = cmdline.join(" ");
        if !cmdline.is_empty() {
            args.extend(["--cmdline", &cmdline]);
        }
        let test = format!("attack-{}-{}", self.rule, policy.unwrap_or("default"));
        run_observed(&test, &format!("attacks/{}", self.rule), &args)
    }
}

/// The device status the guest printed after its attack (`attack: device status 0x4f`).
fn device_status(o: &Observed) -> Option<u32> {
    o.run.stdout.lines().find_map(|l| {
        let hex = l.strip_prefix("attack: device status 0x")?;
        u32::from_str_radix(hex.trim(), 16).ok()
    })
}

const NEEDS_RESET: u32 = 0x40;

/// Runs `attack` under the default policy, `log` and `stop-vm`, and checks each.
fn prove(attack: Attack) {
    let rule = attack.rule;
    // Default policy.
    let o = attack.run(None);
    let fired = o.alerts_of(rule);
    assert!(
        !fired.is_empty(),
        "{rule} did not fire; alerts: {:?}\nstdout: {}\nstderr: {}",
        o.alerts,
        o.run.stdout,
        o.run.stderr
    );
    let first = fired[0];
    for (key, want) in &attack.evidence {
        assert_eq!(
            &first["output_fields"][*key], want,
            "{rule}: evidence {key} in {first}"
        );
    }
    let f = &first["output_fields"];
    assert!(
        f["vm_id"].is_string() && f["tenant"] == "default" && f["seq"].is_u64(),
        "{first}"
    );
    assert!(
        first["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{first}"
    );
    let others = o.alerts_at_least("Warning", &[rule]);
    assert!(others.is_empty(), "{rule}: other alerts fired: {others:?}");
    assert_eq!(
        o.metrics.sum("bulkhead_alerts_total", &[("rule", rule)]),
        fired.len() as u64,
        "{rule}: the metrics disagree with the alert lines"
    );
    match attack.ends {
        Ends::Survives => {
            assert_eq!(
                o.run.status, 0,
                "{rule}: stdout {}\nstderr {}",
                o.run.stdout, o.run.stderr
            );
            assert!(
                o.run.stdout.contains(&format!("attack: {rule}")),
                "{}",
                o.run.stdout
            );
        }
        Ends::Status(s) => assert_eq!(o.run.status, s, "{rule}: {}", o.run.stderr),
    }
    let resets = o.metrics.sum("bulkhead_virtio_policy_resets_total", &[]);
    if let Some(device) = attack.device {
        let status = device_status(&o)
            .unwrap_or_else(|| panic!("{rule}: no device status: {}", o.run.stdout));
        assert_ne!(status & NEEDS_RESET, 0, "{rule}: the device was not reset");
        assert_eq!(
            o.metrics
                .value("bulkhead_virtio_policy_resets_total", &[("device", device)]),
            1,
            "{rule}"
        );
    } else {
        assert_eq!(
            resets, 0,
            "{rule}: a device was reset for a rule that only logs"
        );
    }

    // `log`: the alert alone; the device keeps serving.
    if let Some(device) = attack.device {
        let o = attack.run(Some("log"));
        assert!(
            !o.alerts_of(rule).is_empty(),
            "{rule} with log: {:?}",
            o.alerts
        );
        assert_eq!(
            o.metrics
                .value("bulkhead_virtio_policy_resets_total", &[("device", device)]),
            0,
            "{rule} with log"
        );
        // An avail index jump leaves rings the device can not use, whatever the policy.
        if rule != "virtio_avail_index_jump" {
            let status = device_status(&o).unwrap_or(0);
            assert_eq!(
                status & NEEDS_RESET,
                0,
                "{rule} with log: status {status:#x}"
            );
        }
    }

    // `stop-vm`: the VM ends with 86 (attacks that end the VM anyway keep their status).
    let o = attack.run(Some("stop-vm"));
    assert!(
        !o.alerts_of(rule).is_empty(),
        "{rule} with stop-vm: {:?}",
        o.alerts
    );
    match attack.ends {
        Ends::Survives => {
            assert_eq!(o.run.status, 86, "{rule} with stop-vm: {}", o.run.stderr);
            assert_eq!(
                o.metrics
                    .value("bulkhead_vm_exit", &[("reason", "policy_stop")]),
                1
            );
            assert!(
                o.run.stderr.contains(&format!("after alert {rule}")),
                "{}",
                o.run.stderr
            );
        }
        Ends::Status(s) => assert_eq!(o.run.status, s, "{rule} with stop-vm"),
    }
}

fn disk(test: &str, name: &str) -> PathBuf {
    let path = scratch(test).join(name);
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    path
}

macro_rules! attack_test {
    ($name:ident, $attack:expr) => {
        #[test]
        fn $name() {
            if !kvm_available(stringify!($name)) {
                return;
            }
            prove($attack);
        }
    };
}

attack_test!(
    a_descriptor_outside_ram_raises_virtio_desc_out_of_ram,
    Attack::new("virtio_desc_out_of_ram")
        .evidence(&[
            ("device", json!("virtio-rng0")),
            ("reason", json!("outside_ram")),
            ("queue", json!(0)),
            ("guest_address", json!("0xc0000000")),
            ("length", json!(64)),
        ])
        .resets("virtio-rng0")
);

attack_test!(
    a_ring_outside_ram_raises_virtio_ring_out_of_ram,
    Attack::new("virtio_ring_out_of_ram")
        .evidence(&[
            ("device", json!("virtio-rng0")),
            ("reason", json!("ring_outside_ram")),
            ("guest_address", json!("0xc0000000")),
        ])
        .resets("virtio-rng0")
);

attack_test!(
    a_buffer_over_the_used_ring_raises_virtio_buffer_overlaps_ring,
    Attack::new("virtio_buffer_overlaps_ring")
        .evidence(&[
            ("device", json!("virtio-rng0")),
            ("layer", json!("chain")),
            ("reason", json!("overlaps_rings")),
            ("queue", json!(0)),
        ])
        .resets("virtio-rng0")
);

attack_test!(
    rewriting_a_live_queue_raises_virtio_reconfig_after_activation,
    Attack::new("virtio_reconfig_after_activation")
        .evidence(&[
            ("device", json!("virtio-rng0")),
            ("reason", json!("queue_locked")),
            // QueueNum, set to 8.
            ("register", json!("0x38")),
            ("value", json!("0x8")),
        ])
        .resets("virtio-rng0")
);

attack_test!(
    an_avail_index_jump_raises_virtio_avail_index_jump,
    Attack::new("virtio_avail_index_jump")
        .evidence(&[
            ("device", json!("virtio-rng0")),
            ("reason", json!("avail_index_jump")),
        ])
        .resets("virtio-rng0")
);

attack_test!(
    a_descriptor_loop_raises_virtio_bad_chain,
    Attack::new("virtio_bad_chain")
        .evidence(&[("device", json!("virtio-rng0")), ("reason", json!("loop"))])
        .resets("virtio-rng0")
);

attack_test!(
    a_queue_size_that_is_not_a_power_of_two_raises_virtio_queue_config_violation,
    Attack::new("virtio_queue_config_violation")
        .evidence(&[
            ("device", json!("virtio-rng0")),
            ("reason", json!("bad_queue_size")),
            ("value", json!("0x3")),
        ])
        .resets("virtio-rng0")
);

#[test]
fn a_write_to_a_read_only_disk_raises_virtio_feature_violation() {
    if !kvm_available("a_write_to_a_read_only_disk_raises_virtio_feature_violation") {
        return;
    }
    let disk = disk("attack-ro", "ro.img");
    let arg = format!("{},ro", disk.display());
    prove(
        Attack::new("virtio_feature_violation")
            .flags(&["--disk", &arg])
            .evidence(&[
                ("device", json!("virtio-blk0")),
                ("reason", json!("read_only")),
                ("sector", json!(1)),
                ("length", json!(512)),
            ])
            .resets("virtio-blk0"),
    );
    assert!(std::fs::read(&disk).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn a_short_block_header_raises_virtio_malformed_payload() {
    if !kvm_available("a_short_block_header_raises_virtio_malformed_payload") {
        return;
    }
    let disk = disk("attack-short", "d.img");
    let arg = disk.display().to_string();
    prove(
        Attack::new("virtio_malformed_payload")
            .flags(&["--disk", &arg])
            .evidence(&[
                ("device", json!("virtio-blk0")),
                ("reason", json!("bad_header")),
            ])
            .resets("virtio-blk0"),
    );
}

#[test]
fn a_frame_from_a_foreign_mac_raises_net_mac_spoof() {
    let test = "a_frame_from_a_foreign_mac_raises_net_mac_spoof";
    if !kvm_available(test) {
        return;
    }
    let Some(tap) = TestTap::create(test) else {
        return;
    };
    let arg = format!("tap={}", tap.name);
    prove(
        Attack::new("net_mac_spoof")
            .flags(&["--net", &arg])
            .evidence(&[
                ("device", json!("virtio-net0")),
                ("source_mac", json!("02:66:66:66:66:66")),
                ("queue", json!(1)),
            ]),
    );
}

#[test]
fn a_qcow2_header_written_to_sector_0_raises_disk_image_magic_write_and_is_refused() {
    if !kvm_available(
        "a_qcow2_header_written_to_sector_0_raises_disk_image_magic_write_and_is_refused",
    ) {
        return;
    }
    let disk = disk("attack-magic", "raw.img");
    let arg = disk.display().to_string();
    prove(
        Attack::new("disk_image_magic_write")
            .flags(&["--disk", &arg])
            .evidence(&[
                ("device", json!("virtio-blk0")),
                ("format", json!("qcow2")),
                ("length", json!(512)),
            ]),
    );
    let head = std::fs::read(&disk).unwrap();
    assert!(
        !head.starts_with(b"QFI\xfb"),
        "the qcow2 header reached the disk"
    );
}

attack_test!(
    probing_floppy_ide_and_pci_ports_raises_legacy_device_probe,
    Attack::new("legacy_device_probe").evidence(&[
        ("vcpu", json!(0)),
        ("port", json!("0x3f4")),
        ("legacy_device", json!("floppy")),
    ])
);

attack_test!(
    thirty_two_unhandled_ports_raise_pio_scan,
    Attack::new("pio_scan").evidence(&[
        ("distinct", json!(16)),
        ("lowest", json!("0x4000")),
        ("highest", json!("0x400f")),
    ])
);

attack_test!(
    thirty_two_unmapped_pages_raise_mmio_scan,
    Attack::new("mmio_scan").evidence(&[("distinct", json!(16)), ("lowest", json!("0xc0000000"))])
);

attack_test!(
    an_msr_outside_the_allow_list_raises_msr_probe_and_faults,
    Attack::new("msr_probe").evidence(&[
        ("vcpu", json!(0)),
        ("msr", json!("0x12345678")),
        ("direction", json!("read")),
    ])
);

attack_test!(
    a_triple_fault_raises_triple_fault,
    Attack::new("triple_fault")
        .evidence(&[("vcpu", json!(0))])
        .ends(81)
);

attack_test!(
    a_vcpu_spinning_on_port_exits_raises_exit_storm,
    Attack::new("exit_storm")
        .cmdline(&["storm_ms=3000"])
        .evidence(&[("vcpu", json!(0))])
);

attack_test!(
    code_run_from_mmio_raises_vcpu_entry_failure,
    Attack::new("vcpu_entry_failure")
        .evidence(&[("vcpu", json!(0))])
        .ends(82)
);

#[test]
fn a_vmm_thread_taken_over_by_the_guest_raises_exactly_one_seccomp_violation() {
    if !kvm_available("a_vmm_thread_taken_over_by_the_guest_raises_exactly_one_seccomp_violation") {
        return;
    }
    let attack = Attack::new("seccomp_violation")
        .flags(&["--test-hook", "guest-forbidden-syscall"])
        .evidence(&[
            ("thread", json!("vcpu0")),
            ("syscall", json!(41)),
            ("signal", json!("SIGSYS")),
        ])
        .ends(159);
    prove(attack);
    let o = Attack::new("seccomp_violation")
        .flags(&["--test-hook", "guest-forbidden-syscall"])
        .run(None);
    assert_eq!(o.alerts.len(), 1, "{:?}", o.alerts);
    assert_eq!(o.alerts[0]["priority"], "Critical");
    assert_eq!(
        o.metrics
            .value("bulkhead_vm_exit", &[("reason", "seccomp_violation")]),
        1
    );
    assert_eq!(o.metrics.value("bulkhead_vm_exit_status", &[]), 159);
    assert!(!o.run.stdout.contains("attack: done"), "{}", o.run.stdout);
}

/// Each probe rule judges a guest that never reports boot complete and exits the moment its
/// probe is done: nothing the guest says or does afterwards decides whether it is seen.
#[test]
fn each_probe_rule_fires_for_a_guest_that_probes_at_once_and_exits() {
    if !kvm_available("each_probe_rule_fires_for_a_guest_that_probes_at_once_and_exits") {
        return;
    }
    for rule in ["legacy_device_probe", "pio_scan", "mmio_scan", "msr_probe"] {
        let o = Attack::new(rule).cmdline(&["quick=1"]).run(None);
        assert_eq!(o.run.status, 0, "{rule}: {}", o.run.stderr);
        assert!(
            !o.alerts_of(rule).is_empty(),
            "{rule} did not fire for a quick guest; alerts: {:?}",
            o.alerts
        );
        assert!(
            o.metrics
                .samples
                .iter()
                .all(|(name, _, _)| name != "bulkhead_boot_complete_seconds"),
            "{rule}: the quick guest reported boot complete"
        );
    }
}

/// The held-out case: a VENOM-style command byte to the floppy controller and a sweep of 64
/// ports, at once, then an exit, with no boot report. Every probe is alerted.
#[test]
fn a_guest_that_probes_the_floppy_and_sweeps_ports_then_exits_at_once_is_alerted() {
    if !kvm_available(
        "a_guest_that_probes_the_floppy_and_sweeps_ports_then_exits_at_once_is_alerted",
    ) {
        return;
    }
    let o = run_observed("attack-probe-and-flee", "attacks/probe_and_flee", &[]);
    assert_eq!(o.run.status, 0, "{}", o.run.stderr);
    let legacy = o.alerts_of("legacy_device_probe");
    let ports: Vec<&Value> = legacy.iter().map(|a| &a["output_fields"]["port"]).collect();
    assert_eq!(ports, [&json!("0x3f5"), &json!("0x3f4")], "{:?}", o.alerts);
    assert_eq!(legacy[0]["output_fields"]["direction"], "write");
    let scans = o.alerts_of("pio_scan");
    assert_eq!(scans.len(), 4, "{:?}", o.alerts);
    // The floppy ports count towards the first scan.
    assert_eq!(scans[0]["output_fields"]["lowest"], "0x3f4");
    assert_eq!(o.metrics.sum("bulkhead_unhandled_pio_total", &[]), 66);
}
