//! The daemon's VMs: each one a `bulkhead run --jail` supervisor it started (the same
//! supervisor code as `bulkhead run`), with its settings, outputs and state in
//! `STATE_DIR/vms/ID/`. A record file there lets a restarted daemon find its VMs again: a
//! supervisor still running under the same pid and start time is taken back, any other is
//! reported lost.
//!
//! Supervisors run in a process group of their own, so a signal meant for the daemon (Ctrl-C,
//! a stop of its unit with KillMode=process) does not reach them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::RawConfig;
use crate::procfs;

#[derive(Debug, thiserror::Error)]
pub enum VmsError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the supervisor of VM {id}: {source}")]
    Start {
        id: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Paused,
    /// Asked to stop; not yet ended.
    Stopping,
    Exited,
    /// Its supervisor was gone when a restarted daemon looked for it.
    Lost,
}

impl VmState {
    pub fn is_live(self) -> bool {
        matches!(self, VmState::Running | VmState::Paused | VmState::Stopping)
    }
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmExit {
    /// `bulkhead run`'s exit status, when the daemon saw it (it does not for a VM it took
    /// back after a restart).
    pub status: Option<i32>,
    /// The `reason` of the VM's `bulkhead_vm_exit` metric (guest_exit, seccomp_violation,
    /// killed, ...), or what the daemon saw when there is none.
    pub reason: String,
}

impl VmExit {
    /// How an ended VM is described: the reason its metrics give, or what the daemon saw of
    /// its supervisor (its status, or nothing for a VM taken back after a restart).
    pub fn seen(status: Option<i32>, reason: Option<String>) -> VmExit {
        let reason = reason.unwrap_or_else(|| match status {
            Some(s) => format!("supervisor_exit_{s}"),
            None => "killed".to_string(),
        });
        VmExit { status, reason }
    }
}

/// One VM, as the daemon keeps it (and writes it to `record.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    pub tenant: String,
    pub state: VmState,
    /// The supervisor's pid.
    pub pid: Option<i32>,
    /// The supervisor's start time in clock ticks since boot (/proc/PID/stat field 22): with
    /// the pid, what tells the same process from a later one that reused its pid.
    pub pid_start: Option<u64>,
    /// RFC 3339, UTC.
    pub started: String,
    pub exit: Option<VmExit>,
    pub vcpus: u32,
    pub mem_mib: u64,
    /// The settings as the tenant gave them, with their files resolved.
    pub config: RawConfig,
    /// Its disks as the files they are, whatever path names them: no two live VMs share one
    /// that either writes.
    #[serde(default)]
    pub disks: Vec<DiskId>,
    /// When the VM was seen to end (RFC 3339, UTC): exited records go oldest first.
    #[serde(default)]
    pub ended: Option<String>,
    /// The VM's last snapshot the daemon kept (or the one it was started from): what its
    /// dirty-page log counts from, so the base of its next diff snapshot.
    #[serde(default)]
    pub last_snapshot: Option<String>,
}

/// A disk file: its device and inode, and whether the VM writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskId {
    pub dev: u64,
    pub ino: u64,
    pub writable: bool,
}

impl DiskId {
    /// Whether two VMs holding `self` and `other` would share a file one of them writes.
    pub fn clashes(&self, other: &DiskId) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino) && (self.writable || other.writable)
    }
}

/// A VM's files under the state directory.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    pub fn new(state_dir: &Path, id: &str) -> VmPaths {
        VmPaths {
            dir: state_dir.join("vms").join(id),
        }
    }
    pub fn record(&self) -> PathBuf {
        self.dir.join("record.json")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.prom")
    }
    pub fn alerts(&self) -> PathBuf {
        self.dir.join("alerts.jsonl")
    }
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The VM's control socket (pause, resume, snapshot), made by its supervisor.
    pub fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
}

