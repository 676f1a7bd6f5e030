//! The audit's synthetic host (a daemon with two tenants, started for the purpose) and the
//! ways the checks act on it: as a tenant's uid, as an admin, and from outside the VM
//! processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{io, EvidenceError, ATTACKS, TENANT_A, TENANT_B};
use crate::api::client::{self, Answer, ClientError};
use crate::api::serve::report::Report;
use crate::jail::privileges;

/// The synthetic host: its directory, its config and its daemon.
pub(super) struct Host {
    pub(super) dir: PathBuf,
    pub(super) config_text: String,
    daemon: Child,
}

impl Host {
    pub(super) fn socket(&self, tenant: Option<&str>) -> PathBuf {
        match tenant {
            Some(t) => self.dir.join("run/tenants").join(format!("{t}.sock")),
            None => self.dir.join("run/admin.sock"),
        }
    }

    pub(super) fn file(&self, tenant: &str, name: &str) -> PathBuf {
        self.dir.join(tenant).join(name)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One request as `uid`, from a thread that switched to that uid alone.
pub(super) fn request_as(
    uid: u32,
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
    reason: Option<&str>,
) -> Result<Answer, ClientError> {
    let socket = socket.to_path_buf();
    let (method, path) = (method.to_string(), path.to_string());
    let reason = reason.map(str::to_string);
    let body = body.map(|b| b.to_string().into_bytes());
    std::thread::spawn(move || {
        // This thread makes one request, as `uid`, and ends.
        if uid != 0 {
            if let Err(source) = privileges::become_on_this_thread(uid) {
                return Err(ClientError::Connect {
                    path: socket,
                    source,
                });
            }
        }
        client::request(&socket, &method, &path, body.as_deref(), reason.as_deref())
    })
    .join()
    .unwrap_or_else(|_| {
        Err(ClientError::Garbled {
            path: PathBuf::from("(client thread panicked)"),
        })
    })
}

pub(super) fn as_json(a: &Result<Answer, ClientError>) -> Value {
    match a {
        Ok(a) => serde_json::from_slice(&a.body).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

pub(super) fn status(a: &Result<Answer, ClientError>) -> Value {
    match a {
        Ok(a) => json!(a.status),
        Err(e) => json!(format!("no connection: {e}")),
    }
}

pub(super) fn start_host(guests: &Path) -> Result<Host, EvidenceError> {
    // SAFETY: getpid has no preconditions.
    let dir = PathBuf::from(format!("/run/bulkhead-audit-{}", unsafe { libc::getpid() }));
    let _ = std::fs::remove_dir_all(&dir);
    for (tenant, uid) in [TENANT_A, TENANT_B] {
        let t = dir.join(tenant);
        std::fs::create_dir_all(&t).map_err(io("creating", &t))?;
        for g in ["exitcodes"].iter().copied().chain(ATTACKS.iter().copied()) {
            let from = if g == "exitcodes" {
                guests.join(g)
            } else {
                guests.join("attacks").join(g)
            };
            if !from.exists() {
                return Err(EvidenceError::NoGuest(from));
            }
            let to = t.join(g);
            std::fs::copy(&from, &to).map_err(io("copying", &to))?;
        }
        let disk = t.join("disk.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).map_err(io("writing", &disk))?;
        // The tenant's files are the tenant's: the daemon checks it may use them.
        for e in std::fs::read_dir(&t).into_iter().flatten().flatten() {
            std::os::unix::fs::chown(e.path(), Some(uid), Some(uid))
                .map_err(io("giving to the tenant", &e.path()))?;
        }
    }
    let tenant = |(name, uid): (&str, u32)| {
        (
            name.to_string(),
            json!({"uids": [uid], "paths": [dir.join(name)], "max_vms": 16,
                   "max_vcpus": 32, "max_mem_mib": 4096}),
        )
    };
    let config_text = json!({
        "run_dir": dir.join("run"), "state_dir": dir.join("state"),
        "audit_log": dir.join("audit.jsonl"), "admins": [0],
        "tenants": serde_json::Map::from_iter([tenant(TENANT_A), tenant(TENANT_B)]),
    })
    .to_string();
    let config = dir.join("serve.json");
    std::fs::write(&config, &config_text).map_err(io("writing", &config))?;
    let exe = std::env::current_exe().map_err(io("finding", Path::new("/proc/self/exe")))?;
    let log = dir.join("daemon.log");
    let log_file = std::fs::File::create(&log).map_err(io("creating", &log))?;
    let log_err = log_file.try_clone().map_err(io("creating", &log))?;
    let daemon = Command::new(exe)
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        .spawn()
        .map_err(io("starting the daemon from", &config))?;
    let host = Host {
        dir,
        config_text,
        daemon,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while client::request(&host.socket(None), "GET", "/v1/vms", None, None).is_err() {
        if Instant::now() > deadline {
            return Err(EvidenceError::Daemon(
                std::fs::read_to_string(&log).unwrap_or_default(),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(host)
}

/// Creates a VM for `tenant`; its id, or the refusal.
pub(super) fn create(h: &Host, tenant: (&str, u32), body: Value) -> Result<String, Value> {
    let a = request_as(
        tenant.1,
        &h.socket(Some(tenant.0)),
        "POST",
        "/v1/vms",
        Some(body),
        None,
    );
    match &a {
        Ok(ans) if ans.status == 201 => Ok(as_json(&a)["id"].as_str().unwrap_or("").to_string()),
        _ => Err(json!({"status": status(&a), "answer": as_json(&a)})),
    }
}

pub(super) fn get(h: &Host, tenant: (&str, u32), path: &str) -> Value {
    as_json(&request_as(
        tenant.1,
        &h.socket(Some(tenant.0)),
        "GET",
        path,
        None,
        None,
    ))
}

/// Waits until VM `id` has a confined VM process with at least two threads, or has ended.
pub(super) fn wait_running(h: &Host, tenant: (&str, u32), id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let report = get(h, tenant, &format!("/v1/vms/{id}/report"));
        let threads =
            serde_json::from_value::<Report>(report.clone()).map_or(0, |r| r.confined_threads());
        if threads >= 2 || report["state"] != "running" || Instant::now() > deadline {
            return report;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(super) fn wait_ended(h: &Host, tenant: (&str, u32), id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let vm = get(h, tenant, &format!("/v1/vms/{id}"));
        if vm["state"] == "exited" || vm["state"] == "lost" || Instant::now() > deadline {
            return vm;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Files (not directories) under `root`, skipping its `proc`.
pub(super) fn files_under(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            if path == root.join("proc") {
                continue;
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(path);
            } else if let Ok(rel) = path.strip_prefix(root) {
                found.push(format!("/{}", rel.display()));
            }
        }
    }
    found.sort();
    found
}

/// Whether a thread running as `uid` can open `path` for reading.
pub(super) fn can_open_as(uid: u32, path: PathBuf) -> bool {
    std::thread::spawn(move || {
        privileges::become_on_this_thread(uid).is_ok() && std::fs::File::open(path).is_ok()
    })
    .join()
    .unwrap_or(true)
}

pub(super) fn uid_of(pid: i64) -> Option<u32> {
    let real = *crate::procfs::ProcStatus::of_process(i32::try_from(pid).ok()?)
        .ok()?
        .numbers("Uid")?
        .first()?;
    u32::try_from(real).ok()
}
