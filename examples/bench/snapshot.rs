//! Snapshot restore side by side, through Firecracker's API for both: bulkhead's Firecracker
//! personality and the Firecracker peer each snapshot the same idle guest once, then restore it
//! round after round (alternating), and run clones of it at once.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead::api::client;
use serde_json::{json, Value};

use super::launch;
use super::memory;
use super::report::{Figure, Goal};

/// Clones run at once for the memory figure.
const CLONES: usize = 8;
const GUEST_MIB: u64 = 128;

/// A VMM speaking Firecracker's API.
struct Api {
    name: &'static str,
    binary: PathBuf,
    /// Extra flags (the peer runs with --no-seccomp, as in the other figures).
    flags: Vec<&'static str>,
    /// Kernel command line before `mode=idle` (the peer's own console and PCI settings).
    boot_args: &'static str,
}

impl Api {
    /// Starts the VMM with its API socket at `sock` and waits until it answers.
    fn start(&self, sock: &Path) -> (Child, Instant) {
        let _ = std::fs::remove_file(sock);
        let mut cmd = Command::new(&self.binary);
        if self.name == "bulkhead" {
            cmd.arg("firecracker");
        }
        cmd.arg("--api-sock").arg(sock).args(&self.flags);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let started = Instant::now();
        let child = cmd.spawn().expect("start a VMM");
        let deadline = started + Duration::from_secs(10);
        while client::request(sock, "GET", "/", None, None).is_err() {
            assert!(Instant::now() < deadline, "{}: no API socket", self.name);
            std::thread::sleep(Duration::from_micros(200));
        }
        (child, started)
    }
}

fn call(sock: &Path, method: &str, path: &str, body: Value) -> u16 {
    let bytes = body.to_string().into_bytes();
    client::request(sock, method, path, Some(&bytes), None).map_or(0, |a| a.status)
}

/// Boots the idle guest, pauses it and writes its snapshot to `dir`; returns (state, mem).
fn make_snapshot(api: &Api, guest: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let sock = dir.join("make.sock");
    let (child, _) = api.start(&sock);
    let boot = json!({"kernel_image_path": guest,
                      "boot_args": format!("{} mode=idle", api.boot_args).trim().to_string()});
    let steps = [
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": GUEST_MIB}),
        ),
        ("PUT", "/boot-source", boot),
        ("PUT", "/actions", json!({"action_type": "InstanceStart"})),
    ];
    for (method, path, body) in steps {
        assert_eq!(call(&sock, method, path, body), 204, "{}: {path}", api.name);
    }
    // Past the guest's boot, into its idle halt.
    std::thread::sleep(Duration::from_millis(500));
    let (state, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    assert_eq!(
        call(&sock, "PATCH", "/vm", json!({"state": "Paused"})),
        204,
        "{}: pause",
        api.name
    );
    let create = json!({"snapshot_path": state, "mem_file_path": mem});
    assert_eq!(
        call(&sock, "PUT", "/snapshot/create", create),
        204,
        "{}: create",
        api.name
    );
    launch::kill(child);
    (state, mem)
}

/// Starts a VMM and loads the snapshot, resumed; returns it, the time from its start to the
/// load's answer, and the load call's own time.
fn restore(api: &Api, sock: &Path, state: &Path, mem: &Path) -> (Child, Duration, Duration) {
    let (child, started) = api.start(sock);
    let load = json!({"snapshot_path": state,
                      "mem_backend": {"backend_type": "File", "backend_path": mem},
                      "resume_vm": true});
    let asked = Instant::now();
    let status = call(sock, "PUT", "/snapshot/load", load);
    let answered = Instant::now();
    assert_eq!(status, 204, "{}: load", api.name);
    (child, answered - started, answered - asked)
}

/// `bulkhead run --restore` of the same snapshot: from its start until its VMM answers a ping
/// on the control socket (it does once its event loop runs, the vCPUs released).
fn native_restore(bulkhead: &Path, sock: &Path, state: &Path, mem: &Path) -> Duration {
    let (child, t) = native_clone(bulkhead, sock, state, mem);
    launch::kill(child);
    t
}

