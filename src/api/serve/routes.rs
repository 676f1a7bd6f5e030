//! What each management request may do, and its answer. Every request is decided here, with
//! its caller (from SO_PEERCRED) and the socket it came in on, then audited by the server.
//!
//! - A tenant socket serves its own tenant's members only; a VM of another tenant answers 404,
//!   exactly like a missing one, and raises `management_cross_tenant`.
//! - The admin socket serves admins; acting on a tenant's VM needs a reason
//!   (`X-Bulkhead-Reason`), which is audited and raises `management_admin_override`.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};

use super::error::ServeError;
use super::http::Reply;
use super::paths::{self, Usable, Use, Verdict};
use super::registry::{Daemon, Launch, Principal};
use super::snapshots;
use super::vms::{DiskId, VmRecord, VmState};
use crate::config::{host_mem_mib, PinnedFile, RawConfig, VmConfig};
use crate::telemetry::Rule;

/// Every endpoint on one VM: (method, path after `/v1/vms/ID`).
pub const VM_ENDPOINTS: &[(&str, &str)] = &[
    ("GET", ""),
    ("GET", "/metrics"),
    ("GET", "/alerts"),
    ("GET", "/report"),
    ("POST", "/stop"),
    ("POST", "/pause"),
    ("POST", "/resume"),
    ("POST", "/snapshot"),
    ("DELETE", ""),
];

/// One request, as the router sees it.
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub reason: Option<String>,
    pub body: Vec<u8>,
}

/// Routes `req` from `who` (already known to be allowed on its socket).
pub fn route(d: &Arc<Daemon>, who: &Principal, req: Request) -> Reply {
    let parts: Vec<&str> = req.path.trim_end_matches('/').split('/').skip(1).collect();
    match (req.method.as_str(), parts.as_slice()) {
        ("POST", ["v1", "vms"]) => create(d, who, &req).unwrap_or_else(Reply::from),
        ("GET", ["v1", "vms"]) => list(d, who),
        ("GET", ["v1", "snapshots"]) => snapshots::list(d, who),
        ("DELETE", ["v1", "snapshots", id]) => snapshots::delete(d, who, id).about(id),
        ("GET", ["v1", "audit-log"]) => {
            admin_file(who, &d.config.audit_log, "audit log").unwrap_or_else(Reply::from)
        }
        ("GET", ["v1", "audit-log", "head"]) => audit_head(d, who).unwrap_or_else(Reply::from),
        ("GET", ["v1", "alerts"]) => {
            admin_file(who, &d.alerts_path(), "daemon alerts").unwrap_or_else(Reply::from)
        }
        (method, ["v1", "vms", id, rest @ ..]) => {
            let id = id.to_string();
            let record = match find(d, who, &id, &req) {
                Ok(r) => r,
                Err(reply) => return reply.about(&id),
            };
            let answered = match (method, rest) {
                ("GET", []) => Ok(Reply::json(200, describe(&record, true))),
                ("DELETE", []) => delete(d, &record),
                ("POST", ["stop"]) => stop(d, &record),
                ("POST", ["pause"]) => pause(d, &record, true),
                ("POST", ["resume"]) => pause(d, &record, false),
                ("POST", ["snapshot"]) => snapshots::take(d, &record, &req.body),
                ("GET", ["metrics"]) => vm_file(d, &record, VmFile::Metrics),
                ("GET", ["alerts"]) => vm_file(d, &record, VmFile::Alerts),
                ("GET", ["report"]) => Ok(report(d, &record, req.query.as_deref())),
                _ => Err(no_endpoint(&req)),
            };
            let mut reply = answered.unwrap_or_else(Reply::from);
            if let Principal::Admin { .. } = who {
                // The break-glass reason is what the audit line keeps for an allowed request.
                if reply.status < 400 {
                    reply.audit_reason = req.reason.clone();
                }
            }
            reply.about(&id)
        }
        _ => Reply::from(no_endpoint(&req)),
    }
}

fn no_endpoint(req: &Request) -> ServeError {
    ServeError::NoEndpoint {
        method: req.method.clone(),
        path: req.path.clone(),
    }
}

