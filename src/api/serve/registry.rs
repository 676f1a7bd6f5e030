//! `bulkhead serve`: the management daemon's state and its VMs' lives. It runs as root, starts
//! each VM as a jailed `bulkhead run` supervisor, and keeps the audit log and its own alerts.
//! It knows nothing of HTTP: it answers in [`ServeError`]s, which [`super::http`] maps to status
//! codes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde_json::{json, Value};

use super::audit_log::{AuditError, AuditLog, DaemonAction, Record, Recovered};
use super::error::ServeError;
use super::quota;
use super::vms::{self, DiskId, VmExit, VmPaths, VmRecord, VmState};
use crate::api::launch::{self, Supervisor};
use crate::config::serve::{Quota, ServeConfig};
use crate::config::{random_vm_id, ConsoleConfig, RawConfig, RawJail, VmConfig};
use crate::jail::privileges::User;
use crate::telemetry::{Alert, AlertContext, Rule};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find this program to start VMs with: {0}")]
    Exe(#[source] std::io::Error),
}

/// Who a request comes from, once the socket and SO_PEERCRED agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Tenant { name: String, uid: u32 },
    Admin { uid: u32 },
}

/// A VM to start, as a request described it once checked.
pub struct Launch<'a> {
    pub tenant: &'a str,
    pub quota: &'a Quota,
    /// The uid its jail's vsock sockets are given to.
    pub socket_owner: u32,
    pub vm: &'a VmConfig,
    /// The settings with the tenant's files resolved, as the record keeps them.
    pub resolved: RawConfig,
    pub disks: Vec<DiskId>,
    /// The snapshot it starts from, the base of its first diff snapshot.
    pub snapshot: Option<String>,
}