/// Writes `record` to its file, replacing it whole.
pub fn save(paths: &VmPaths, record: &VmRecord) -> Result<(), VmsError> {
    let path = paths.record();
    let tmp = paths.dir.join("record.json.tmp");
    let text = serde_json::to_vec_pretty(record).unwrap_or_default();
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| VmsError::Write { path, source })
}

/// Why the VM ended, from its metrics file (the `reason` of `bulkhead_vm_exit`).
pub fn exit_reason(paths: &VmPaths) -> Option<String> {
    let text = std::fs::read_to_string(paths.metrics()).ok()?;
    crate::telemetry::Exposition::parse(&text)
        .exit_reason()
        .map(str::to_string)
}

/// Reads every record under `state_dir/vms`, and decides what became of the live ones: a
/// supervisor still there (same pid, same start time) is taken back; any other is lost.
pub fn recover(state_dir: &Path) -> BTreeMap<String, VmRecord> {
    let mut found = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(state_dir.join("vms")) else {
        return found;
    };
    for e in entries.flatten() {
        let id = e.file_name().to_string_lossy().to_string();
        let paths = VmPaths::new(state_dir, &id);
        let Some(mut record) = std::fs::read(paths.record())
            .ok()
            .and_then(|b| serde_json::from_slice::<VmRecord>(&b).ok())
        else {
            log::warn!("{}: no readable record; left alone", paths.dir.display());
            continue;
        };
        if record.id != id {
            log::warn!(
                "{}: its record names another VM; left alone",
                paths.dir.display()
            );
            continue;
        }
        if record.state.is_live() {
            let same = record.pid.is_some_and(|pid| {
                procfs::start_time(pid).is_some() && procfs::start_time(pid) == record.pid_start
            });
            if same {
                log::info!("VM {} (tenant {}): taken back", record.id, record.tenant);
            } else {
                let reason = exit_reason(&paths);
                record.state = if reason.is_some() {
                    VmState::Exited
                } else {
                    VmState::Lost
                };
                record.exit = Some(VmExit {
                    status: None,
                    reason: reason.unwrap_or_else(|| "lost".to_string()),
                });
                log::warn!(
                    "VM {} (tenant {}): its supervisor ended while the daemon was away ({})",
                    record.id,
                    record.tenant,
                    record.exit.as_ref().map_or("", |e| e.reason.as_str())
                );
                let _ = save(&paths, &record);
            }
        }
        found.insert(id, record);
    }
    found
}

/// Now, in RFC 3339.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Now in RFC 3339 with nanoseconds: what orders records made within one second.
pub fn now_rfc3339_precise() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

/// How often a supervisor the daemon did not start (one taken back) is looked for.
pub const ADOPTED_POLL: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_vanished_supervisors_are_reported_lost_and_live_ones_kept() {
        let dir = std::env::temp_dir().join(format!("bulkhead-recover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        let mk = |id: &str, pid: i32, pid_start: Option<u64>| VmRecord {
            disks: Vec::new(),
            ended: None,
            last_snapshot: None,
            id: id.into(),
            tenant: "acme".into(),
            state: VmState::Running,
            pid: Some(pid),
            pid_start,
            started: now_rfc3339(),
            exit: None,
            vcpus: 1,
            mem_mib: 128,
            config: RawConfig::default(),
        };
        for r in [
            mk("alive", me, procfs::start_time(me)),
            mk("reused-pid", me, Some(1)),
            mk("gone", i32::MAX, Some(5)),
        ] {
            let p = VmPaths::new(&dir, &r.id);
            std::fs::create_dir_all(&p.dir).unwrap();
            save(&p, &r).unwrap();
        }
        let found = recover(&dir);
        assert_eq!(found["alive"].state, VmState::Running);
        assert_eq!(found["reused-pid"].state, VmState::Lost);
        assert_eq!(found["gone"].state, VmState::Lost);
        // What was decided is written back.
        let again = recover(&dir);
        assert_eq!(again["gone"].state, VmState::Lost);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