/// The VM `id` as `who` may see it. Another tenant's VM is answered as a missing one (and
/// alerted on); an admin must give a reason.
fn find(d: &Arc<Daemon>, who: &Principal, id: &str, req: &Request) -> Result<VmRecord, Reply> {
    let missing = || Reply::from(ServeError::NoVm(id.to_string()));
    let record = d.vms().get(id).cloned();
    match (who, record) {
        (_, None) => Err(missing()),
        (Principal::Tenant { name, uid }, Some(r)) if &r.tenant != name => {
            d.alert(
                Rule::ManagementCrossTenant,
                &r.id,
                &r.tenant,
                format!(
                    "tenant {name} (uid {uid}) asked for {} {} of a VM of another tenant",
                    req.method, req.path
                ),
                vec![
                    ("caller_tenant", json!(name)),
                    ("caller_uid", json!(uid)),
                    ("method", json!(req.method)),
                    ("path", json!(req.path)),
                ],
            );
            let mut reply = missing();
            reply.audit_reason = Some(format!("cross_tenant: the VM belongs to {}", r.tenant));
            Err(reply)
        }
        (Principal::Tenant { .. }, Some(r)) => Ok(r),
        (Principal::Admin { uid }, Some(r)) => match req.reason.as_deref().map(str::trim) {
            Some(reason) if !reason.is_empty() && reason.len() <= 512 => {
                d.alert(
                    Rule::ManagementAdminOverride,
                    &r.id,
                    &r.tenant,
                    format!(
                        "admin uid {uid} did {} {} on a VM of tenant {}: {reason}",
                        req.method, req.path, r.tenant
                    ),
                    vec![
                        ("admin_uid", json!(uid)),
                        ("method", json!(req.method)),
                        ("path", json!(req.path)),
                        ("reason", json!(reason)),
                    ],
                );
                Ok(r)
            }
            _ => Err(Reply::from(ServeError::NoAdminReason)),
        },
    }
}

fn describe(r: &VmRecord, full: bool) -> Value {
    let mut v = json!({
        "id": r.id,
        "tenant": r.tenant,
        "state": r.state,
        "pid": r.pid,
        "vm_process_pid": r.pid.filter(|_| r.state.is_live()).and_then(crate::procfs::first_child),
        "started": r.started,
        "exit": r.exit,
        "vcpus": r.vcpus,
        "mem_mib": r.mem_mib,
    });
    if full {
        v["config"] = serde_json::to_value(&r.config).unwrap_or(Value::Null);
    }
    v
}

fn list(d: &Arc<Daemon>, who: &Principal) -> Reply {
    let vms: Vec<Value> = d
        .vms()
        .values()
        .filter(|r| match who {
            Principal::Tenant { name, .. } => &r.tenant == name,
            Principal::Admin { .. } => true,
        })
        .map(|r| describe(r, false))
        .collect();
    Reply::json(200, json!({ "vms": vms }))
}

/// The audit log's length and head, for an admin to keep elsewhere: `bulkhead audit-log
/// verify --head HASH` then tells whether the log was cut or rewritten before it. (This
/// request's own line comes after the head it answers.)
fn audit_head(d: &Arc<Daemon>, who: &Principal) -> Result<Reply, ServeError> {
    if !matches!(who, Principal::Admin { .. }) {
        return Err(ServeError::AdminsOnly("audit log"));
    }
    let (seq, head) = d.audit_head();
    Ok(Reply::json(200, json!({ "seq": seq, "head": head })))
}

fn admin_file(who: &Principal, path: &Path, what: &'static str) -> Result<Reply, ServeError> {
    if !matches!(who, Principal::Admin { .. }) {
        return Err(ServeError::AdminsOnly(what));
    }
    let bytes = read_or_empty(path).map_err(|source| ServeError::Read {
        what: what.to_string(),
        source,
    })?;
    Ok(Reply::text(200, "application/x-ndjson", bytes))
}

/// A VM's output files a caller may read.
#[derive(Debug, Clone, Copy)]
enum VmFile {
    Metrics,
    Alerts,
}

fn vm_file(d: &Arc<Daemon>, r: &VmRecord, which: VmFile) -> Result<Reply, ServeError> {
    let paths = d.paths(&r.id);
    let (path, kind, what) = match which {
        VmFile::Metrics => (paths.metrics(), "text/plain; version=0.0.4", "metrics"),
        VmFile::Alerts => (paths.alerts(), "application/x-ndjson", "alerts"),
    };
    let bytes = read_or_empty(&path).map_err(|source| ServeError::Read {
        what: format!("VM's {what}"),
        source,
    })?;
    Ok(Reply::text(200, kind, bytes))
}

/// A file's bytes; none when it is not there (yet).
fn read_or_empty(path: &Path) -> std::io::Result<Vec<u8>> {
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        read => read,
    }
}

