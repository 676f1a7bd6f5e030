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

use super::daemon::{Daemon, Launch, Principal};
use super::paths::{self, Usable, Use, Verdict};
use super::vms::{DiskId, VmExit, VmRecord, VmState};
use crate::config::{host_mem_mib, PinnedFile, RawConfig, VmConfig};
use crate::telemetry::Rule;

/// The header an admin gives a reason in.
pub const REASON_HEADER: &str = "x-bulkhead-reason";
/// The largest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Every endpoint on one VM: (method, path after `/v1/vms/ID`).
pub const VM_ENDPOINTS: &[(&str, &str)] = &[
    ("GET", ""),
    ("GET", "/metrics"),
    ("GET", "/alerts"),
    ("GET", "/report"),
    ("POST", "/stop"),
    ("POST", "/pause"),
    ("POST", "/resume"),
    ("DELETE", ""),
];

/// An answer, with what the audit log needs to know about it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub content_type: &'static str,
    /// The VM the request was about, if any.
    pub vm: Option<String>,
    /// Why it was refused, or an admin's reason.
    pub audit_reason: Option<String>,
}

impl Reply {
    pub fn json(status: u16, value: Value) -> Reply {
        Reply {
            status,
            body: serde_json::to_vec(&value).unwrap_or_default(),
            content_type: "application/json",
            vm: None,
            audit_reason: None,
        }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Reply {
        let message = message.into();
        let mut r = Reply::json(status, json!({ "error": message }));
        r.audit_reason = Some(message);
        r
    }

    fn text(status: u16, content_type: &'static str, body: Vec<u8>) -> Reply {
        Reply {
            status,
            body,
            content_type,
            vm: None,
            audit_reason: None,
        }
    }

    fn about(mut self, vm: &str) -> Reply {
        self.vm = Some(vm.to_string());
        self
    }
}

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
        ("POST", ["v1", "vms"]) => create(d, who, &req),
        ("GET", ["v1", "vms"]) => list(d, who),
        ("GET", ["v1", "audit-log"]) => admin_file(who, &d.config.audit_log, "audit log"),
        ("GET", ["v1", "audit-log", "head"]) => audit_head(d, who),
        ("GET", ["v1", "alerts"]) => admin_file(who, &d.alerts_path(), "daemon alerts"),
        (method, ["v1", "vms", id, rest @ ..]) => {
            let id = id.to_string();
            let record = match find(d, who, &id, &req) {
                Ok(r) => r,
                Err(reply) => return reply.about(&id),
            };
            let mut reply = match (method, rest) {
                ("GET", []) => Reply::json(200, describe(&record, true)),
                ("DELETE", []) => delete(d, &record),
                ("POST", ["stop"]) => stop(d, &record),
                ("POST", ["pause"]) => pause(d, &record, true),
                ("POST", ["resume"]) => pause(d, &record, false),
                ("GET", ["metrics"]) => vm_file(d, &record, "metrics"),
                ("GET", ["alerts"]) => vm_file(d, &record, "alerts"),
                ("GET", ["report"]) => report(d, &record, req.query.as_deref()),
                _ => Reply::error(404, format!("no such endpoint: {} {}", method, req.path)),
            };
            if let Principal::Admin { .. } = who {
                // The break-glass reason is what the audit line keeps for an allowed request.
                if reply.status < 400 {
                    reply.audit_reason = req.reason.clone();
                }
            }
            reply.about(&id)
        }
        _ => Reply::error(
            404,
            format!("no such endpoint: {} {}", req.method, req.path),
        ),
    }
}