/// The daemon: its settings, its VMs, its audit log and alerts.
pub struct Daemon {
    pub config: ServeConfig,
    exe: PathBuf,
    vms: Mutex<BTreeMap<String, VmRecord>>,
    audit: Mutex<AuditLog>,
    alerts: Mutex<File>,
    alert_seq: AtomicU64,
    hostname: String,
    /// VMs this daemon started (and waits for); the others were taken back after a restart.
    children: Mutex<BTreeSet<String>>,
    /// Each tenant uid as the kernel checks permissions for it.
    users: BTreeMap<u32, User>,
    /// Each tenant's path checks outstanding (`paths::check`).
    path_checks: BTreeMap<String, Arc<AtomicUsize>>,
    reaping: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these leaves plain data behind, still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Daemon {
    /// Opens the audit log and the alerts file, and takes back the VMs a previous daemon
    /// left running.
    pub fn open(config: ServeConfig) -> Result<Daemon, DaemonError> {
        for dir in [&config.state_dir, &config.state_dir.join("vms")] {
            std::fs::create_dir_all(dir).map_err(|source| DaemonError::Open {
                path: dir.clone(),
                source,
            })?;
        }
        if let Some(parent) = config.audit_log.parent() {
            std::fs::create_dir_all(parent).map_err(|source| DaemonError::Open {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let (audit, recovered) = AuditLog::open_recovering(&config.audit_log)?;
        let alerts_path = config.state_dir.join("alerts.jsonl");
        let alerts = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&alerts_path)
            .map_err(|source| DaemonError::Open {
                path: alerts_path,
                source,
            })?;
        let vms = vms::recover(&config.state_dir);
        let users = config
            .tenants
            .values()
            .flat_map(|t| t.uids.iter())
            .map(|&uid| (uid, User::lookup(uid)))
            .collect();
        let path_checks = config
            .tenants
            .keys()
            .map(|name| (name.clone(), Arc::new(AtomicUsize::new(0))))
            .collect();
        let daemon = Daemon {
            exe: std::env::current_exe().map_err(DaemonError::Exe)?,
            vms: Mutex::new(vms),
            audit: Mutex::new(audit),
            alerts: Mutex::new(alerts),
            alert_seq: AtomicU64::new(0),
            hostname: crate::supervisor::hostname(),
            children: Mutex::new(BTreeSet::new()),
            users,
            path_checks,
            reaping: Mutex::new(()),
            config,
        };
        if let Some(r) = recovered {
            daemon.recovered(r)?;
        }
        let tenants: Vec<String> = daemon.config.tenants.keys().cloned().collect();
        for tenant in tenants {
            daemon.reap_exited(&tenant);
        }
        Ok(daemon)
    }

    /// Logs and alerts how the audit log's unfinished last line was dealt with at start.
    fn recovered(&self, r: Recovered) -> Result<(), DaemonError> {
        let (reason, fields) = match &r {
            Recovered::Completed { line } => (
                format!("line {line} was whole but had no newline; the newline was added"),
                vec![("line", json!(line))],
            ),
            Recovered::Cut {
                offset,
                bytes,
                saved_to,
            } => (
                format!(
                    "an unfinished last line ({bytes} bytes at offset {offset}) was cut and kept in {}",
                    saved_to.display()
                ),
                vec![
                    ("offset", json!(offset)),
                    ("bytes", json!(bytes)),
                    ("saved_to", json!(saved_to)),
                ],
            ),
        };
        self.audit(Record::of_daemon(
            DaemonAction::Recover,
            None,
            self.config.audit_log.display().to_string(),
            None,
            200,
            reason.clone(),
        ))?;
        self.alert(
            Rule::ManagementAuditRecovered,
            "",
            "",
            format!("audit log: {reason}"),
            fields,
        );
        Ok(())
    }

    /// The user `uid` is, as permissions are checked for it.
    pub fn user(&self, uid: u32) -> User {
        self.users.get(&uid).cloned().unwrap_or(User {
            uid,
            gid: uid,
            groups: Vec::new(),
        })
    }

    /// `tenant`'s count of outstanding path checks.
    pub fn path_checks(&self, tenant: &str) -> Arc<AtomicUsize> {
        self.path_checks
            .get(tenant)
            .cloned()
            .unwrap_or_else(|| Arc::new(AtomicUsize::new(usize::MAX)))
    }

    pub fn vms(&self) -> MutexGuard<'_, BTreeMap<String, VmRecord>> {
        lock(&self.vms)
    }

    pub fn paths(&self, id: &str) -> VmPaths {
        VmPaths::new(&self.config.state_dir, id)
    }

    pub fn alerts_path(&self) -> PathBuf {
        self.config.state_dir.join("alerts.jsonl")
    }

    /// Changes VM `id`'s record with `f` and writes it.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut VmRecord)) {
        let mut vms = self.vms();
        if let Some(r) = vms.get_mut(id) {
            f(r);
            if let Err(e) = vms::save(&self.paths(id), r) {
                log::error!("{e}");
            }
        }
    }

    /// Forgets an ended VM and removes its directory.
    pub fn forget(&self, id: &str) {
        self.vms().remove(id);
        let dir = self.paths(id).dir;
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            log::warn!("cannot remove {}: {e}", dir.display());
        }
    }

    /// Appends one request to the audit log.
    pub fn audit(&self, record: Record) -> Result<(), AuditError> {
        let appended = lock(&self.audit).append(record, SystemTime::now());
        if let Err(e) = &appended {
            log::error!("AUDIT LOG WRITE FAILED: {}", crate::error_chain(e));
        }
        appended.map(|_| ())
    }

    /// Whether the audit log can take the next lines: checked before a request is acted on,
    /// which is refused when it can not (nothing is done that the log could not record).
    pub fn audit_ready(&self) -> Result<(), AuditError> {
        lock(&self.audit).reserve()
    }

    /// The audit log's length and head (the last line's hash).
    pub fn audit_head(&self) -> (u64, String) {
        let log = lock(&self.audit);
        (log.seq(), log.head().to_string())
    }

