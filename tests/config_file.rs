//! The JSON config file carries the same settings as the flags, and flags win.

mod common;

use common::{bulkhead, guest, kvm_available, scratch};

#[test]
fn config_file_settings_apply_and_flags_override_them() {
    if !kvm_available("config_file_settings_apply_and_flags_override_them") {
        return;
    }
    let dir = scratch("config-file");
    let cfg = dir.join("vm.json");
    let kernel = guest("smp");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"kernel": "{}", "vcpus": 2, "mem_mib": 32, "console": "stdio", "tenant": "acme", "vm_id": "vm-1"}}"#,
            kernel.display()
        ),
    )
    .unwrap();
    let from_file = bulkhead(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(from_file.status, 0, "stderr: {}", from_file.stderr);
    assert!(
        from_file.stdout.contains("smp: all 2 vcpus checked in"),
        "{}",
        from_file.stdout
    );
    assert!(
        from_file.stderr.contains("VM vm-1 (tenant acme)"),
        "{}",
        from_file.stderr
    );

    let overridden = bulkhead(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--vcpus",
        "3",
        "--tenant",
        "globex",
    ]);
    assert_eq!(overridden.status, 0, "stderr: {}", overridden.stderr);
    assert!(
        overridden.stdout.contains("smp: all 3 vcpus checked in"),
        "{}",
        overridden.stdout
    );
    assert!(
        overridden.stderr.contains("(tenant globex)"),
        "{}",
        overridden.stderr
    );
}

#[test]
fn supervision_settings_come_from_the_config_file_too() {
    if !kvm_available("supervision_settings_come_from_the_config_file_too") {
        return;
    }
    let dir = scratch("config-supervision");
    let cfg = dir.join("vm.json");
    let (metrics, alerts) = (dir.join("vm.prom"), dir.join("alerts.jsonl"));
    let kernel = guest("attacks/pio_scan");
    std::fs::write(
        &cfg,
        serde_json::json!({
            "kernel": kernel,
            "vm_id": "vm-cfg",
            "metrics_file": metrics,
            "alerts": alerts,
            "on_violation": "stop-vm",
            "timeout": 60,
        })
        .to_string(),
    )
    .unwrap();
    let run = bulkhead(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(run.status, 86, "stop-vm from the file: {}", run.stderr);
    let text = std::fs::read_to_string(&alerts).unwrap();
    assert!(text.contains("\"rule\":\"pio_scan\""), "{text}");
    assert!(text.contains("\"vm_id\":\"vm-cfg\""), "{text}");
    let prom = std::fs::read_to_string(&metrics).unwrap();
    assert!(prom.contains("reason=\"policy_stop\""), "{prom}");
    // A flag overrides the file's response.
    let run = bulkhead(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--on-violation",
        "log",
    ]);
    assert_eq!(run.status, 0, "{}", run.stderr);
}