/// The VM `id` as `who` may see it. Another tenant's VM is answered as a missing one (and
/// alerted on); an admin must give a reason.
fn find(d: &Arc<Daemon>, who: &Principal, id: &str, req: &Request) -> Result<VmRecord, Reply> {
    let missing = || Reply::error(404, format!("no VM {id}"));
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
            _ => Err(Reply::error(
                403,
                "an admin acting on a tenant's VM must give a reason (X-Bulkhead-Reason, at most 512 bytes)",
            )),
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
fn audit_head(d: &Arc<Daemon>, who: &Principal) -> Reply {
    if !matches!(who, Principal::Admin { .. }) {
        return Reply::error(403, "the audit log is for admins, on the admin socket");
    }
    let (seq, head) = d.audit_head();
    Reply::json(200, json!({ "seq": seq, "head": head }))
}

fn admin_file(who: &Principal, path: &Path, what: &str) -> Reply {
    if !matches!(who, Principal::Admin { .. }) {
        return Reply::error(
            403,
            format!("the {what} is for admins, on the admin socket"),
        );
    }
    match std::fs::read(path) {
        Ok(bytes) => Reply::text(200, "application/x-ndjson", bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Reply::text(200, "application/x-ndjson", Vec::new())
        }
        Err(e) => Reply::error(500, format!("cannot read the {what}: {e}")),
    }
}

fn vm_file(d: &Arc<Daemon>, r: &VmRecord, which: &str) -> Reply {
    let paths = d.paths(&r.id);
    let (path, kind) = match which {
        "metrics" => (paths.metrics(), "text/plain; version=0.0.4"),
        _ => (paths.alerts(), "application/x-ndjson"),
    };
    match std::fs::read(&path) {
        Ok(bytes) => Reply::text(200, kind, bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Reply::text(200, kind, Vec::new()),
        Err(e) => Reply::error(500, format!("cannot read the VM's {which}: {e}")),
    }
}

fn report(d: &Arc<Daemon>, r: &VmRecord, query: Option<&str>) -> Reply {
    let report = super::report::build(d, r);
    let markdown = query.is_some_and(|q| q.split('&').any(|p| p == "format=md"));
    if markdown {
        Reply::text(
            200,
            "text/markdown; charset=utf-8",
            super::report::markdown(&report).into_bytes(),
        )
    } else {
        Reply::json(200, report)
    }
}

fn stop(d: &Arc<Daemon>, r: &VmRecord) -> Reply {
    if !r.state.is_live() {
        return Reply::error(409, format!("VM {} is not running ({:?})", r.id, r.state));
    }
    let Some(pid) = live_supervisor(r) else {
        return Reply::error(409, format!("VM {} is not running", r.id));
    };
    if let Some(vm) = crate::procfs::first_child(pid) {
        // A paused VM process would not see the supervisor's SIGTERM until it runs again.
        let _ = crate::process::signal(vm, libc::SIGCONT);
    }
    if crate::process::signal(pid, libc::SIGTERM).is_err() {
        // It ended a moment ago.
        return Reply::error(409, format!("VM {} is not running", r.id));
    }
    d.update(&r.id, |rec| {
        if rec.state.is_live() {
            rec.state = VmState::Stopping;
        }
    });
    Reply::json(202, json!({ "id": r.id, "state": "stopping" }))
}

fn pause(d: &Arc<Daemon>, r: &VmRecord, pause: bool) -> Reply {
    let (from, to, signal) = if pause {
        (VmState::Running, VmState::Paused, libc::SIGSTOP)
    } else {
        (VmState::Paused, VmState::Running, libc::SIGCONT)
    };
    if r.state != from {
        return Reply::error(
            409,
            format!("VM {} is {:?}, not {:?}", r.id, r.state, from).to_lowercase(),
        );
    }
    // The VM process, not the supervisor: the supervisor goes on watching and reporting.
    let Some(vm) = live_supervisor(r).and_then(crate::procfs::first_child) else {
        return Reply::error(409, format!("VM {} is not running", r.id));
    };
    if crate::process::signal(vm, signal).is_err() {
        return Reply::error(409, format!("VM {} is not running", r.id));
    }
    d.update(&r.id, |rec| rec.state = to);
    Reply::json(200, json!({ "id": r.id, "state": to }))
}

/// The VM's supervisor, if it is still the process the record names (same pid and start
/// time): a pid reused since is never signalled.
fn live_supervisor(r: &VmRecord) -> Option<i32> {
    r.pid
        .filter(|&pid| r.pid_start.is_some() && crate::procfs::start_time(pid) == r.pid_start)
}

fn delete(d: &Arc<Daemon>, r: &VmRecord) -> Reply {
    if r.state.is_live() {
        return Reply::error(409, format!("VM {} is still running: stop it first", r.id));
    }
    d.forget(&r.id);
    Reply::text(204, "application/json", Vec::new())
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
    ];
    set.into_iter()
        .find(|(is_set, _, _)| *is_set)
        .map(|(_, field, why)| (field, why))
}

fn create(d: &Arc<Daemon>, who: &Principal, req: &Request) -> Reply {
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return Reply::error(400, "the body must be a JSON object"),
        Err(e) => return Reply::error(400, format!("the body is not JSON: {e}")),
    };
    let raw = match serde_json::from_value::<RawConfig>(body.clone()) {
        Ok(r) => r,
        Err(e) => return Reply::error(400, format!("invalid VM settings: {e}")),
    };
    let tenant = match (who, raw.tenant.as_deref()) {
        (Principal::Tenant { name, .. }, Some(t)) if t != name => {
            return Reply::error(
                403,
                format!("the body names tenant {t}, but this socket is tenant {name}'s"),
            )
        }
        (Principal::Tenant { name, .. }, _) => name.clone(),
        (Principal::Admin { .. }, None) => {
            return Reply::error(422, "an admin creating a VM must name its tenant")
        }
        (Principal::Admin { .. }, Some(t)) => {
            if req.reason.as_deref().map_or(true, |r| r.trim().is_empty()) {
                return Reply::error(
                    403,
                    "an admin acting for a tenant must give a reason (X-Bulkhead-Reason)",
                );
            }
            t.to_string()
        }
    };
    let Some(t) = d.config.tenants.get(&tenant) else {
        return Reply::error(422, format!("no tenant {tenant}"));
    };
    if let Some((field, why)) = daemon_field(&raw) {
        return Reply::error(422, format!("\"{field}\" can not be set here: {why}"));
    }
    if raw.seccomp == Some(false) {
        return Reply::error(
            422,
            "\"seccomp\": false is never allowed through the daemon",
        );
    }
    if raw
        .console
        .as_deref()
        .is_some_and(|c| c != "none" && c != "file")
    {
        return Reply::error(
            422,
            "\"console\" may only be \"none\": the daemon keeps the console in the VM's directory",
        );
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
    let check = |what: &str, p: &Path, use_: Use| -> Result<Usable, Reply> {
        if !p.is_absolute() {
            return Err(Reply::error(
                422,
                format!("{what} {} must be an absolute path", p.display()),
            ));
        }
        match paths::check(t, &user, p, use_, &pending) {
            Verdict::Usable(u) => Ok(u),
            Verdict::Refused => Err(Reply::error(
                403,
                format!(
                    "{what} {} is not a file tenant {tenant} may use",
                    p.display()
                ),
            )),
            Verdict::TooSlow => Err(Reply::error(
                403,
                format!(
                    "{what} {} did not answer within {} s",
                    p.display(),
                    paths::DEADLINE.as_secs()
                ),
            )),
            Verdict::Busy => Err(Reply::error(
                503,
                format!(
                    "tenant {tenant} has {} file checks still running; try again later",
                    paths::MAX_PENDING
                ),
            )),
        }
    };
    let Some(kernel) = raw.kernel.as_deref() else {
        return Reply::error(422, "no kernel given");
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
    match check("kernel", kernel, Use::Boot) {
        Ok(u) => {
            pin(&u);
            resolved.kernel = Some(u.path);
        }
        Err(r) => return r,
    }
    if let Some(initrd) = raw.initrd.as_deref() {
        match check("initrd", initrd, Use::Boot) {
            Ok(u) => {
                pin(&u);
                resolved.initrd = Some(u.path);
            }
            Err(r) => return r,
        }
    }
    let mut disks = Vec::new();
    let mut disk_ids = Vec::new();
    for disk in raw.disks.iter().flatten() {
        let write = !disk.read_only;
        match check("disk", &disk.path, Use::Disk { write }) {
            Ok(u) => {
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
            Err(r) => return r,
        }
    }
    resolved.disks = raw.disks.as_ref().map(|_| disks.clone());
    resolved.pinned_files = Some(pins);
    resolved.tenant = Some(tenant.clone());
    resolved.console = Some("none".to_string());
    // The console file lives in the daemon's state directory: its size is the tenant's cap.
    match raw.console_limit {
        Some(asked) if asked > t.console_limit => {
            return Reply::error(
                422,
                format!(
                    "console_limit {asked} is above tenant {tenant}'s cap of {} bytes",
                    t.console_limit
                ),
            )
        }
        Some(asked) => resolved.console_limit = Some(asked),
        None => resolved.console_limit = Some(t.console_limit),
    }
    let vm = match VmConfig::from_raw(resolved.clone(), host_mem_mib()) {
        Ok(vm) => vm,
        Err(e) => return Reply::error(422, e.to_string()),
    };
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
    };
    match d.start(launch) {
        Ok(id) => {
            let mut reply = Reply::json(201, json!({ "id": id })).about(&id);
            if let Principal::Admin { .. } = who {
                reply.audit_reason = req.reason.clone();
            }
            reply
        }
        Err(reply) => reply,
    }
}

/// How an ended VM is described when its supervisor's status is known.
pub fn ended(status: Option<i32>, reason: Option<String>) -> VmExit {
    let reason = reason.unwrap_or_else(|| match status {
        Some(s) => format!("supervisor_exit_{s}"),
        None => "killed".to_string(),
    });
    VmExit { status, reason }
}