/// Starts `bulkhead run --restore` and waits until its VMM answers a ping; returns it running.
fn native_clone(bulkhead: &Path, sock: &Path, state: &Path, mem: &Path) -> (Child, Duration) {
    use bulkhead::control::{self, Answer, Request};
    let _ = std::fs::remove_file(sock);
    let mut cmd = Command::new(bulkhead);
    cmd.args([
        "run",
        "--console",
        "none",
        "--log-level",
        "error",
        "--restore",
    ])
    .arg(state)
    .arg("--restore-mem")
    .arg(mem)
    .arg("--control-socket")
    .arg(sock)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let started = Instant::now();
    let child = cmd.spawn().expect("start bulkhead run");
    let deadline = started + Duration::from_secs(10);
    let running = loop {
        assert!(
            Instant::now() < deadline,
            "bulkhead run --restore never ran"
        );
        let Ok(channel) = std::os::unix::net::UnixStream::connect(sock) else {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        };
        if let Ok(Answer::Running { .. }) = control::ask(&channel, Request::Ping, None) {
            break started.elapsed();
        }
    };
    (child, running)
}

/// Proportional memory (Pss, page cache shared with other clones counted in part) of a
/// VMM's processes, and the resident pages of its guest RAM mapping, in KiB.
fn clone_memory(pid: u32) -> (u64, u64) {
    let pids = memory::tree(pid);
    let pss = pids
        .iter()
        .map(|&p| memory::proc_kib(&format!("/proc/{p}/smaps_rollup"), "Pss:"))
        .sum();
    let touched = pids
        .iter()
        .map(|&p| memory::guest_rss_kib(p, GUEST_MIB * 1024))
        .sum();
    (pss, touched)
}

