//! Snapshots of running VMs, with the real binary on this host's KVM: a guest that ticks with
//! virtio-rng is snapshotted mid-run through its control socket, and clones restored from the
//! snapshot finish its run with the output and status it would have had; a state file that is
//! corrupt, cut, of another version, or given with machine settings is refused before anything
//! runs.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bulkhead_with_limit, guest, kvm_available, scratch};

const TICKS: u64 = 100;
const LIMIT: Duration = Duration::from_secs(60);

/// A `bulkhead run` of the ticking guest with a control socket and a console file.
struct Ticking {
    child: Child,
    console: PathBuf,
    socket: PathBuf,
}

fn start_ticking(dir: &Path, extra: &[&str]) -> Ticking {
    let console = dir.join("orig.log");
    let socket = dir.join("control.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args([
            "run",
            "--kernel",
            guest("virtio").to_str().unwrap(),
            "--cmdline",
            &format!("mode=tick ticks={TICKS} period=50"),
            "--console",
            &format!("file:{}", console.display()),
            "--control-socket",
            socket.to_str().unwrap(),
            "--timeout",
            "60",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start bulkhead");
    Ticking {
        child,
        console,
        socket,
    }
}

/// Waits until `file` holds `line`, for at most a minute.
fn wait_for_line(file: &Path, line: &str) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.lines().any(|l| l == line) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{line:?} never appeared in {}: {text}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The tick numbers in a console log, in order.
fn ticks(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn snapshot_of_ticking_guest(dir: &Path, extra: &[&str]) -> (Ticking, PathBuf, PathBuf) {
    let ticking = start_ticking(dir, extra);
    wait_for_line(&ticking.console, "tick 5");
    let (state, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    let create = bulkhead_with_limit(
        &[
            "snapshot",
            "create",
            "--control-socket",
            ticking.socket.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
            "--mem",
            mem.to_str().unwrap(),
        ],
        LIMIT,
    );
    assert_eq!(create.status, 0, "snapshot create: {}", create.stderr);
    (ticking, state, mem)
}

fn finish(mut child: Child) -> (i32, String) {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            return (status.code().unwrap_or(-1), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("bulkhead did not end in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn restore(state: &Path, mem: &Path, console: &Path, extra: &[&str]) -> Child {
    restore_with(
        &["run", "--restore"],
        "--restore-mem",
        state,
        mem,
        console,
        extra,
    )
}

/// A restore through `bulkhead snapshot load`, the same as `bulkhead run --restore`.
fn load(state: &Path, mem: &Path, console: &Path) -> Child {
    restore_with(
        &["snapshot", "load", "--state"],
        "--mem",
        state,
        mem,
        console,
        &[],
    )
}

fn restore_with(
    command: &[&str],
    mem_flag: &str,
    state: &Path,
    mem: &Path,
    console: &Path,
    extra: &[&str],
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(command)
        .args([
            state.to_str().unwrap(),
            mem_flag,
            mem.to_str().unwrap(),
            "--console",
            &format!("file:{}", console.display()),
            "--timeout",
            "60",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start bulkhead")
}

/// A clone's console: it starts where the snapshot was taken (after tick 5), goes on one tick
/// at a time to the last, and the guest's checks (the rng answered every tick) passed.
fn assert_finishes_the_run(log: &str, what: &str) {
    let seen = ticks(log);
    let first = *seen
        .first()
        .unwrap_or_else(|| panic!("{what}: no tick: {log}"));
    assert!(
        first > 5,
        "{what} started at tick {first}, before the snapshot"
    );
    assert_eq!(
        seen,
        (first..TICKS).collect::<Vec<_>>(),
        "{what}: ticks out of order or missing"
    );
    assert!(log.contains("tick: done\n"), "{what}: {log}");
    assert!(log.contains("virtio: all checks passed"), "{what}: {log}");
}

#[test]
fn a_guest_snapshotted_mid_run_finishes_its_run_in_two_clones_with_the_same_output_and_status() {
    if !kvm_available("snapshot") {
        return;
    }
    let dir = scratch("snapshot-clones");
    let (ticking, state, mem) = snapshot_of_ticking_guest(&dir, &[]);
    let original_console = ticking.console.clone();
    let (status, err) = finish(ticking.child);
    assert_eq!(status, 0, "the snapshotted VM: {err}");
    let original = std::fs::read_to_string(&original_console).unwrap();
    assert_eq!(ticks(&original), (0..TICKS).collect::<Vec<_>>());

    // Guest RAM is 128 MiB; the memory file holds only the pages the guest wrote.
    let meta = std::fs::metadata(&mem).unwrap();
    assert_eq!(meta.len(), 128 << 20);
    assert!(
        meta.blocks() * 512 < 16 << 20,
        "the memory file is not sparse: {} bytes allocated",
        meta.blocks() * 512
    );
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(&state).unwrap().mode() & 0o777, 0o600);

    let (a_log, b_log) = (dir.join("a.log"), dir.join("b.log"));
    let a = restore(&state, &mem, &a_log, &[]);
    let b = restore(&state, &mem, &b_log, &[]);
    let (a_status, a_err) = finish(a);
    let (b_status, b_err) = finish(b);
    assert_eq!((a_status, b_status), (0, 0), "clones: {a_err} / {b_err}");
    let a_text = std::fs::read_to_string(&a_log).unwrap();
    let b_text = std::fs::read_to_string(&b_log).unwrap();
    assert_finishes_the_run(&a_text, "clone a");
    assert_eq!(a_text, b_text, "the two clones differ");
    // What the snapshotted VM printed after the snapshot is what each clone printed, from the
    // clone's first whole line on (the snapshot may fall in the middle of one).
    let first = format!("tick {}\n", ticks(&a_text)[0]);
    let ours = a_text.find(&first).unwrap();
    let theirs = original.find(&first).unwrap();
    assert_eq!(&original[theirs..], &a_text[ours..]);
}

#[test]
fn a_snapshot_of_a_multi_vcpu_guest_with_the_full_irqchip_restores() {
    if !kvm_available("snapshot") {
        return;
    }
    let dir = scratch("snapshot-full-irqchip");
    let (ticking, state, mem) = snapshot_of_ticking_guest(&dir, &["--vcpus", "2", "--no-acpi"]);
    let (status, err) = finish(ticking.child);
    assert_eq!(status, 0, "the snapshotted VM: {err}");
    let log = dir.join("clone.log");
    let (status, err) = finish(load(&state, &mem, &log));
    assert_eq!(status, 0, "the clone: {err}");
    assert_finishes_the_run(&std::fs::read_to_string(&log).unwrap(), "the clone");
}

#[test]
fn a_corrupt_cut_or_foreign_state_file_or_a_machine_setting_is_refused_before_anything_runs() {
    if !kvm_available("snapshot") {
        return;
    }
    let dir = scratch("snapshot-refusals");
    let (ticking, state, mem) = snapshot_of_ticking_guest(&dir, &[]);
    let mut child = ticking.child;
    let _ = child.kill();
    let _ = child.wait();
    let good = std::fs::read(&state).unwrap();
    let variant = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    let mut v2 = good.clone();
    v2[8] = 2;
    let cases: Vec<(PathBuf, PathBuf, Vec<&str>, &str)> = vec![
        (
            variant("flipped", &flipped),
            mem.clone(),
            vec![],
            "is corrupt",
        ),
        (
            variant("cut", &good[..good.len() / 2]),
            mem.clone(),
            vec![],
            "follow the header",
        ),
        (variant("v2", &v2), mem.clone(), vec![], "version 2"),
        (variant("empty", &[]), mem.clone(), vec![], "too short"),
        (
            state.clone(),
            variant("short.mem", &[0; 4096]),
            vec![],
            "but the snapshot's RAM is 134217728",
        ),
        (
            state.clone(),
            mem.clone(),
            vec!["--mem-mib", "256"],
            "can not be given with it: mem_mib",
        ),
        (
            state.clone(),
            mem.clone(),
            vec!["--vcpus", "2"],
            "can not be given with it: vcpus",
        ),
    ];
    for (state, mem, extra, message) in cases {
        let console = dir.join("refused.log");
        let (status, err) = finish(restore(&state, &mem, &console, &extra));
        assert_eq!(status, 2, "{} {extra:?}: {err}", state.display());
        assert!(
            err.contains(message),
            "{} {extra:?}: {err}",
            state.display()
        );
        // Nothing ran: the guest printed nothing.
        assert!(std::fs::read_to_string(&console)
            .unwrap_or_default()
            .is_empty());
    }
}

#[test]
fn only_the_vms_owner_or_root_is_served_on_its_control_socket() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;

    use bulkhead::control::{self, Answer, Request};
    use bulkhead::jail::privileges::become_on_this_thread;

    let test = "control socket owner";
    if !common::root_and_kvm_available(test) {
        return;
    }
    let dir = scratch("snapshot-control-owner");
    let ticking = start_ticking(&dir, &[]);
    wait_for_line(&ticking.console, "tick 1");
    let socket = ticking.socket.clone();
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o600, 0));
    // Another user: the file refuses it...
    let as_other = |socket: PathBuf| {
        std::thread::spawn(move || {
            become_on_this_thread(4242).unwrap();
            match UnixStream::connect(&socket) {
                Err(e) => Err(e.kind()),
                Ok(s) => Ok(control::ask(&s, Request::Ping, None).ok()),
            }
        })
        .join()
        .unwrap()
    };
    assert_eq!(
        as_other(socket.clone()),
        Err(std::io::ErrorKind::PermissionDenied)
    );
    // ...and were the file opened to all, the VM process still answers its owner alone.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(as_other(socket.clone()), Ok(None));
    let root = UnixStream::connect(&socket).unwrap();
    assert!(matches!(
        control::ask(&root, Request::Ping, None),
        Ok(Answer::Running { .. })
    ));
    drop(root);
    let mut child = ticking.child;
    let _ = child.kill();
    let _ = child.wait();
}