fn report(d: &Arc<Daemon>, r: &VmRecord, query: Option<&str>) -> Reply {
    let report = super::report::build(d, r);
    let markdown = query.is_some_and(|q| q.split('&').any(|p| p == "format=md"));
    if markdown {
        Reply::text(
            200,
            "text/markdown; charset=utf-8",
            report.markdown().into_bytes(),
        )
    } else {
        Reply::json(200, serde_json::to_value(&report).unwrap_or(Value::Null))
    }
}

fn stop(d: &Arc<Daemon>, r: &VmRecord) -> Result<Reply, ServeError> {
    if !r.state.is_live() {
        return Err(ServeError::NotLive {
            id: r.id.clone(),
            state: r.state,
        });
    }
    let Some(pid) = live_supervisor(r) else {
        return Err(ServeError::NotRunning(r.id.clone()));
    };
    if let Some(vm) = crate::procfs::first_child(pid) {
        // A paused VM process would not see the supervisor's SIGTERM until it runs again.
        let _ = crate::process::signal(vm, libc::SIGCONT);
    }
    if crate::process::signal(pid, libc::SIGTERM).is_err() {
        // It ended a moment ago.
        return Err(ServeError::NotRunning(r.id.clone()));
    }
    d.update(&r.id, |rec| {
        if rec.state.is_live() {
            rec.state = VmState::Stopping;
        }
    });
    Ok(Reply::json(202, json!({ "id": r.id, "state": "stopping" })))
}

fn pause(d: &Arc<Daemon>, r: &VmRecord, pause: bool) -> Result<Reply, ServeError> {
    let (from, to, signal) = if pause {
        (VmState::Running, VmState::Paused, libc::SIGSTOP)
    } else {
        (VmState::Paused, VmState::Running, libc::SIGCONT)
    };
    if r.state != from {
        return Err(ServeError::WrongState {
            id: r.id.clone(),
            state: r.state,
            want: from,
        });
    }
    // The vCPUs park in the VM process, whose VMM thread goes on serving (so a paused VM can
    // be snapshotted); a VM an older daemon started has no control socket, and its VM process
    // is stopped whole instead. The supervisor goes on watching and reporting either way.
    let control = d.paths(&r.id).control();
    let paused = if control.exists() {
        crate::snapshot::client::pause(&control, pause).is_ok()
    } else {
        let vm = live_supervisor(r).and_then(crate::procfs::first_child);
        vm.is_some_and(|vm| crate::process::signal(vm, signal).is_ok())
    };
    if !paused {
        return Err(ServeError::NotRunning(r.id.clone()));
    }
    d.update(&r.id, |rec| rec.state = to);
    Ok(Reply::json(200, json!({ "id": r.id, "state": to })))
}

/// The VM's supervisor, if it is still the process the record names (same pid and start
/// time): a pid reused since is never signalled.
fn live_supervisor(r: &VmRecord) -> Option<i32> {
    r.pid
        .filter(|&pid| r.pid_start.is_some() && crate::procfs::start_time(pid) == r.pid_start)
}

fn delete(d: &Arc<Daemon>, r: &VmRecord) -> Result<Reply, ServeError> {
    if r.state.is_live() {
        return Err(ServeError::StillRunning(r.id.clone()));
    }
    d.forget(&r.id);
    Ok(Reply::text(204, "application/json", Vec::new()))
}

/// The field of `raw` a tenant's body may not set, and why, if it sets one: the daemon sets
/// them (identity, outputs, jail), or they would reach beyond the tenant's compartment.
fn daemon_field(raw: &RawConfig) -> Option<(&'static str, &'static str)> {
    let set = [
        (
            raw.vm_id.is_some(),
            "vm_id",
            "VM ids are assigned by the daemon",
        ),
        (
            raw.metrics_file.is_some(),
            "metrics_file",
            "the daemon keeps each VM's metrics",
        ),
        (
            raw.alerts.is_some(),
            "alerts",
            "the daemon keeps each VM's alerts",
        ),
        (
            raw.alerts_http.is_some(),
            "alerts_http",
            "alerts leave the host through the operator's pipeline only",
        ),
        (
            raw.kvm_device.is_some(),
            "kvm_device",
            "the KVM device is the host's",
        ),
        (
            raw.jail.is_some(),
            "jail",
            "every VM is jailed by the daemon",
        ),
        (
            raw.nets.is_some(),
            "nets",
            "network devices are not offered through the daemon yet",
        ),
        (
            raw.shares.is_some() || raw.virtiofsd.is_some(),
            "shares",
            "host directories are not shared through the daemon yet",
        ),
        (
            raw.control_fd.is_some(),
            "control_fd",
            "the control channel is the Firecracker personality's",
        ),
        (
            raw.handover_fd.is_some(),
            "handover_fd",
            "handing a VM over is the Firecracker personality's",
        ),
        (
            raw.pinned_files.is_some(),
            "pinned_files",
            "the daemon pins the files it checked",
        ),
        (
            raw.vsock_cid_shared.is_some(),
            "vsock_cid_shared",
            "the daemon sets it",
        ),
        (
            raw.control_socket.is_some(),
            "control_socket",
            "the daemon keeps each VM's control socket",
        ),
        (
            raw.restore.is_some() || raw.start_paused.is_some(),
            "restore",
            "name one of your snapshots as \"snapshot\" instead",
        ),
    ];
    set.into_iter()
        .find(|(is_set, _, _)| *is_set)
        .map(|(_, field, why)| (field, why))
}