    /// Removes `tenant`'s oldest exited VMs past the `max_exited_vms` it may keep, each
    /// removal audited.
    pub fn reap_exited(&self, tenant: &str) {
        // One reaping at a time: two VMs ending together reap each record once.
        let _reaping = lock(&self.reaping);
        let Some(keep) = self.config.tenants.get(tenant).map(|t| t.max_exited_vms) else {
            return;
        };
        let mut exited: Vec<(String, String)> = self
            .vms()
            .values()
            .filter(|r| r.tenant == tenant && !r.state.is_live())
            .map(|r| {
                let when = r.ended.clone().unwrap_or_else(|| r.started.clone());
                (when, r.id.clone())
            })
            .collect();
        exited.sort();
        let excess = exited.len().saturating_sub(keep as usize);
        for (_, id) in exited.into_iter().take(excess) {
            self.forget(&id);
            let _ = self.audit(Record::of_daemon(
                DaemonAction::Reap,
                Some(tenant.to_string()),
                format!("/v1/vms/{id}"),
                Some(id.clone()),
                204,
                format!("tenant {tenant} keeps at most {keep} exited VMs; the oldest went"),
            ));
        }
    }

    /// Raises one of the management plane's alerts: a line in the daemon's alerts file, in
    /// the same layout as a VM's, and in the log.
    pub fn alert(
        &self,
        rule: Rule,
        vm_id: &str,
        tenant: &str,
        output: String,
        fields: Vec<(&'static str, Value)>,
    ) {
        let seq = self.alert_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let alert = Alert {
            time: SystemTime::now(),
            rule,
            output,
            fields,
            suppressed: 0,
        };
        let ctx = AlertContext {
            vm_id: vm_id.to_string(),
            tenant: tenant.to_string(),
            hostname: self.hostname.clone(),
        };
        let line = alert.to_json(&ctx, seq).to_string();
        log::warn!("alert {}: {}", rule.name(), alert.output);
        let mut f = lock(&self.alerts);
        if let Err(e) = f.write_all(format!("{line}\n").as_bytes()) {
            log::error!("cannot write the daemon's alerts file: {e}");
        }
    }

    /// Starts the VM `launch` describes, within its tenant's quota; returns its id.
    pub fn start(self: &Arc<Self>, launch: Launch<'_>) -> Result<String, ServeError> {
        let Launch {
            tenant,
            quota,
            socket_owner,
            vm,
            resolved,
            disks,
            snapshot,
        } = launch;
        let mut vms = self.vms();
        quota::check(quota, tenant, vms.values(), vm.vm.vcpus, vm.vm.mem_mib)?;
        let live: Vec<&VmRecord> = vms.values().filter(|r| r.state.is_live()).collect();
        // Disks of other VMs this one must not share, compared as files (a path resolved as
        // root, here, could be a tenant's hung mount).
        for other in &live {
            if other.disks.is_empty() {
                // A record from before disks were kept as files: its stored paths are the
                // resolved ones, compared as they are (never resolved again, as root).
                let theirs: Vec<&std::path::Path> = other
                    .config
                    .disks
                    .iter()
                    .flatten()
                    .map(|o| o.path.as_path())
                    .collect();
                if let Some(mine) = vm
                    .vm
                    .disks
                    .iter()
                    .find(|d| theirs.contains(&d.path.as_path()))
                {
                    return Err(ServeError::DiskInUse(mine.path.clone()));
                }
            }
            if let Some(d) = disks
                .iter()
                .find(|d| other.disks.iter().any(|o| o.clashes(d)))
            {
                let path = vm
                    .vm
                    .disks
                    .get(disks.iter().position(|x| x == d).unwrap_or(0))
                    .map(|c| c.path.clone())
                    .unwrap_or_default();
                return Err(ServeError::DiskInUse(path));
            }
        }
        let id = random_vm_id().map_err(ServeError::VmId)?;
        let paths = self.paths(&id);
        let config = RawConfig {
            vm_id: Some(id.clone()),
            console: Some(ConsoleConfig::File(paths.console()).to_string()),
            metrics_file: Some(paths.metrics()),
            control_socket: Some(paths.control()),
            // A CID is the VM's own (its host side is its sockets, in its jail): tenants
            // need not, and must not be able to, learn which CIDs others use.
            vsock_cid_shared: Some(true),
            alerts: Some(paths.alerts().display().to_string()),
            jail: Some(RawJail {
                dir: Some(self.config.run_dir.join("jail")),
                socket_owner: Some(socket_owner),
                ..RawJail::default()
            }),
            ..resolved.clone()
        };
        let made = std::fs::create_dir(&paths.dir)
            .and_then(|()| std::fs::write(paths.config(), config.to_json()));
        if let Err(e) = made {
            return Err(ServeError::Prepare {
                id,
                source: Box::new(e),
            });
        }
        // The VM's series exist before the answer: a scrape right after create finds them.
        let mut shape = vm.clone();
        shape.process.vm_id = id.clone();
        if let Err(e) = crate::supervisor::write_initial_metrics(&shape, &paths.metrics()) {
            let _ = std::fs::remove_dir_all(&paths.dir);
            return Err(ServeError::Prepare {
                id,
                source: Box::new(e),
            });
        }
        let log = File::create(paths.log()).map_err(ServeError::VmLog)?;
        let config_path = paths.config();
        let started = Supervisor::start(launch::Launch {
            exe: &self.exe,
            config: &config_path,
            log_level: None,
            no_seccomp: false,
            inherit: Vec::new(),
            output: Some(log),
            own_group: true,
            dies_with_us: false,
        });
        let supervisor = match started {
            Ok(s) => s,
            Err(source) => {
                let _ = std::fs::remove_dir_all(&paths.dir);
                return Err(ServeError::Start { id, source });
            }
        };
        let pid = Some(supervisor.pid());
        let record = VmRecord {
            id: id.clone(),
            tenant: tenant.to_string(),
            state: VmState::Running,
            pid,
            pid_start: pid.and_then(crate::procfs::start_time),
            started: vms::now_rfc3339(),
            exit: None,
            vcpus: vm.vm.vcpus,
            mem_mib: vm.vm.mem_mib,
            config: resolved,
            disks,
            ended: None,
            last_snapshot: snapshot,
        };
        if let Err(e) = vms::save(&paths, &record) {
            log::error!("{e}");
        }
        vms.insert(id.clone(), record);
        lock(&self.children).insert(id.clone());
        drop(vms);
        log::info!("VM {id} (tenant {tenant}) started, supervisor pid {pid:?}");
        let d = self.clone();
        let vm_id = id.clone();
        tokio::spawn(async move {
            let code = Some(supervisor.ended().await);
            // Files, the audit log's sync and reaping: off the event loop.
            let _ = tokio::task::spawn_blocking(move || {
                d.ended(&vm_id, code);
                lock(&d.children).remove(&vm_id);
            })
            .await;
        });
        Ok(id)
    }

    /// Records how VM `id` ended.
    pub fn ended(&self, id: &str, status: Option<i32>) {
        let exit = VmExit::seen(status, vms::exit_reason(&self.paths(id)));
        log::info!("VM {id} ended: {} (status {status:?})", exit.reason);
        let mut tenant = None;
        self.update(id, |r| {
            r.state = VmState::Exited;
            r.exit = Some(exit);
            r.ended = Some(vms::now_rfc3339_precise());
            tenant = Some(r.tenant.clone());
        });
        if let Some(t) = tenant {
            self.reap_exited(&t);
        }
    }

    /// Watches VMs taken back after a restart (not this daemon's children, so not waited
    /// for): each is looked at until its supervisor is gone.
    pub async fn watch_adopted(self: Arc<Self>) {
        loop {
            tokio::time::sleep(vms::ADOPTED_POLL).await;
            let children = lock(&self.children).clone();
            let gone: Vec<String> = self
                .vms()
                .values()
                .filter(|r| r.state.is_live() && !children.contains(&r.id))
                .filter(|r| {
                    r.pid
                        .is_some_and(|p| crate::procfs::start_time(p) != r.pid_start)
                })
                .map(|r| r.id.clone())
                .collect();
            if !gone.is_empty() {
                let d = self.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    for id in gone {
                        d.ended(&id, None);
                    }
                })
                .await;
            }
        }
    }
}
