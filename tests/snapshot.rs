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

/// `guest_args` are added to the guest's command line (`disk=1`: read the disk every tick).
fn start_ticking(dir: &Path, guest_args: &str, extra: &[&str]) -> Ticking {
    let console = dir.join("orig.log");
    let socket = dir.join("control.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args([
            "run",
            "--kernel",
            guest("virtio").to_str().unwrap(),
            "--cmdline",
            &format!("mode=tick ticks={TICKS} period=50 {guest_args}"),
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

fn snapshot_of_ticking_guest(
    dir: &Path,
    guest_args: &str,
    extra: &[&str],
) -> (Ticking, PathBuf, PathBuf) {
    let ticking = start_ticking(dir, guest_args, extra);
    wait_for_line(&ticking.console, "tick 5");
    let (state, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    let created = create(&ticking.socket, &state, &mem, &[]);
    assert_eq!(created.status, 0, "snapshot create: {}", created.stderr);
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
    let (ticking, state, mem) = snapshot_of_ticking_guest(&dir, "", &[]);
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
    let (ticking, state, mem) = snapshot_of_ticking_guest(&dir, "", &["--vcpus", "2", "--no-acpi"]);
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
    let (ticking, state, mem) = snapshot_of_ticking_guest(&dir, "", &[]);
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
    let ticking = start_ticking(&dir, "", &[]);
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

/// `bulkhead snapshot create` of the VM behind `socket`, with `extra` flags.
fn create(socket: &Path, state: &Path, mem: &Path, extra: &[&str]) -> common::Run {
    let mut args = vec![
        "snapshot",
        "create",
        "--control-socket",
        socket.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "--mem",
        mem.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    bulkhead_with_limit(&args, LIMIT)
}

/// `bulkhead snapshot rebase` of `diff` over `base` into `out`.
fn rebase(base: &Path, diff: &Path, out: &Path) {
    let run = bulkhead_with_limit(
        &[
            "snapshot",
            "rebase",
            "--base",
            base.to_str().unwrap(),
            "--diff",
            diff.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        LIMIT,
    );
    assert_eq!(run.status, 0, "rebase: {}", run.stderr);
}

/// A full snapshot of a ticking guest (`guest_args`, `extra`) that tracks nothing, and a clone
/// of it run with `--track-dirty-pages` and a control socket in `dir`: the base memory file,
/// the clone, its control socket and its console log. Restoring wrote the clone a new VM
/// generation ID, a page only the VMM writes (the guest never does).
fn tracking_clone(
    dir: &Path,
    guest_args: &str,
    extra: &[&str],
) -> (PathBuf, Child, PathBuf, PathBuf) {
    let (ticking, base_state, base_mem) = snapshot_of_ticking_guest(dir, guest_args, extra);
    let mut original = ticking.child;
    let _ = original.kill();
    let _ = original.wait();
    let socket = dir.join("clone.sock");
    let console = dir.join("clone.log");
    let clone = restore(
        &base_state,
        &base_mem,
        &console,
        &[
            "--track-dirty-pages",
            "--control-socket",
            socket.to_str().unwrap(),
        ],
    );
    (base_mem, clone, socket, console)
}

/// The indices of the 4 KiB pages in which two memory files differ.
fn differing_pages(a: &Path, b: &Path) -> Vec<usize> {
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(a.len(), b.len(), "the memory files differ in size");
    (0..a.len() / 4096)
        .filter(|&p| a[p * 4096..(p + 1) * 4096] != b[p * 4096..(p + 1) * 4096])
        .collect()
}

#[test]
fn diff_snapshots_rebased_in_turn_on_the_snapshot_before_them_are_that_moments_full_snapshot() {
    if !kvm_available("diff snapshot") {
        return;
    }
    let dir = scratch("snapshot-diff");
    let path = |name: &str| dir.join(name);
    // A disk whose sector n holds byte n + 1: the guest reads sector (tick % 64) every tick into
    // a page it never writes itself, so only the VMM's log can have that page.
    let disk = path("disk.img");
    let sectors: Vec<u8> = (0..64u8).flat_map(|n| [n + 1; 512]).collect();
    std::fs::write(&disk, sectors).unwrap();
    let disk_flag = format!("{},ro", disk.display());
    // The base: a full snapshot of a VM that tracks nothing.
    let (base_mem, clone, socket, console) =
        tracking_clone(&dir, "disk=1", &["--disk", &disk_flag]);
    // Only the VMM's own log has the clone's new generation ID; so are the pages the disk
    // reads fill.
    wait_for_line(&console, "tick 12");
    let first = create(&socket, &path("d1.state"), &path("d1.mem"), &["--diff"]);
    assert_eq!(first.status, 0, "first diff: {}", first.stderr);
    wait_for_line(&console, "tick 20");
    // A diff of what changed since the first, and while the VM stays paused a full snapshot
    // of the same moment to hold the diffs to.
    let second = create(
        &socket,
        &path("d2.state"),
        &path("d2.mem"),
        &["--diff", "--keep-paused"],
    );
    assert_eq!(second.status, 0, "second diff: {}", second.stderr);
    let full = create(&socket, &path("full.state"), &path("full.mem"), &[]);
    assert_eq!(full.status, 0, "full snapshot: {}", full.stderr);
    let (status, err) = finish(clone);
    assert_eq!(status, 0, "the tracking clone: {err}");

    // Each diff holds fewer pages than a full snapshot...
    let allocated = |name: &str| std::fs::metadata(path(name)).unwrap().blocks() * 512;
    for diff in ["d1.mem", "d2.mem"] {
        assert_eq!(std::fs::metadata(path(diff)).unwrap().len(), 128 << 20);
        assert!(
            allocated(diff) < allocated("full.mem"),
            "{diff} ({} bytes) is not smaller than the full snapshot ({} bytes)",
            allocated(diff),
            allocated("full.mem")
        );
    }
    // ...and laid over the base in turn they are that full snapshot, byte for byte: every page
    // the guest wrote (KVM's log) and every page the VMM wrote (its own) is in one of them.
    rebase(&base_mem, &path("d1.mem"), &path("at-d1.mem"));
    rebase(&path("at-d1.mem"), &path("d2.mem"), &path("at-d2.mem"));
    let differing = differing_pages(&path("at-d2.mem"), &path("full.mem"));
    assert!(
        differing.is_empty(),
        "{} pages differ from the full snapshot, the first at {:#x}",
        differing.len(),
        differing.first().map_or(0, |p| p * 4096)
    );
    // The second diff's state with the rebased memory finishes the run from after tick 20.
    let log = path("from-diff.log");
    let (status, err) = finish(restore(&path("d2.state"), &path("at-d2.mem"), &log, &[]));
    assert_eq!(status, 0, "the clone of the diff: {err}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_finishes_the_run(&text, "the clone of the diff");
    assert!(ticks(&text)[0] > 20, "it started before the diff: {text}");
}

#[test]
fn a_diff_whose_files_could_not_be_kept_leaves_its_pages_to_the_next_diff() {
    if !kvm_available("diff snapshot") {
        return;
    }
    let dir = scratch("snapshot-diff-lost");
    let path = |name: &str| dir.join(name);
    // The clone's new VM generation ID is a page written once and never again: the lost diff
    // below takes it from the log, and only that diff had it.
    let (base_mem, clone, socket, console) = tracking_clone(&dir, "", &[]);
    wait_for_line(&console, "tick 12");
    // A directory where its memory file should go: the snapshot is written, then the rename
    // that would put it in place fails, and the client removes it.
    std::fs::create_dir(path("lost.mem")).unwrap();
    let lost = create(&socket, &path("lost.state"), &path("lost.mem"), &["--diff"]);
    assert_ne!(lost.status, 0, "the lost diff was reported kept");
    assert!(
        lost.stderr.contains("lost.mem"),
        "the failure does not name the file: {}",
        lost.stderr
    );
    wait_for_line(&console, "tick 20");
    let next = create(
        &socket,
        &path("next.state"),
        &path("next.mem"),
        &["--diff", "--keep-paused"],
    );
    assert_eq!(next.status, 0, "the next diff: {}", next.stderr);
    let full = create(&socket, &path("full.state"), &path("full.mem"), &[]);
    assert_eq!(full.status, 0, "full snapshot: {}", full.stderr);
    let (status, err) = finish(clone);
    assert_eq!(status, 0, "the tracking clone: {err}");
    // Laid over the base, the next diff alone is the full snapshot of its moment.
    rebase(&base_mem, &path("next.mem"), &path("at-next.mem"));
    let differing = differing_pages(&path("at-next.mem"), &path("full.mem"));
    assert!(
        differing.is_empty(),
        "{} pages the lost diff took are missing from the next, the first at {:#x}",
        differing.len(),
        differing.first().map_or(0, |p| p * 4096)
    );
}

#[test]
fn a_diff_snapshot_of_a_vm_that_does_not_track_dirty_pages_is_refused_and_the_vm_runs_on() {
    if !kvm_available("diff snapshot") {
        return;
    }
    let dir = scratch("snapshot-diff-untracked");
    let ticking = start_ticking(&dir, "", &[]);
    wait_for_line(&ticking.console, "tick 2");
    let (state, mem) = (dir.join("d.state"), dir.join("d.mem"));
    let refused = create(&ticking.socket, &state, &mem, &["--diff"]);
    assert_eq!(refused.status, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("--track-dirty-pages"),
        "{}",
        refused.stderr
    );
    assert!(
        !state.exists() && !mem.exists(),
        "a refused snapshot left files"
    );
    let (status, err) = finish(ticking.child);
    assert_eq!(status, 0, "the VM after the refusal: {err}");
    assert_eq!(
        ticks(&std::fs::read_to_string(&ticking.console).unwrap()),
        (0..TICKS).collect::<Vec<_>>()
    );
}

#[test]
fn a_clone_given_a_tap_of_its_own_runs_on_it_with_the_snapshots_network_device() {
    let test = "snapshot tap move";
    if !kvm_available(test) {
        return;
    }
    let (Some(first), Some(second)) =
        (common::TestTap::create(test), common::TestTap::create(test))
    else {
        return;
    };
    let dir = scratch("snapshot-tap-move");
    let net = |tap: &str| format!("tap={tap}");
    let (ticking, state, mem) = snapshot_of_ticking_guest(&dir, "", &["--net", &net(&first.name)]);
    assert!(first.attached(), "the original does not hold its tap");
    let mut original = ticking.child;
    let _ = original.kill();
    let _ = original.wait();
    // A tap is a machine setting the clone may give again; its MAC (made from the original's
    // VM id) and device stay the snapshot's. Another MAC is refused.
    let log = dir.join("clone.log");
    let refused = finish(restore(
        &state,
        &mem,
        &log,
        &[
            "--net",
            &format!("tap={},mac=06:00:00:00:00:09", second.name),
        ],
    ));
    assert_eq!(refused.0, 2, "{}", refused.1);
    assert!(refused.1.contains("MAC, id or rate limit"), "{}", refused.1);
    let mut clone = restore(&state, &mem, &log, &["--net", &net(&second.name)]);
    wait_for_line(&log, "tick 40");
    assert!(second.attached(), "the clone does not hold its own tap");
    assert!(!first.attached(), "the original's tap is held");
    let status = clone.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_finishes_the_run(&std::fs::read_to_string(&log).unwrap(), "the clone");
}