pub fn figures(
    bulkhead: &Path,
    peer: Option<&Path>,
    guest: &Path,
    scratch: &Path,
    rounds: usize,
) -> Vec<Figure> {
    let mut apis = vec![Api {
        name: "bulkhead",
        binary: bulkhead.to_path_buf(),
        flags: Vec::new(),
        boot_args: "",
    }];
    if let Some(p) = peer {
        apis.push(Api {
            name: "firecracker",
            binary: p.to_path_buf(),
            flags: vec!["--no-seccomp", "--level", "Error"],
            boot_args: "console=ttyS0 reboot=k panic=1 pci=off",
        });
    }
    eprintln!("bench: snapshot restore, {rounds} rounds");
    let snapshots: Vec<(PathBuf, PathBuf)> = apis
        .iter()
        .map(|api| {
            let dir = scratch.join(format!("snapshot-{}", api.name));
            std::fs::create_dir_all(&dir).expect("snapshot scratch directory");
            make_snapshot(api, guest, &dir)
        })
        .collect();
    let mut restore_samples: Vec<(&'static str, Vec<f64>)> = Vec::new();
    let mut load_samples: Vec<(&'static str, Vec<f64>)> = Vec::new();
    for api in &apis {
        restore_samples.push((api.name, Vec::new()));
        load_samples.push((api.name, Vec::new()));
    }
    let mut native_samples: Vec<(&'static str, Vec<f64>)> = vec![("bulkhead", Vec::new())];
    if let Some(fc) = restore_samples.get(1) {
        // Firecracker's own restore, the same runs as in the figure above.
        native_samples.push((fc.0, Vec::new()));
    }
    for round in 0..rounds {
        let sock = scratch.join(format!("native-{round}.sock"));
        let (state, mem) = &snapshots[0];
        let t = native_restore(bulkhead, &sock, state, mem);
        native_samples[0].1.push(t.as_secs_f64() * 1e3);
        for (i, (api, (state, mem))) in apis.iter().zip(&snapshots).enumerate() {
            let sock = scratch.join(format!("restore-{}-{round}.sock", api.name));
            let (child, whole, load) = restore(api, &sock, state, mem);
            launch::kill(child);
            let _ = std::fs::remove_file(&sock);
            restore_samples[i].1.push(whole.as_secs_f64() * 1e3);
            if i == 1 {
                native_samples[1].1.push(whole.as_secs_f64() * 1e3);
            }
            load_samples[i].1.push(load.as_secs_f64() * 1e3);
        }
    }
    eprintln!("bench: {CLONES} clones of one snapshot at once");
    let mut pss_samples = Vec::new();
    let mut touched_samples = Vec::new();
    for (api, (state, mem)) in apis.iter().zip(&snapshots) {
        let clones: Vec<Child> = (0..CLONES)
            .map(|c| {
                let sock = scratch.join(format!("clone-{}-{c}.sock", api.name));
                restore(api, &sock, state, mem).0
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let measured: Vec<(u64, u64)> = clones.iter().map(|c| clone_memory(c.id())).collect();
        for c in clones {
            launch::kill(c);
        }
        pss_samples.push((
            api.name,
            measured.iter().map(|m| m.0 as f64 / 1024.0).collect(),
        ));
        touched_samples.push((api.name, measured.iter().map(|m| m.1 as f64).collect()));
    }
    // The same clones through bulkhead's own front end: two processes, not the personality's
    // three.
    let (state, mem) = &snapshots[0];
    let natives: Vec<Child> = (0..CLONES)
        .map(|c| {
            let sock = scratch.join(format!("native-clone-{c}.sock"));
            native_clone(bulkhead, &sock, state, mem).0
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let native_pss: Vec<f64> = natives
        .iter()
        .map(|c| clone_memory(c.id()).0 as f64 / 1024.0)
        .collect();
    for c in natives {
        launch::kill(c);
    }
    let mut native_memory = vec![("bulkhead", native_pss)];
    if let Some(fc) = pss_samples.get(1) {
        native_memory.push(fc.clone());
    }
    let how = format!(
        "through Firecracker's API for both (bulkhead's personality, the peer with \
         --no-seccomp): a {GUEST_MIB} MiB, 1-vCPU idle guest (exitcodes mode=idle) snapshotted \
         once by each, then PUT /snapshot/load with resume_vm"
    );
    vec![
        Figure {
            key: "restore_wall",
            label: "Snapshot restore to running".to_string(),
            unit: "ms",
            higher_is_better: false,
            samples: restore_samples,
            goals: vec![Goal::at_most("bulkhead", "firecracker", 0.5)],
            method: format!("{how}: from the VMM process's start to the load's answer"),
        },
        Figure {
            key: "restore_native",
            label: "Snapshot restore to running, bulkhead run".to_string(),
            unit: "ms",
            higher_is_better: false,
            samples: native_samples,
            goals: Vec::new(),
            method: format!(
                "bulkhead's own front end against the figure above's Firecracker runs: \
                 `bulkhead run --restore` of bulkhead's snapshot, from its start until its VMM \
                 answers a ping on --control-socket (its event loop runs, the vCPUs released); \
                 {how}"
            ),
        },
        Figure {
            key: "restore_load_call",
            label: "Snapshot load call".to_string(),
            unit: "ms",
            higher_is_better: false,
            samples: load_samples,
            goals: Vec::new(),
            method: format!("{how}: the PUT /snapshot/load alone"),
        },
        Figure {
            key: "clone_memory",
            label: format!("Memory per clone, {CLONES} at once"),
            unit: "MiB",
            higher_is_better: false,
            samples: pss_samples,
            goals: vec![Goal::at_most("bulkhead", "firecracker", 1.0)],
            method: format!(
                "{how}, {CLONES} clones running at once: each clone's Pss (its processes' \
                 private memory, and the memory file's page cache counted in part), 300 ms \
                 after its load"
            ),
        },
        Figure {
            key: "clone_memory_native",
            label: format!("Memory per clone, {CLONES} at once, bulkhead run"),
            unit: "MiB",
            higher_is_better: false,
            samples: native_memory,
            goals: Vec::new(),
            method: format!(
                "the figure above, with bulkhead's clones started by `bulkhead run --restore` \
                 (supervisor and VM process) instead of the Firecracker personality; {how}"
            ),
        },
        Figure {
            key: "clone_pages_touched",
            label: "Guest RAM resident per clone".to_string(),
            unit: "KiB",
            higher_is_better: false,
            samples: touched_samples,
            goals: Vec::new(),
            method: format!(
                "{how}: the resident part of each clone's guest RAM mapping (pages the guest \
                 or the restore touched)"
            ),
        },
    ]
}
