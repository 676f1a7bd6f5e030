//! `bulkhead audit-log verify` on logs the library wrote: an intact chain is accepted with its
//! head hash, a tampered one is refused naming the line, an unreadable file is bad input.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use bulkhead::api::serve::audit_log::{AuditLog, Record};

fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("bulkhead-audit-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("audit.jsonl")
}

fn write_log(path: &Path, n: u16) -> String {
    let mut log = AuditLog::open(path).unwrap();
    for i in 0..n {
        let refused = i % 2 == 1;
        log.append(
            Record {
                uid: 1001,
                pid: 77,
                tenant: Some("acme".into()),
                method: "GET".into(),
                path: format!("/v1/vms/vm{i}"),
                vm: Some(format!("vm{i}")),
                outcome: if refused { 404 } else { 200 },
                reason: refused.then(|| "no such VM for this tenant".into()),
            },
            SystemTime::now(),
        )
        .unwrap();
    }
    log.head().to_string()
}

fn verify(path: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["audit-log", "verify"])
        .arg(path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn an_intact_log_verifies_with_its_head_hash() {
    let path = scratch("intact");
    let head = write_log(&path, 3);
    let (code, out) = verify(&path);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("3 entries, chain intact, head {head}")),
        "{out}"
    );
}

#[test]
fn a_changed_outcome_is_found_and_named_by_line() {
    let path = scratch("tampered");
    write_log(&path, 4);
    // Someone turns a refusal into a success after the fact.
    let text = std::fs::read_to_string(&path).unwrap();
    let tampered = text.replacen("\"outcome\":404", "\"outcome\":200", 1);
    assert_ne!(text, tampered);
    std::fs::write(&path, tampered).unwrap();
    let (code, out) = verify(&path);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("chain broken at line 3"), "{out}");
}

#[test]
fn an_unreadable_log_is_bad_input() {
    let (code, out) = verify(&scratch("missing").with_file_name("absent.jsonl"));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("absent.jsonl"), "{out}");
}
