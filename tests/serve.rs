//! `bulkhead serve`: two tenants' VMs side by side behind their own sockets. Every
//! cross-tenant attempt is refused exactly like a request for a missing VM, audited and
//! alerted; admins act only with a reason; bad, oversized and slow requests get a 4xx and the
//! daemon serves on; a killed VM is reported and a restarted daemon takes its VMs back; and a
//! load of concurrent clients leaves no error and bounded memory.
//!
//! Requests are made as the tenants' uids from threads that switched their own credentials
//! (`become_on_this_thread`), so SO_PEERCRED sees the tenant.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead::api::client::{self, Answer, ClientError};
use bulkhead::jail::privileges::become_on_this_thread;
use common::{guest, root_and_kvm_available};
use serde_json::{json, Value};

const ACME: u32 = 1001;
const GLOBEX: u32 = 1002;

/// A daemon of the test's own, with tenants acme and globex, each with a directory holding
/// the test guests.
struct Host {
    dir: PathBuf,
    config: PathBuf,
    daemon: Option<Child>,
}

impl Host {
    fn new(test: &str, max_vms: u32) -> Host {
        Host::with(test, max_vms, |_, _| {})
    }

    /// A host whose serve.json `edit` changes first (given it and the host's directory).
    fn with(test: &str, max_vms: u32, edit: impl FnOnce(&mut Value, &Path)) -> Host {
        // Short: a vsock socket's path in a jail under it must fit in 108 bytes.
        let dir = PathBuf::from(format!("/run/bht-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (t, uid) in [("acme", ACME), ("globex", GLOBEX)] {
            std::fs::create_dir_all(dir.join(t)).unwrap();
            for g in ["exitcodes", "virtio"] {
                std::fs::copy(guest(g), dir.join(t).join(g)).unwrap();
            }
            let disk = dir.join(t).join("disk.img");
            std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
            // The tenant's files are the tenant's: the daemon checks it may use them.
            for e in std::fs::read_dir(dir.join(t)).unwrap().flatten() {
                std::os::unix::fs::chown(e.path(), Some(uid), Some(uid)).unwrap();
            }
        }
        let config = dir.join("serve.json");
        let mut serve = json!({
            "run_dir": dir.join("run"), "state_dir": dir.join("state"),
            "audit_log": dir.join("audit.jsonl"), "admins": [0],
            "tenants": {
                // The tests poll as fast as they like: the rate limit has a test of its own.
                "acme": {"uids": [ACME], "paths": [dir.join("acme")],
                         "max_vms": max_vms, "max_vcpus": 8, "max_mem_mib": 2048,
                         "requests_per_second": 100_000, "request_burst": 100_000},
                "globex": {"uids": [GLOBEX], "paths": [dir.join("globex")],
                           "max_vms": max_vms, "max_vcpus": 8, "max_mem_mib": 2048,
                           "requests_per_second": 100_000, "request_burst": 100_000},
            }
        });
        edit(&mut serve, &dir);
        std::fs::write(&config, serve.to_string()).unwrap();
        let mut host = Host {
            dir,
            config,
            daemon: None,
        };
        host.start();
        host
    }

    fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join("daemon.log")).unwrap();
        let daemon = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(daemon);
        let admin = self.socket(None);
        let deadline = Instant::now() + Duration::from_secs(10);
        while client::request(&admin, "GET", "/v1/vms", None, None).is_err() {
            assert!(
                Instant::now() < deadline,
                "the daemon never answered: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon (SIGTERM); its VMs keep running.
    fn stop_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            // SAFETY: kill on our own child.
            unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
            assert_eq!(d.wait().unwrap().code(), Some(0), "{}", self.log());
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn socket(&self, tenant: Option<&str>) -> PathBuf {
        match tenant {
            Some(t) => self.dir.join("run/tenants").join(format!("{t}.sock")),
            None => self.dir.join("run/admin.sock"),
        }
    }

    fn path(&self, tenant: &str, name: &str) -> PathBuf {
        self.dir.join(tenant).join(name)
    }

    fn daemon_pid(&self) -> u32 {
        self.daemon.as_ref().unwrap().id()
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn alerts(&self, rule: &str) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("state/alerts.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|a| a["rule"] == rule)
            .collect()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Whatever the test left running goes, then the daemon.
        if let Ok(a) = as_admin(self, "GET", "/v1/vms", None, None) {
            let vms: Value = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
            for vm in vms["vms"].as_array().into_iter().flatten() {
                if let Some(pid) = vm["pid"].as_i64() {
                    // SAFETY: kill with integer arguments.
                    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Makes one request as `uid` from a thread of its own that has switched to that uid.
fn as_uid(
    uid: u32,
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    reason: Option<&str>,
) -> Result<Answer, ClientError> {
    let socket = socket.to_path_buf();
    let (method, path, reason) = (
        method.to_string(),
        path.to_string(),
        reason.map(str::to_string),
    );
    std::thread::spawn(move || {
        if uid != 0 {
            // This thread alone becomes the uid; it ends after this request.
            become_on_this_thread(uid).unwrap();
        }
        client::request(&socket, &method, &path, body.as_deref(), reason.as_deref())
    })
    .join()
    .unwrap()
}

fn as_tenant(h: &Host, tenant: &str, method: &str, path: &str, body: Option<Value>) -> Answer {
    let uid = if tenant == "acme" { ACME } else { GLOBEX };
    let body = body.map(|b| b.to_string().into_bytes());
    as_uid(uid, &h.socket(Some(tenant)), method, path, body, None).unwrap()
}

fn as_admin(
    h: &Host,
    method: &str,
    path: &str,
    body: Option<Value>,
    reason: Option<&str>,
) -> Result<Answer, ClientError> {
    let body = body.map(|b| b.to_string().into_bytes());
    as_uid(0, &h.socket(None), method, path, body, reason)
}

fn json_of(a: &Answer) -> Value {
    serde_json::from_slice(&a.body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&a.body)))
}

/// Creates an idle VM for `tenant`; returns its id.
fn create_idle(h: &Host, tenant: &str, extra: Value) -> String {
    let mut body = json!({"kernel": h.path(tenant, "exitcodes"), "cmdline": "mode=idle"});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let a = as_tenant(h, tenant, "POST", "/v1/vms", Some(body));
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    json_of(&a)["id"].as_str().unwrap().to_string()
}

/// Waits until VM `id` reaches `state`, as `tenant` sees it.
fn wait_state(h: &Host, tenant: &str, id: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let vm = json_of(&as_tenant(h, tenant, "GET", &format!("/v1/vms/{id}"), None));
        if vm["state"] == state {
            return vm;
        }
        assert!(
            Instant::now() < deadline,
            "VM {id} never reached {state}: {vm}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until VM `id`'s process has every thread confined (it is jailed and running).
fn wait_running(h: &Host, tenant: &str, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = json_of(&as_tenant(
            h,
            tenant,
            "GET",
            &format!("/v1/vms/{id}/report"),
            None,
        ));
        let threads = serde_json::from_value::<bulkhead::api::serve::report::Report>(r.clone())
            .map_or(0, |r| r.confined_threads());
        if threads >= 2 {
            return;
        }
        assert!(Instant::now() < deadline, "VM {id} never ran: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_tenants_vms_run_side_by_side_and_every_cross_tenant_attempt_is_refused_audited_and_alerted()
{
    let test = "cross_tenant";
    if !root_and_kvm_available(test) {
        return;
    }
    let h = Host::new(test, 2);
    // The vsock paths that met in one directory before the jail: VM A's `x`, VM B's `x_80`.
    let first = create_idle(
        &h,
        "acme",
        json!({"vsock": {"cid": 60_001, "uds": "/run/x"}}),
    );
    // A scrape right after create finds the VM's series, never an empty body.
    let metrics = as_tenant(&h, "acme", "GET", &format!("/v1/vms/{first}/metrics"), None);
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.lines().any(|l| l.starts_with("bulkhead_vm_running{")
            && l.contains(&first)
            && l.ends_with(" 1")),
        "{text}"
    );
    // The daemon pinned the kernel it checked as the tenant: the jail runs only that file.
    let vm = json_of(&as_tenant(
        &h,
        "acme",
        "GET",
        &format!("/v1/vms/{first}"),
        None,
    ));
    let kernel = std::fs::metadata(h.path("acme", "exitcodes")).unwrap();
    let pin = &vm["config"]["pinned_files"][0];
    assert_eq!(
        pin["ino"],
        json!(std::os::unix::fs::MetadataExt::ino(&kernel)),
        "{vm}"
    );
    assert_eq!(
        pin["dev"],
        json!(std::os::unix::fs::MetadataExt::dev(&kernel)),
        "{vm}"
    );
    let acme = [first, create_idle(&h, "acme", json!({}))];
    let globex = [
        create_idle(
            &h,
            "globex",
            json!({"vsock": {"cid": 60_002, "uds": "/run/x_80"}}),
        ),
        create_idle(&h, "globex", json!({})),
    ];
    for id in &acme {
        wait_running(&h, "acme", id);
    }
    for id in &globex {
        wait_running(&h, "globex", id);
    }
    // Each tenant lists its own VMs only.
    for (tenant, mine) in [("acme", &acme), ("globex", &globex)] {
        let list = json_of(&as_tenant(&h, tenant, "GET", "/v1/vms", None));
        let mut ids: Vec<&str> = list["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_str().unwrap())
            .collect();
        ids.sort_unstable();
        let mut want: Vec<&str> = mine.iter().map(String::as_str).collect();
        want.sort_unstable();
        assert_eq!(ids, want);
    }
    // Every endpoint on another tenant's VM answers exactly as for a VM that does not exist.
    let missing = "0123456789abcdef0123456789abcdef";
    let mut attempts = 0;
    for (tenant, theirs) in [("globex", &acme), ("acme", &globex)] {
        for id in theirs.iter().map(String::as_str).chain([missing]) {
            for &(method, suffix) in bulkhead::api::serve::routes::VM_ENDPOINTS {
                let a = as_tenant(&h, tenant, method, &format!("/v1/vms/{id}{suffix}"), None);
                assert_eq!(a.status, 404, "{tenant} {method} {id}{suffix}");
                assert_eq!(json_of(&a), json!({"error": format!("no VM {id}")}));
                if id != missing {
                    attempts += 1;
                }
            }
        }
    }
    // Files outside the tenant's directories, directly or through a symlink, and a body that
    // names the other tenant.
    std::os::unix::fs::symlink(h.path("globex", "exitcodes"), h.path("acme", "link")).unwrap();
    for (body, status) in [
        (json!({"kernel": h.path("globex", "exitcodes")}), 403),
        (json!({"kernel": h.path("acme", "link")}), 403),
        (
            json!({"kernel": h.path("acme", "exitcodes"), "disks": [{"path": h.path("globex", "virtio")}]}),
            403,
        ),
        (
            json!({"kernel": h.path("acme", "exitcodes"), "tenant": "globex"}),
            403,
        ),
    ] {
        let a = as_tenant(&h, "acme", "POST", "/v1/vms", Some(body.clone()));
        assert_eq!(
            a.status,
            status,
            "{body}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    // A file in the tenant's directory that its uid may not read, or not write when it asks
    // for a writable disk, is refused as if it were elsewhere.
    let secret = h.path("acme", "secret");
    std::fs::write(&secret, b"root's").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&secret, Some(0), Some(0)).unwrap();
    let sealed = h.path("acme", "sealed.img");
    std::fs::write(&sealed, vec![0u8; 4096]).unwrap();
    std::os::unix::fs::chown(&sealed, Some(ACME), Some(ACME)).unwrap();
    std::fs::set_permissions(&sealed, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
    for body in [
        json!({"kernel": secret}),
        json!({"kernel": h.path("acme", "exitcodes"), "disks": [{"path": sealed}]}),
        json!({"kernel": "/etc/../etc/shadow"}),
    ] {
        let a = as_tenant(&h, "acme", "POST", "/v1/vms", Some(body.clone()));
        assert_eq!(
            a.status,
            403,
            "{body}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    // The same file read-only is fine: the quota (two VMs each) refuses it, not the file.
    let a = as_tenant(
        &h,
        "acme",
        "POST",
        "/v1/vms",
        Some(
            json!({"kernel": h.path("acme", "exitcodes"), "disks": [{"path": sealed, "read_only": true}]}),
        ),
    );
    assert_eq!(a.status, 403);
    assert!(
        json_of(&a)["error"].as_str().unwrap().starts_with("quota"),
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    // The quota: two VMs each.
    let a = as_tenant(
        &h,
        "acme",
        "POST",
        "/v1/vms",
        Some(json!({"kernel": h.path("acme", "exitcodes")})),
    );
    assert_eq!(a.status, 403);
    assert!(json_of(&a)["error"].as_str().unwrap().starts_with("quota"));
    // Another tenant's socket, and the admin socket, do not even take the connection.
    let denied = as_uid(
        GLOBEX,
        &h.socket(Some("acme")),
        "GET",
        "/v1/vms",
        None,
        None,
    );
    assert!(
        matches!(denied, Err(ClientError::Connect { .. })),
        "{denied:?}"
    );
    let denied = as_uid(ACME, &h.socket(None), "GET", "/v1/vms", None, None);
    assert!(
        matches!(denied, Err(ClientError::Connect { .. })),
        "{denied:?}"
    );

    // The vsock sockets that would have met are in two jails.
    let report = |tenant: &str, id: &str| {
        json_of(&as_tenant(
            &h,
            tenant,
            "GET",
            &format!("/v1/vms/{id}/report"),
            None,
        ))
    };
    let path_of = |r: &Value| {
        r["planes"]["vsock"][2]["value"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (ra, rb) = (report("acme", &acme[0]), report("globex", &globex[0]));
    assert_ne!(
        Path::new(&path_of(&ra)).parent(),
        Path::new(&path_of(&rb)).parent()
    );
    for r in [&ra, &rb] {
        assert_eq!(r["failed_checks"], 0, "{r}");
    }

    // Admins act on a tenant's VM only with a reason, which is audited and alerted.
    let stop = format!("/v1/vms/{}/stop", acme[1]);
    assert_eq!(as_admin(&h, "POST", &stop, None, None).unwrap().status, 403);
    assert_eq!(
        as_admin(&h, "POST", &stop, None, Some("incident 7"))
            .unwrap()
            .status,
        202
    );
    wait_state(&h, "acme", &acme[1], "exited");
    // An admin creating a VM for a tenant is the same break-glass.
    let body = json!({"kernel": h.path("globex", "exitcodes"), "tenant": "globex", "cmdline": "mode=exit exit=0"});
    assert_eq!(
        as_admin(&h, "POST", "/v1/vms", Some(body.clone()), None)
            .unwrap()
            .status,
        403
    );
    let made = as_admin(
        &h,
        "POST",
        "/v1/vms",
        Some(body),
        Some("restore for ticket 9"),
    );
    // globex is at its quota: refused for that, after the reason was accepted.
    assert_eq!(made.as_ref().unwrap().status, 403, "{made:?}");
    let overrides = h.alerts("management_admin_override");
    assert_eq!(overrides.len(), 2, "{overrides:?}");
    assert_eq!(
        overrides[1]["output_fields"]["reason"],
        "restore for ticket 9"
    );
    assert_eq!(overrides[0]["priority"], "Notice");
    assert_eq!(overrides[0]["output_fields"]["reason"], "incident 7");

    // Audit: every cross-tenant attempt is there, refused, with its reason; the chain holds.
    let audit = h.audit();
    let cross: Vec<&Value> = audit
        .iter()
        .filter(|e| {
            e["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("cross_tenant"))
        })
        .collect();
    assert_eq!(cross.len(), attempts);
    assert!(cross.iter().all(|e| e["outcome"] == 404));
    assert_eq!(h.alerts("management_cross_tenant").len(), attempts);
    assert!(audit
        .iter()
        .any(|e| e["uid"] == 0 && e["outcome"] == 202 && e["reason"] == "incident 7"));
    assert!(audit
        .iter()
        .any(|e| e["uid"] == 0 && e["outcome"] == 403 && e["path"] == stop.as_str()));
    let verify = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["audit-log", "verify"])
        .arg(h.dir.join("audit.jsonl"))
        .output()
        .unwrap();
    assert!(verify.status.success(), "{verify:?}");
}

#[test]
fn malformed_oversized_and_slow_requests_get_a_4xx_and_the_daemon_serves_on() {
    let test = "bad_requests";
    if !root_and_kvm_available(test) {
        return;
    }
    let h = Host::new(test, 4);
    let kernel = h.path("acme", "exitcodes");
    for (body, status, says) in [
        (b"{not json".to_vec(), 400, "not JSON"),
        (b"[1, 2]".to_vec(), 400, "JSON object"),
        (
            json!({"kernel": kernel, "colour": "red"})
                .to_string()
                .into_bytes(),
            400,
            "unknown field",
        ),
        (
            json!({"kernel": kernel, "vcpus": "two"})
                .to_string()
                .into_bytes(),
            400,
            "invalid",
        ),
        (
            json!({"kernel": "relative/exitcodes"})
                .to_string()
                .into_bytes(),
            422,
            "absolute",
        ),
        (
            json!({"kernel": kernel, "vcpus": 0})
                .to_string()
                .into_bytes(),
            422,
            "vcpus",
        ),
        (
            json!({"kernel": kernel, "console": "file:/etc/passwd"})
                .to_string()
                .into_bytes(),
            422,
            "console",
        ),
        (
            json!({"kernel": kernel, "seccomp": false})
                .to_string()
                .into_bytes(),
            422,
            "seccomp",
        ),
        (
            json!({"kernel": kernel, "vm_id": "mine"})
                .to_string()
                .into_bytes(),
            422,
            "vm_id",
        ),
        (
            json!({"kernel": kernel, "jail": {"uid": 5}})
                .to_string()
                .into_bytes(),
            422,
            "jail",
        ),
        (vec![b' '; 70 * 1024], 413, "larger than"),
    ] {
        let a = as_uid(
            ACME,
            &h.socket(Some("acme")),
            "POST",
            "/v1/vms",
            Some(body),
            None,
        )
        .unwrap();
        assert_eq!(a.status, status, "{}", String::from_utf8_lossy(&a.body));
        let error = json_of(&a)["error"].as_str().unwrap().to_string();
        assert!(error.contains(says), "{error}");
    }
    // Not HTTP at all.
    let raw = |uid: u32, bytes: &'static [u8]| {
        let socket = h.socket(Some("acme"));
        std::thread::spawn(move || {
            become_on_this_thread(uid).unwrap();
            let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.write_all(bytes).unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        })
        .join()
        .unwrap()
    };
    assert!(raw(ACME, b"HELLO THERE\r\n\r\n").starts_with("HTTP/1.1 400"));
    // Slow clients: acme's socket is filled with connections that never send a byte. They
    // hold nobody else up: globex is served at once, and acme again once they time out.
    let socket = h.socket(Some("acme"));
    let stalled = std::thread::spawn(move || {
        become_on_this_thread(ACME).unwrap();
        let held: Vec<_> = (0..40)
            .filter_map(|_| std::os::unix::net::UnixStream::connect(&socket).ok())
            .collect();
        std::thread::sleep(Duration::from_secs(7));
        drop(held);
    });
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    assert_eq!(as_tenant(&h, "globex", "GET", "/v1/vms", None).status, 200);
    // Well before the stalled connections time out (HEADER_TIMEOUT, 5 s): a daemon waiting
    // on them would answer only then, however fast the host.
    assert!(start.elapsed() < bulkhead::api::serve::http::HEADER_TIMEOUT / 2);
    stalled.join().unwrap();
    assert_eq!(as_tenant(&h, "acme", "GET", "/v1/vms", None).status, 200);
    // And the daemon is still the same process.
    assert!(h.daemon.as_ref().is_some());
    assert!(Path::new(&format!("/proc/{}", h.daemon_pid())).exists());
}

#[test]
fn a_killed_vm_is_reported_the_others_run_on_and_a_restarted_daemon_takes_them_back() {
    let test = "faults";
    if !root_and_kvm_available(test) {
        return;
    }
    let mut h = Host::new(test, 4);
    let victim = create_idle(&h, "acme", json!({}));
    let survivor = create_idle(&h, "acme", json!({}));
    wait_running(&h, "acme", &victim);
    wait_running(&h, "acme", &survivor);
    let vm = json_of(&as_tenant(
        &h,
        "acme",
        "GET",
        &format!("/v1/vms/{victim}"),
        None,
    ));
    let vm_pid = vm["vm_process_pid"].as_i64().unwrap() as i32;
    // SAFETY: kill with integer arguments.
    unsafe { libc::kill(vm_pid, libc::SIGKILL) };
    let ended = wait_state(&h, "acme", &victim, "exited");
    assert_eq!(ended["exit"]["reason"], "killed", "{ended}");
    assert_eq!(ended["exit"]["status"], 137, "{ended}");
    let alive = json_of(&as_tenant(
        &h,
        "acme",
        "GET",
        &format!("/v1/vms/{survivor}"),
        None,
    ));
    assert_eq!(alive["state"], "running");

    // The daemon goes away and comes back: the running VM is taken back, and can be stopped.
    h.stop_daemon();
    let pid = alive["pid"].as_i64().unwrap();
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the VM died with the daemon"
    );
    h.start();
    let back = json_of(&as_tenant(
        &h,
        "acme",
        "GET",
        &format!("/v1/vms/{survivor}"),
        None,
    ));
    assert_eq!(back["state"], "running", "{back}");
    assert_eq!(back["pid"], alive["pid"]);
    let stop = as_tenant(
        &h,
        "acme",
        "POST",
        &format!("/v1/vms/{survivor}/stop"),
        None,
    );
    assert_eq!(stop.status, 202);
    let ended = wait_state(&h, "acme", &survivor, "exited");
    assert_eq!(ended["exit"]["reason"], "terminated", "{ended}");
    // An ended VM is forgotten on request.
    let gone = as_tenant(&h, "acme", "DELETE", &format!("/v1/vms/{victim}"), None);
    assert_eq!(gone.status, 204);
    assert_eq!(
        as_tenant(&h, "acme", "GET", &format!("/v1/vms/{victim}"), None).status,
        404
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn twenty_clients_and_a_thousand_mixed_requests_leave_no_error_and_bounded_memory() {
    let test = "load";
    if !root_and_kvm_available(test) {
        return;
    }
    let h = std::sync::Arc::new(Host::new(test, 4));
    let acme = create_idle(&h, "acme", json!({}));
    let globex = create_idle(&h, "globex", json!({}));
    wait_running(&h, "acme", &acme);
    wait_running(&h, "globex", &globex);
    // Warm up, then measure.
    for _ in 0..20 {
        as_tenant(&h, "acme", "GET", &format!("/v1/vms/{acme}/report"), None);
    }
    let before = rss_kib(h.daemon_pid());
    let audit_before = h.audit().len();
    let clients: Vec<_> = (0..20)
        .map(|n| {
            let h = h.clone();
            let (tenant, uid, mine, theirs) = if n % 2 == 0 {
                ("acme", ACME, acme.clone(), globex.clone())
            } else {
                ("globex", GLOBEX, globex.clone(), acme.clone())
            };
            std::thread::spawn(move || {
                // This thread is this client alone.
                become_on_this_thread(uid).unwrap();
                let socket = h.socket(Some(tenant));
                let mut wrong = Vec::new();
                for i in 0..50 {
                    let (method, path, want) = match i % 5 {
                        0 => ("GET", "/v1/vms".to_string(), 200),
                        1 => ("GET", format!("/v1/vms/{mine}"), 200),
                        2 => ("GET", format!("/v1/vms/{mine}/metrics"), 200),
                        3 => ("GET", format!("/v1/vms/{theirs}"), 404),
                        _ => ("GET", format!("/v1/vms/{mine}/report"), 200),
                    };
                    match client::request(&socket, method, &path, None, None) {
                        Ok(a) if a.status == want => {}
                        other => wrong.push(format!("{method} {path}: {other:?}")),
                    }
                }
                wrong
            })
        })
        .collect();
    let wrong: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(
        wrong.is_empty(),
        "{} wrong answers, e.g. {:?}",
        wrong.len(),
        wrong.first()
    );
    let after = rss_kib(h.daemon_pid());
    assert_eq!(h.audit().len() - audit_before, 1000);
    assert!(
        after < before + 16 * 1024,
        "the daemon grew from {before} KiB to {after} KiB over 1000 requests"
    );
    println!("daemon RSS {before} KiB before, {after} KiB after 1000 requests");
}

#[test]
fn bulkhead_audit_passes_on_this_host_and_its_bundle_maps_every_plane() {
    let test = "bulkhead_audit";
    if !root_and_kvm_available(test) {
        return;
    }
    let out = common::scratch(test);
    let guests = guest("exitcodes").parent().unwrap().to_path_buf();
    let run = common::bulkhead(&[
        "audit",
        "--out",
        &out.display().to_string(),
        "--guests",
        &guests.display().to_string(),
    ]);
    assert_eq!(run.status, 0, "{}{}", run.stdout, run.stderr);
    let bundle: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("audit.json")).unwrap()).unwrap();
    assert_eq!(bundle["passed"], true);
    let checks = bundle["checks"].as_array().unwrap();
    assert!(checks.iter().all(|c| c["result"] == "pass"), "{bundle}");
    for plane in [
        "compute",
        "memory",
        "storage",
        "network",
        "management",
        "logs",
    ] {
        assert!(
            checks
                .iter()
                .any(|c| c["planes"].as_array().unwrap().contains(&json!(plane))),
            "no check for the {plane} plane"
        );
    }
    for key in [
        "started",
        "bulkhead_version",
        "host_kernel",
        "daemon_config_sha256",
    ] {
        assert!(bundle[key].as_str().is_some_and(|v| !v.is_empty()), "{key}");
    }
    let md = std::fs::read_to_string(out.join("audit.md")).unwrap();
    assert!(
        md.contains("| `api_cross_tenant` | management | pass |"),
        "{md}"
    );
    assert!(md.contains("every check passed"));
    // The run's audit log came with it, and its chain holds.
    let verify = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["audit-log", "verify"])
        .arg(out.join("audit-log.jsonl"))
        .output()
        .unwrap();
    assert!(verify.status.success(), "{verify:?}");
}

#[test]
fn a_tenant_talks_to_its_guest_over_vsock_both_ways_through_its_jail() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::{UnixListener, UnixStream};
    let test = "tenant_vsock";
    if !root_and_kvm_available(test) {
        return;
    }
    let h = Host::new(test, 2);
    let id = {
        let body = json!({"kernel": h.path("acme", "virtio"), "cmdline": "mode=vsock clean=1",
                          "vsock": {"cid": 61_000 + std::process::id() % 1000, "uds": "/any/dir/v.sock"}});
        let a = as_tenant(&h, "acme", "POST", "/v1/vms", Some(body));
        assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
        json_of(&a)["id"].as_str().unwrap().to_string()
    };
    let dir = h.dir.join("run/jail").join(&id).join("root/vsock");
    let socket = dir.join("v.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    // The jail binds the socket and then gives it to the tenant (owner, then mode 0660): it is
    // the tenant's to connect to once both are done.
    let given = |socket: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(socket).is_ok_and(|m| m.uid() == ACME && m.mode() & 0o777 == 0o660)
    };
    while !given(&socket) {
        assert!(
            Instant::now() < deadline,
            "no socket given to the tenant at {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // All as the tenant: its listener for guest port 5000 in its VM's socket directory, and
    // its connection to the guest's port 1234.
    std::thread::spawn(move || {
        become_on_this_thread(ACME).unwrap();
        let port_5000 = dir.join("v.sock_5000");
        let listener = UnixListener::bind(&port_5000).unwrap();
        std::fs::set_permissions(&port_5000, std::fs::Permissions::from_mode(0o666)).unwrap();
        common::vsock_host_side(UnixStream::connect(&socket).unwrap(), &listener);
    })
    .join()
    .unwrap();
    let ended = wait_state(&h, "acme", &id, "exited");
    assert_eq!(ended["exit"]["status"], 0, "{ended}");
}

/// An HTTP/1.1 GET of `path` on an already connected stream, with an optional bearer token;
/// the status line and the body.
fn get_on(mut s: impl Read + Write, path: &str, token: Option<&str>) -> (String, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.lines().next().unwrap_or("").to_string();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
fn the_merged_metrics_answer_root_or_the_token_holder_and_no_tenant() {
    let test = "merged_metrics";
    if !root_and_kvm_available(test) {
        return;
    }
    let token = "0123456789abcdef-metrics";
    let h = Host::with(test, 2, |serve, dir| {
        serve["metrics_listen"] = json!(format!("unix:{}", dir.join("run/metrics.sock").display()));
    });
    let a = create_idle(&h, "acme", json!({}));
    let g = create_idle(&h, "globex", json!({}));
    let socket = h.dir.join("run/metrics.sock");
    // Root: every tenant's VMs.
    let (status, body) = get_on(
        std::os::unix::net::UnixStream::connect(&socket).unwrap(),
        "/metrics",
        None,
    );
    assert!(status.contains(" 200 "), "{status}");
    assert!(body.contains(&a) && body.contains(&g), "{body}");
    // A tenant can not even connect.
    let refused = std::thread::spawn(move || {
        become_on_this_thread(ACME).unwrap();
        std::os::unix::net::UnixStream::connect(&socket).map(|_| ())
    })
    .join()
    .unwrap();
    assert_eq!(
        refused.unwrap_err().kind(),
        std::io::ErrorKind::PermissionDenied
    );
    drop(h);

    // On TCP, only with the token.
    let h = Host::with("merged_metrics_tcp", 2, |serve, dir| {
        let file = dir.join("metrics.token");
        std::fs::write(&file, token).unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        serve["metrics_listen"] = json!("127.0.0.1:0");
        serve["metrics_token_file"] = json!(file);
    });
    let log = h.log();
    let addr = log
        .lines()
        .find_map(|l| l.split("http://").nth(1))
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no TCP address in {log}"))
        .to_string();
    let a = create_idle(&h, "acme", json!({}));
    for wrong in [None, Some("0123456789abcdef-metricz")] {
        let (status, body) = get_on(
            std::net::TcpStream::connect(&addr).unwrap(),
            "/metrics",
            wrong,
        );
        assert!(status.contains(" 401 "), "{status}");
        assert!(!body.contains(&a), "{body}");
    }
    let (status, body) = get_on(
        std::net::TcpStream::connect(&addr).unwrap(),
        "/metrics",
        Some(token),
    );
    assert!(status.contains(" 200 "), "{status}");
    assert!(body.contains(&a), "{body}");
}

/// Makes `n` requests as `uid` on `socket`, one after the other from one thread; their
/// statuses.
fn burst_as(uid: u32, socket: &Path, path: &str, n: usize) -> Vec<u16> {
    let socket = socket.to_path_buf();
    let path = path.to_string();
    std::thread::spawn(move || {
        become_on_this_thread(uid).unwrap();
        (0..n)
            .map(|_| {
                client::request(&socket, "GET", &path, None, None)
                    .map(|a| a.status)
                    .unwrap_or(0)
            })
            .collect()
    })
    .join()
    .unwrap()
}

#[test]
fn a_flood_of_requests_is_cut_by_the_rate_limit_and_audited_as_a_line_a_second() {
    let test = "ratelimit";
    if !root_and_kvm_available(test) {
        return;
    }
    let h = Host::with(test, 2, |serve, _| {
        serve["tenants"]["acme"]["requests_per_second"] = json!(20);
        serve["tenants"]["acme"]["request_burst"] = json!(50);
    });
    let before = h.audit().len();
    let start = Instant::now();
    let statuses = burst_as(ACME, &h.socket(Some("acme")), "/v1/vms", 2000);
    let took = start.elapsed().as_secs_f64();
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!(ok + limited, 2000, "{statuses:?}");
    // The burst, and what the bucket earned meanwhile (20 a second), however long the flood
    // took on this host.
    let most = 50.0 + 20.0 * took + 2.0;
    assert!(
        ok >= 50 && (ok as f64) <= most,
        "{ok} answered in {took:.2} s"
    );
    // globex's socket is not held up by acme's flood.
    assert_eq!(as_tenant(&h, "globex", "GET", "/v1/vms", None).status, 200);
    std::thread::sleep(Duration::from_millis(1500));
    let lines = h.audit();
    let added = &lines[before..];
    let summaries: Vec<&Value> = added
        .iter()
        .filter(|l| l["method"] == "RATE_LIMITED")
        .collect();
    assert!(!summaries.is_empty(), "no summary line");
    let refused: u64 = summaries
        .iter()
        .map(|l| {
            let reason = l["reason"].as_str().unwrap();
            reason.split(' ').next().unwrap().parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(refused as usize, limited);
    // One line per answered request, one a second for the rest: far fewer than 2000.
    assert!(
        added.len() < ok + 20,
        "{} lines for {ok} answers",
        added.len()
    );
    // The head, as an admin keeps it, verifies against the file.
    let head = json_of(&as_admin(&h, "GET", "/v1/audit-log/head", None, None).unwrap());
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args([
            "audit-log",
            "verify",
            "--head",
            head["head"].as_str().unwrap(),
        ])
        .arg(h.dir.join("audit.jsonl"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("is line {}", head["seq"])), "{said}");
}

#[test]
fn a_tenant_can_not_fill_the_state_disk_nor_keep_the_daemon_from_starting() {
    let test = "fill";
    if !root_and_kvm_available(test) {
        return;
    }
    // The audit log on a small file system of its own, to fill.
    let auditfs = std::cell::RefCell::new(PathBuf::new());
    let mut h = Host::with(test, 4, |serve, dir| {
        let fs = dir.join("auditfs");
        std::fs::create_dir_all(&fs).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&fs)
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot mount a tmpfs");
        serve["audit_log"] = json!(fs.join("audit.jsonl"));
        serve["tenants"]["acme"]["max_exited_vms"] = json!(1);
        *auditfs.borrow_mut() = fs;
    });
    let fs = auditfs.into_inner();
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(fs.clone());
    let audit = fs.join("audit.jsonl");
    let kernel = h.path("acme", "exitcodes");

    // Console output: capped by the tenant's limit (16 MiB by default).
    let a = as_tenant(
        &h,
        "acme",
        "POST",
        "/v1/vms",
        Some(json!({"kernel": kernel, "console_limit": u64::MAX})),
    );
    assert_eq!(a.status, 422, "{}", String::from_utf8_lossy(&a.body));
    // Exited VMs: the tenant keeps one record; the older one goes, audited.
    let first = create_idle(&h, "acme", json!({"cmdline": "mode=exit exit=0"}));
    wait_state(&h, "acme", &first, "exited");
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(h.dir.join(format!("state/vms/{first}/config.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(config["console_limit"], 16 << 20);
    let second = create_idle(&h, "acme", json!({"cmdline": "mode=exit exit=0"}));
    wait_state(&h, "acme", &second, "exited");
    let gone = as_tenant(&h, "acme", "GET", &format!("/v1/vms/{first}"), None);
    assert_eq!(gone.status, 404);
    assert!(!h.dir.join(format!("state/vms/{first}")).exists());
    let lines: Vec<Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["method"] == "REAP" && l["vm"] == json!(first)),
        "no REAP line"
    );

    // A full disk: requests are refused, and nothing is done, until the log can be written.
    let filler = fs.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4096"])
        .arg(format!("of={}", filler.display()))
        .output();
    let vms_before = json_of(
        &as_admin(&h, "GET", "/v1/vms", None, None).unwrap_or(Answer {
            status: 0,
            body: b"{}".to_vec(),
        }),
    );
    // The log keeps room for its next lines; once it can not keep that much ahead, every
    // request is refused.
    let statuses = burst_as(ACME, &h.socket(Some("acme")), "/v1/vms", 200);
    assert!(statuses.contains(&503), "never refused: {statuses:?}");
    let refused = as_tenant(
        &h,
        "acme",
        "POST",
        "/v1/vms",
        Some(json!({"kernel": kernel})),
    );
    assert_eq!(
        refused.status,
        503,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    std::fs::remove_file(&filler).unwrap();
    let vms = json_of(&as_admin(&h, "GET", "/v1/vms", None, None).unwrap());
    assert_eq!(
        vms["vms"].as_array().map(Vec::len),
        vms_before["vms"].as_array().map(Vec::len),
        "a VM was started while the audit log could not record it"
    );

    // A torn last line (the disk filled mid-write): the daemon starts, sets it aside and says so.
    h.stop_daemon();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&audit)
        .unwrap();
    f.write_all(b"{\"seq\":9999,\"time\":\"20").unwrap();
    drop(f);
    h.start();
    assert_eq!(as_tenant(&h, "acme", "GET", "/v1/vms", None).status, 200);
    assert_eq!(
        h.alerts("management_audit_recovered").len(),
        1,
        "{}",
        h.log()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["audit-log", "verify"])
        .arg(&audit)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(text.lines().any(|l| l.contains("\"method\":\"RECOVER\"")));
}

#[test]
fn a_file_that_hangs_is_refused_within_the_deadline_and_holds_up_nobody() {
    let test = "hang";
    if !root_and_kvm_available(test) {
        return;
    }
    let h = std::sync::Arc::new(Host::new(test, 8));
    // A FUSE mount in acme's directory that nobody serves: every lookup in it waits.
    let mnt = h.dir.join("acme/hung");
    std::fs::create_dir_all(&mnt).unwrap();
    let fuse = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .unwrap();
    use std::os::fd::AsRawFd;
    let opts = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other",
        fuse.as_raw_fd()
    );
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let target = c(mnt.to_str().unwrap());
    // SAFETY: valid NUL-terminated strings; mount reads them.
    let rc = unsafe {
        libc::mount(
            c("bulkhead-test").as_ptr(),
            target.as_ptr(),
            c("fuse").as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            c(&opts).as_ptr().cast(),
        )
    };
    assert_eq!(rc, 0, "mount fuse: {}", std::io::Error::last_os_error());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let kernel = mnt.join("vmlinux");
    let create = {
        let h = h.clone();
        let kernel = kernel.clone();
        move || {
            let start = Instant::now();
            let a = as_tenant(
                &h,
                "acme",
                "POST",
                "/v1/vms",
                Some(json!({"kernel": kernel})),
            );
            (a, start.elapsed())
        }
    };
    let hung = std::thread::spawn(create.clone());
    std::thread::sleep(Duration::from_millis(300));
    // Another tenant is served at once meanwhile.
    let start = Instant::now();
    assert_eq!(as_tenant(&h, "globex", "GET", "/v1/vms", None).status, 200);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    let (a, took) = hung.join().unwrap();
    assert_eq!(a.status, 403, "{}", String::from_utf8_lossy(&a.body));
    assert!(
        String::from_utf8_lossy(&a.body).contains("did not answer within 2 s"),
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The stuck checks are bounded: with four outstanding, the next is turned away at once.
    let more: Vec<_> = (0..3).map(|_| std::thread::spawn(create.clone())).collect();
    for m in more {
        assert_eq!(m.join().unwrap().0.status, 403);
    }
    let (a, took) = create();
    assert_eq!(a.status, 503, "{}", String::from_utf8_lossy(&a.body));
    assert!(took < Duration::from_secs(1), "{took:?}");
    // Closing the connection ends the stuck lookups.
    drop(fuse);
}

/// Waits until the console of VM `id` (in the daemon's state directory) holds `line`.
fn wait_console(h: &Host, id: &str, line: &str) -> String {
    let console = h.dir.join("state/vms").join(id).join("console.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.lines().any(|l| l == line) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{line:?} never came on VM {id}'s console: {text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until acme's VM `id` (a tick guest) has ticked to its end and exited with status 0;
/// returns its console.
fn clone_runs_to_its_end(h: &Host, id: &str) -> String {
    let text = wait_console(h, id, "tick: done");
    let ended = wait_state(h, "acme", id, "exited");
    assert_eq!(ended["exit"]["status"], 0, "{ended}");
    text
}

/// The first tick a tick guest's console shows.
fn first_tick(console: &str) -> u64 {
    console
        .lines()
        .find_map(|l| l.strip_prefix("tick "))
        .and_then(|n| n.parse().ok())
        .expect("no tick on the console")
}

#[test]
fn a_tenant_snapshots_its_vm_and_clones_it_while_the_other_tenant_is_refused_audited_and_alerted() {
    let test = "serve_snapshots";
    if !root_and_kvm_available(test) {
        return;
    }
    let h = Host::new("snap", 4);
    let body = json!({"kernel": h.path("acme", "virtio"),
                      "cmdline": "mode=tick ticks=100 period=50"});
    let a = as_tenant(&h, "acme", "POST", "/v1/vms", Some(body));
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    let vm = json_of(&a)["id"].as_str().unwrap().to_string();
    wait_console(&h, &vm, "tick 5");

    // The other tenant can not snapshot it: a 404, as for a missing VM.
    let theirs = as_tenant(
        &h,
        "globex",
        "POST",
        &format!("/v1/vms/{vm}/snapshot"),
        None,
    );
    assert_eq!(theirs.status, 404);
    let taken = as_tenant(&h, "acme", "POST", &format!("/v1/vms/{vm}/snapshot"), None);
    assert_eq!(
        taken.status,
        201,
        "{}",
        String::from_utf8_lossy(&taken.body)
    );
    let snap = json_of(&taken)["snapshot"].as_str().unwrap().to_string();
    // It is acme's, in acme's directory, readable by root alone.
    let dir = h.dir.join("state/tenants/acme/snapshots").join(&snap);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    for f in ["vm.state", "vm.mem", "snapshot.json"] {
        let m = std::fs::metadata(dir.join(f)).unwrap();
        assert_eq!((m.mode() & 0o777, m.uid()), (0o600, 0), "{f}");
    }
    // The snapshotted VM runs on to its end.
    wait_console(&h, &vm, "tick: done");
    let listed = json_of(&as_tenant(&h, "acme", "GET", "/v1/snapshots", None));
    assert_eq!(listed["snapshots"][0]["id"], snap.as_str(), "{listed}");
    assert_eq!(listed["snapshots"][0]["vm"], vm.as_str());
    let none = json_of(&as_tenant(&h, "globex", "GET", "/v1/snapshots", None));
    assert_eq!(none["snapshots"], json!([]));

    // globex naming acme's snapshot gets what a missing one gets, and it is alerted and
    // audited with the reason.
    let missing = as_tenant(
        &h,
        "globex",
        "POST",
        "/v1/vms",
        Some(json!({"snapshot": "0123456789abcdef0123456789abcdef"})),
    );
    let stolen = as_tenant(
        &h,
        "globex",
        "POST",
        "/v1/vms",
        Some(json!({ "snapshot": snap })),
    );
    assert_eq!((missing.status, stolen.status), (404, 404));
    assert_eq!(
        json_of(&stolen)["error"]
            .as_str()
            .unwrap()
            .replace(&snap, "ID"),
        json_of(&missing)["error"]
            .as_str()
            .unwrap()
            .replace("0123456789abcdef0123456789abcdef", "ID")
    );
    let alerts = h.alerts("snapshot_cross_tenant");
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["output_fields"]["tenant"], "acme");
    assert!(
        h.audit().iter().any(|l| l["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("snapshot_cross_tenant"))),
        "no audit line says why"
    );
    // A machine setting is refused with a snapshot: the snapshot fixes it.
    let sized = as_tenant(
        &h,
        "acme",
        "POST",
        "/v1/vms",
        Some(json!({"snapshot": snap, "mem_mib": 256})),
    );
    assert_eq!(
        sized.status,
        422,
        "{}",
        String::from_utf8_lossy(&sized.body)
    );

    // acme's clone finishes the run from where the snapshot was taken.
    let cloned = as_tenant(
        &h,
        "acme",
        "POST",
        "/v1/vms",
        Some(json!({ "snapshot": snap })),
    );
    assert_eq!(
        cloned.status,
        201,
        "{}",
        String::from_utf8_lossy(&cloned.body)
    );
    let clone = json_of(&cloned)["id"].as_str().unwrap().to_string();
    let text = clone_runs_to_its_end(&h, &clone);
    assert!(first_tick(&text) > 5, "{text}");
    assert!(!text.contains("tick 0\n"), "{text}");
}

#[test]
fn a_diff_snapshot_names_its_base_starts_a_vm_from_its_moment_and_keeps_its_base_from_deletion() {
    let test = "serve_diff_snapshots";
    if !root_and_kvm_available(test) {
        return;
    }
    let h = Host::new("diffsnap", 4);
    let body_of = |answer: &Answer| String::from_utf8_lossy(&answer.body).into_owned();
    let snapshot = |vm: &str, body: Option<Value>| {
        as_tenant(&h, "acme", "POST", &format!("/v1/vms/{vm}/snapshot"), body)
    };
    let diff = || Some(json!({"kind": "diff"}));
    // A VM that does not track dirty pages takes full snapshots only.
    let plain = as_tenant(
        &h,
        "acme",
        "POST",
        "/v1/vms",
        Some(
            json!({"kernel": h.path("acme", "virtio"), "cmdline": "mode=tick ticks=20 period=50"}),
        ),
    );
    assert_eq!(plain.status, 201, "{}", body_of(&plain));
    let plain = json_of(&plain)["id"].as_str().unwrap().to_string();
    wait_console(&h, &plain, "tick 2");
    let refused = snapshot(&plain, diff());
    assert_eq!(refused.status, 409, "{}", body_of(&refused));
    assert!(
        body_of(&refused).contains("track_dirty_pages"),
        "{}",
        body_of(&refused)
    );

    let tracked = as_tenant(
        &h,
        "acme",
        "POST",
        "/v1/vms",
        Some(json!({"kernel": h.path("acme", "virtio"),
                    "cmdline": "mode=tick ticks=60 period=50",
                    "track_dirty_pages": true})),
    );
    assert_eq!(tracked.status, 201, "{}", body_of(&tracked));
    let vm = json_of(&tracked)["id"].as_str().unwrap().to_string();
    wait_console(&h, &vm, "tick 5");
    // Nothing to take a diff against yet; a body that is no kind is refused.
    let early = snapshot(&vm, diff());
    assert_eq!(early.status, 409, "{}", body_of(&early));
    assert_eq!(snapshot(&vm, Some(json!({"kind": "partial"}))).status, 400);
    let full = snapshot(&vm, None);
    assert_eq!(full.status, 201, "{}", body_of(&full));
    let full = json_of(&full)["snapshot"].as_str().unwrap().to_string();
    wait_console(&h, &vm, "tick 12");
    let taken = snapshot(&vm, diff());
    assert_eq!(taken.status, 201, "{}", body_of(&taken));
    let taken = json_of(&taken);
    assert_eq!(
        (&taken["kind"], &taken["parent"]),
        (&json!("diff"), &json!(full))
    );
    let diff_id = taken["snapshot"].as_str().unwrap().to_string();
    let listed = json_of(&as_tenant(&h, "acme", "GET", "/v1/snapshots", None));
    assert!(
        listed["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == diff_id.as_str() && s["parent"] == full.as_str()),
        "{listed}"
    );
    // The diff's base stays while the diff does.
    let base_gone = as_tenant(&h, "acme", "DELETE", &format!("/v1/snapshots/{full}"), None);
    assert_eq!(base_gone.status, 409, "{}", body_of(&base_gone));

    // A VM started from the diff runs on from the diff's moment, on its chain's memory.
    let cloned = as_tenant(
        &h,
        "acme",
        "POST",
        "/v1/vms",
        Some(json!({ "snapshot": diff_id })),
    );
    assert_eq!(cloned.status, 201, "{}", body_of(&cloned));
    let clone = json_of(&cloned)["id"].as_str().unwrap().to_string();
    let text = clone_runs_to_its_end(&h, &clone);
    assert!(
        first_tick(&text) > 12,
        "the clone started before the diff: {text}"
    );
    let dir = h.dir.join("state/tenants/acme/snapshots").join(&diff_id);
    assert!(dir.join("vm.rebased.mem").exists());

    // With the diff deleted, its base goes too.
    for id in [&diff_id, &full] {
        let gone = as_tenant(&h, "acme", "DELETE", &format!("/v1/snapshots/{id}"), None);
        assert_eq!(gone.status, 204, "{id}: {}", body_of(&gone));
    }
}