/// `POST /v1/vms`.
fn create(d: &Arc<Daemon>, who: &Principal, req: &Request) -> Result<Reply, ServeError> {
    let mut body: Value = match serde_json::from_slice(&req.body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return Err(ServeError::NotAnObject),
        Err(e) => return Err(ServeError::NotJson(e)),
    };
    // `"snapshot": ID`: the VM starts from one of the tenant's snapshots.
    let snapshot = match body.as_object_mut().and_then(|o| o.remove("snapshot")) {
        Some(Value::String(id)) => Some(id),
        Some(_) => return Err(ServeError::NoSnapshot("(not a string)".into())),
        None => None,
    };
    let raw = serde_json::from_value::<RawConfig>(body).map_err(ServeError::Settings)?;
    let tenant = match (who, raw.tenant.as_deref()) {
        (Principal::Tenant { name, .. }, Some(t)) if t != name => {
            return Err(ServeError::OtherTenant {
                named: t.to_string(),
                socket: name.clone(),
            })
        }
        (Principal::Tenant { name, .. }, _) => name.clone(),
        (Principal::Admin { .. }, None) => return Err(ServeError::NoTenantNamed),
        (Principal::Admin { .. }, Some(t)) => {
            if req.reason.as_deref().map_or(true, |r| r.trim().is_empty()) {
                return Err(ServeError::NoAdminReasonToCreate);
            }
            t.to_string()
        }
    };
    let Some(t) = d.config.tenants.get(&tenant) else {
        return Err(ServeError::NoSuchTenant(tenant));
    };
    if let Some((field, why)) = daemon_field(&raw) {
        return Err(ServeError::DaemonField { field, why });
    }
    if raw.seccomp == Some(false) {
        return Err(ServeError::SeccompOff);
    }
    if raw
        .console
        .as_deref()
        .is_some_and(|c| c != "none" && c != "file")
    {
        return Err(ServeError::Console);
    }
    // Every file must be in the tenant's directories, before and after resolving symlinks,
    // and one the caller may open as they are (read, and write for a writable disk): checked
    // by a thread with the caller's credentials, never as root, within a deadline. Whether a
    // file is missing, elsewhere or not theirs, the answer is the same, so the daemon tells
    // nobody what exists outside their directories. The VM's jail then opens the resolved
    // path following no symlink, so a path re-pointed since can not bring in another file.
    let mut resolved = raw.clone();
    let uid = t.uids.iter().next().copied().unwrap_or(0);
    let user = match who {
        Principal::Tenant { uid, .. } => d.user(*uid),
        Principal::Admin { .. } => d.user(uid),
    };
    let pending = d.path_checks(&tenant);
    let check = |what: &'static str, p: &Path, use_: Use| -> Result<Usable, ServeError> {
        if !p.is_absolute() {
            return Err(ServeError::RelativePath {
                what,
                path: p.to_path_buf(),
            });
        }
        match paths::check(t, &user, p, use_, &pending) {
            Verdict::Usable(u) => Ok(u),
            Verdict::Refused => Err(ServeError::FileRefused {
                what,
                path: p.to_path_buf(),
                tenant: tenant.clone(),
            }),
            Verdict::TooSlow => Err(ServeError::FileTooSlow {
                what,
                path: p.to_path_buf(),
                secs: paths::DEADLINE.as_secs(),
            }),
            Verdict::Busy => Err(ServeError::ChecksBusy {
                tenant: tenant.clone(),
                max: paths::MAX_PENDING,
            }),
        }
    };
    // From a snapshot, the machine is the snapshot's: the body gives who runs it and how (and
    // may move its vsock socket), and the snapshot's disks are checked as the tenant's files
    // again, as a boot's would be.
    let machine = match &snapshot {
        Some(id) => {
            if let Some(field) = raw
                .machine_fields_given()
                .into_iter()
                .find(|f| *f != "vsock")
            {
                return Err(ServeError::SnapshotMachine(field));
            }
            // Another tenant's snapshot is answered as a missing one, already made (with its
            // alert, and the reason for the audit line).
            let paths = match snapshots::find(d, who, &tenant, id) {
                Ok(paths) => paths,
                Err(refused) => return Ok(refused),
            };
            // A diff's memory is laid over its chain first (once; kept beside it).
            let mem = match snapshots::memory_of(d, who, &tenant, &paths) {
                Ok(mem) => mem,
                Err(refused) => return Ok(refused),
            };
            resolved.restore = Some(crate::config::RawRestore {
                state: paths.state(),
                mem,
            });
            Some(
                crate::snapshot::restore_settings(resolved.clone())
                    .map_err(ServeError::SnapshotSettings)?,
            )
        }
        None => None,
    };
    // Each file as checked, by identity: the jail refuses a path that names another file by
    // the time it opens it (as root), so a swap after the check gains the tenant nothing.
    let mut pins = Vec::new();
    let mut pin = |u: &Usable| {
        pins.push(PinnedFile {
            path: u.path.clone(),
            dev: u.dev,
            ino: u.ino,
        })
    };
    if machine.is_none() {
        let Some(kernel) = raw.kernel.as_deref() else {
            return Err(ServeError::NoKernel);
        };
        let u = check("kernel", kernel, Use::Boot)?;
        pin(&u);
        resolved.kernel = Some(u.path);
        if let Some(initrd) = raw.initrd.as_deref() {
            let u = check("initrd", initrd, Use::Boot)?;
            pin(&u);
            resolved.initrd = Some(u.path);
        }
    }
    let mut disks = Vec::new();
    let mut disk_ids = Vec::new();
    let all_disks = machine.as_ref().unwrap_or(&raw).disks.clone();
    for disk in all_disks.iter().flatten() {
        let write = !disk.read_only;
        let u = check("disk", &disk.path, Use::Disk { write })?;
        pin(&u);
        let mut disk = disk.clone();
        disk.path = u.path;
        disks.push(disk);
        disk_ids.push(DiskId {
            dev: u.dev,
            ino: u.ino,
            writable: write,
        });
    }
    if machine.is_none() {
        resolved.disks = raw.disks.as_ref().map(|_| disks.clone());
    }
    resolved.pinned_files = Some(pins);
    resolved.tenant = Some(tenant.clone());
    resolved.console = Some("none".to_string());
    // The console file lives in the daemon's state directory: its size is the tenant's cap.
    match raw.console_limit {
        Some(asked) if asked > t.console_limit => {
            return Err(ServeError::ConsoleLimit {
                asked,
                tenant,
                cap: t.console_limit,
            })
        }
        Some(asked) => resolved.console_limit = Some(asked),
        None => resolved.console_limit = Some(t.console_limit),
    }
    // What the VM will be: for a snapshot, its machine with this request's settings over it
    // (the supervisor makes the same from the same files). The settings read from the state
    // file above already are that machine; only process fields were added since.
    let effective = match machine {
        Some(machine) => machine.overlay(resolved.clone()),
        None => resolved.clone(),
    };
    let vm = VmConfig::from_raw(effective, host_mem_mib()).map_err(ServeError::Invalid)?;
    if let Principal::Admin { uid: admin } = who {
        let reason = req.reason.clone().unwrap_or_default();
        d.alert(
            Rule::ManagementAdminOverride,
            "",
            &tenant,
            format!("admin uid {admin} created a VM for tenant {tenant}: {reason}"),
            vec![
                ("admin_uid", json!(admin)),
                ("method", json!(req.method)),
                ("path", json!(req.path)),
                ("reason", json!(reason)),
            ],
        );
    }
    let launch = Launch {
        tenant: &tenant,
        quota: &t.quota,
        socket_owner: uid,
        vm: &vm,
        resolved,
        disks: disk_ids,
        snapshot,
    };
    let id = d.start(launch)?;
    let mut reply = Reply::json(201, json!({ "id": id })).about(&id);
    if let Principal::Admin { .. } = who {
        reply.audit_reason = req.reason.clone();
    }
    Ok(reply)
}
