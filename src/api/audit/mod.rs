//! `bulkhead audit --out DIR`: runs the cross-tenant negative tests on this host, against a
//! daemon it starts for itself with two synthetic tenants, and writes the evidence bundle:
//! `audit.json` and its rendering `audit.md`, each check mapped to the planes of ISO/IEC 27017
//! CLD.9.5.1 (compute, memory, storage, network, management, logs), with pass or fail and its
//! evidence, plus a copy of the run's audit log. The bundle records when it ran, the bulkhead
//! version, the host kernel and a digest of the daemon's config, so it can be re-run after a
//! change and compared.
//!
//! Requests are made as the synthetic tenants' uids from threads that switched their own
//! credentials only, so the daemon's SO_PEERCRED check sees exactly what a tenant's client
//! would give it.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::api::markdown;
use sha2::{Digest, Sha256};

mod checks;
mod host;

#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    #[error("bulkhead audit needs root (it starts a daemon and checks VM processes from outside)")]
    NotRoot,
    #[error("test guest {0} is missing: build them (make -C guest-images) or pass --guests")]
    NoGuest(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon did not start: {0}")]
    Daemon(String),
}

pub(super) const TENANT_A: (&str, u32) = ("tenant-a", 2_000_001);
pub(super) const TENANT_B: (&str, u32) = ("tenant-b", 2_000_002);
/// Attacks from the corpus that need no device beyond the default ones.
pub(super) const ATTACKS: &[&str] = &[
    "virtio_desc_out_of_ram",
    "virtio_ring_out_of_ram",
    "virtio_bad_chain",
    "virtio_queue_config_violation",
    "legacy_device_probe",
    "pio_scan",
    "mmio_scan",
    "msr_probe",
    "triple_fault",
];

pub(super) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> EvidenceError {
    let path = path.to_path_buf();
    move |source| EvidenceError::Io { what, path, source }
}

/// One check: the planes it evidences, whether it passed, and what was seen.
pub(super) struct Check {
    pub(super) id: &'static str,
    pub(super) planes: &'static [&'static str],
    pub(super) claim: &'static str,
    pub(super) pass: bool,
    pub(super) evidence: Value,
}

/// Runs the audit and writes the bundle into `out`; returns whether every check passed.
pub fn run(out: &Path, guests: &Path) -> Result<bool, EvidenceError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(EvidenceError::NotRoot);
    }
    let started = std::time::SystemTime::now();
    let host = host::start_host(guests)?;
    let checks = checks::run_checks(&host);
    let audit_copy = out.join("audit-log.jsonl");
    std::fs::create_dir_all(out).map_err(io("creating", out))?;
    std::fs::copy(host.dir.join("audit.jsonl"), &audit_copy)
        .map_err(io("copying the audit log to", &audit_copy))?;
    let passed = checks.iter().all(|c| c.pass);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let bundle = Bundle {
        standard: STANDARD,
        started: humantime::format_rfc3339_seconds(started).to_string(),
        finished: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        bulkhead_version: env!("CARGO_PKG_VERSION"),
        host: crate::supervisor::hostname(),
        host_kernel: kernel.trim().to_string(),
        daemon_config_sha256: format!("{:x}", Sha256::digest(host.config_text.as_bytes())),
        daemon_config: serde_json::from_str::<Value>(&host.config_text).unwrap_or(Value::Null),
        passed,
        checks: checks
            .iter()
            .map(|c| CheckRecord {
                id: c.id,
                planes: c.planes,
                claim: c.claim,
                result: if c.pass { "pass" } else { "fail" },
                evidence: &c.evidence,
            })
            .collect(),
    };
    let json_path = out.join("audit.json");
    let text = serde_json::to_string_pretty(&bundle).unwrap_or_default();
    std::fs::write(&json_path, text).map_err(io("writing", &json_path))?;
    let md_path = out.join("audit.md");
    std::fs::write(&md_path, bundle.markdown()).map_err(io("writing", &md_path))?;
    Ok(passed)
}

const STANDARD: &str = "ISO/IEC 27017:2015 CLD.9.5.1 segregation in virtual computing environments";

/// The evidence bundle, as `audit.json` holds it.
#[derive(Debug, Serialize)]
struct Bundle<'a> {
    standard: &'static str,
    started: String,
    finished: String,
    bulkhead_version: &'static str,
    host: String,
    host_kernel: String,
    daemon_config_sha256: String,
    daemon_config: Value,
    passed: bool,
    checks: Vec<CheckRecord<'a>>,
}

/// One check's record in the bundle.
#[derive(Debug, Serialize)]
struct CheckRecord<'a> {
    id: &'static str,
    planes: &'static [&'static str],
    claim: &'static str,
    /// `pass` or `fail`.
    result: &'static str,
    evidence: &'a Value,
}

impl Bundle<'_> {
    /// The bundle as Markdown: a summary table by plane, then each check's evidence.
    fn markdown(&self) -> String {
        let mut out = format!(
            "# bulkhead isolation audit\n\n{}\n\n- run: {} to {}\n- bulkhead {} on {} (kernel {})\n- daemon config SHA-256: `{}`\n- result: **{}**\n\n",
            self.standard,
            self.started,
            self.finished,
            self.bulkhead_version,
            self.host,
            self.host_kernel,
            self.daemon_config_sha256,
            if self.passed { "every check passed" } else { "CHECKS FAILED" },
        );
        let rows = self.checks.iter().map(|c| {
            vec![
                format!("`{}`", c.id),
                c.planes.join(", "),
                if c.result == "pass" {
                    "pass"
                } else {
                    "**FAIL**"
                }
                .to_string(),
                markdown::cell(c.claim),
            ]
        });
        markdown::table(&mut out, &["check", "planes", "result", "claim"], rows);
        out.push_str("\n## Evidence\n");
        for c in &self.checks {
            out.push_str(&format!(
                "\n### `{}`: {}\n\n```json\n{}\n```\n",
                c.id,
                c.result,
                serde_json::to_string_pretty(c.evidence).unwrap_or_default()
            ));
        }
        out
    }
}
