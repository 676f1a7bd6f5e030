//! `bulkhead run --jail`: the VM process, looked at from outside while it runs, is in
//! namespaces of its own, holds no privilege, is seccomp-confined in every thread and sees
//! only its own files; its guest still reads and writes its disk and talks vsock through a
//! directory no other VM shares; and the jail refuses directories it did not make.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    bulkhead, first_child, guest, observed, root_and_kvm_available, scratch, status_field,
    vsock_host_side,
};

/// A jail directory of this test's own.
fn jail_dir(test: &str) -> PathBuf {
    let dir = PathBuf::from(format!("/run/bulkhead-test/{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Every file (not directory) under `dir`, as paths relative to it; `skip` is not entered.
fn files_under(dir: &Path, skip: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let path = e.path();
            if path == skip {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                todo.push(path);
            } else {
                found.push(path.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    found.sort();
    found
}

#[test]
fn a_jailed_vm_process_has_its_own_namespaces_no_privilege_seccomp_everywhere_and_only_its_files() {
    let test = "jail_seen_from_outside";
    if !root_and_kvm_available(test) {
        return;
    }
    let jails = jail_dir(test);
    let kernel = guest("exitcodes");
    let vm_id = format!("jail-outside-{}", std::process::id());
    let mut supervisor = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args([
            "--cmdline",
            "mode=idle",
            "--vcpus",
            "2",
            "--console",
            "none",
        ])
        .args(["--vm-id", &vm_id, "--timeout", "60", "--jail", "--jail-dir"])
        .arg(&jails)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the VM process to be jailed and running: all its threads confined (two vCPUs
    // and the VMM thread at least).
    let deadline = Instant::now() + Duration::from_secs(20);
    let (pid, tasks) = loop {
        assert!(Instant::now() < deadline, "the jailed VM never ran");
        std::thread::sleep(Duration::from_millis(20));
        let Some(pid) = first_child(supervisor.id()) else {
            continue;
        };
        let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default();
        if tasks.len() >= 3
            && tasks
                .iter()
                .all(|t| status_field(pid, t, "Seccomp:") == "2")
        {
            break (pid, tasks);
        }
    };
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        let host = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let vm = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(host, vm, "the VM process shares the host's {ns} namespace");
    }
    // The pid namespace is the VM process's alone: it is the first process there.
    assert_eq!(
        status_field(pid, &pid.to_string(), "NSpid:")
            .split_whitespace()
            .last(),
        Some("1")
    );
    // The default id: 0x70000000 plus the supervisor's pid, clear of systemd's ranges.
    let id = (0x7000_0000u32 + supervisor.id()).to_string();
    for task in &tasks {
        let uids = status_field(pid, task, "Uid:");
        assert!(
            uids.split_whitespace().all(|u| u == id),
            "task {task} uids {uids}, not {id}"
        );
        let gids = status_field(pid, task, "Gid:");
        assert!(
            gids.split_whitespace().all(|g| g != "0"),
            "task {task} gids {gids}"
        );
        for cap in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            assert_eq!(status_field(pid, task, cap), "0000000000000000", "{cap}");
        }
        assert_eq!(status_field(pid, task, "NoNewPrivs:"), "1");
        assert_eq!(status_field(pid, task, "Seccomp:"), "2");
    }
    // Its root: the kernel and the KVM device, and its own /proc; nothing else.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let files = files_under(&root, &root.join("proc"));
    let kernel_inside = kernel.canonicalize().unwrap();
    let want: Vec<PathBuf> = {
        let mut w = vec![
            PathBuf::from("dev/kvm"),
            kernel_inside.strip_prefix("/").unwrap().to_path_buf(),
        ];
        w.sort();
        w
    };
    assert_eq!(files, want);
    // Its /proc shows itself alone, and none of the system-wide files.
    let procs: Vec<String> = std::fs::read_dir(root.join("proc"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.parse::<u32>().is_ok())
        .collect();
    assert_eq!(procs, ["1"]);
    assert!(!root.join("proc/sys").exists() && !root.join("proc/kcore").exists());
    // Its cgroup, with the limits the jail set.
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let suffix = format!("/bulkhead/{vm_id}");
    assert!(
        cgroup.lines().filter(|l| l.ends_with(&suffix)).count() >= 1,
        "{cgroup}"
    );

    // An orderly stop removes the jail's directory and cgroup.
    // SAFETY: kill on our own child.
    unsafe { libc::kill(supervisor.id() as i32, libc::SIGTERM) };
    let status = supervisor.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    assert!(!jails.join(&vm_id).exists(), "the jail directory was left");
    assert!(
        !cgroup
            .lines()
            .filter_map(|l| l.split(':').nth(2))
            .filter(|p| p.ends_with(&suffix))
            .any(|p| ["cpu", "memory", "pids"]
                .iter()
                .any(|c| Path::new(&format!("/sys/fs/cgroup/{c}{p}")).exists())),
        "the cgroup was left"
    );
    let _ = std::fs::remove_dir_all(&jails);
}

#[test]
fn a_jailed_guest_reads_and_writes_its_disk_and_reports_a_forbidden_call_as_before() {
    let test = "jail_disk";
    if !root_and_kvm_available(test) {
        return;
    }
    let dir = scratch(test);
    let jails = jail_dir(test);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, (0..8u8).flat_map(|n| [n; 512]).collect::<Vec<u8>>()).unwrap();
    let (metrics, alerts) = (dir.join("vm.prom"), dir.join("alerts.jsonl"));
    let disk_arg = format!("{},id=tenant-a.data", disk.display());
    let args = [
        "run",
        "--kernel",
        &guest("virtio").display().to_string(),
        "--disk",
        &disk_arg,
        "--cmdline",
        "mode=blk expect_id=tenant-a.data",
        "--on-violation",
        "log",
        "--metrics-file",
        &metrics.display().to_string(),
        "--alerts",
        &alerts.display().to_string(),
        "--jail",
        "--jail-dir",
        &jails.display().to_string(),
    ]
    .map(str::to_string);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = observed(bulkhead(&args), &metrics, &alerts);
    assert_eq!(o.run.status, 0, "{}", o.run.stderr);
    let after = std::fs::read(&disk).unwrap();
    assert!(after[2 * 512..4 * 512].iter().all(|&b| b == 0xa5));
    assert_eq!(o.metrics.refusals("virtio-blk0", "request.out_of_range"), 1);

    // A thread taken over in the jail is still reported, and the kernel's word for it (killed
    // by SIGSYS) still reaches the supervisor, though the VM process is its pid namespace's
    // init, which a signal it sends itself can not kill.
    let hooked = |hook: &str| {
        bulkhead(&[
            "run",
            "--kernel",
            &guest("hello").display().to_string(),
            "--console",
            "none",
            "--test-hook",
            hook,
            "--jail",
            "--jail-dir",
            &jails.display().to_string(),
        ])
    };
    let hook = hooked("vcpu-forbidden-syscall");
    assert_eq!(hook.status, 159, "{}", hook.stderr);
    assert!(
        hook.stderr
            .contains("the VM process was killed by SIGSYS (thread vcpu0"),
        "{}",
        hook.stderr
    );
    let aborted = hooked("vcpu-abort");
    assert_eq!(aborted.status, 128 + libc::SIGABRT, "{}", aborted.stderr);
    assert!(
        !aborted.stderr.contains("seccomp violation"),
        "{}",
        aborted.stderr
    );
    assert_eq!(std::fs::read_dir(&jails).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&jails);
}

#[test]
fn a_jailed_vms_vsock_sockets_live_in_its_jail_where_no_other_vm_can_meet_them() {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::{UnixListener, UnixStream};
    let test = "jail_vsock";
    if !root_and_kvm_available(test) {
        return;
    }
    let dir = scratch(test);
    let jails = jail_dir(test);
    let vm_id = format!("jail-vsock-{}", std::process::id());
    let uds = dir.join("v.sock");
    // Where another VM given `uds=DIR/v.sock_5000` would listen: outside this VM's jail, so
    // its guest must never reach it.
    let outside = UnixListener::bind(dir.join("v.sock_5000")).unwrap();
    outside.set_nonblocking(true).unwrap();
    let vsock_arg = format!("cid={},uds={}", 50_000 + std::process::id(), uds.display());
    let mut supervisor = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["run", "--kernel"])
        .arg(guest("virtio"))
        .args(["--vsock", &vsock_arg, "--cmdline", "mode=vsock clean=1"])
        .args(["--vm-id", &vm_id, "--timeout", "60", "--jail", "--jail-dir"])
        .arg(&jails)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Whatever directory was named, the socket is in the jail's own /vsock.
    let inside = jails.join(&vm_id).join("root/vsock/v.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !inside.exists() {
        assert!(
            Instant::now() < deadline,
            "no socket at {}",
            inside.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The socket directory is a small file system of its own: nobody fills /run through it.
    let sockets = inside.parent().unwrap().to_path_buf();
    let c = std::ffi::CString::new(sockets.to_str().unwrap()).unwrap();
    // SAFETY: an all-zero statfs is a valid buffer.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs fills `fs` from a valid NUL-terminated path.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut fs) };
    assert_eq!(rc, 0);
    // (Widened: the two are of different integer types on glibc and on musl.)
    assert_eq!(
        i128::from(fs.f_type),
        i128::from(libc::TMPFS_MAGIC),
        "not a tmpfs of its own"
    );
    assert!(fs.f_blocks as u64 * fs.f_bsize as u64 <= 1 << 20);
    assert!(fs.f_files <= 1024, "{} inodes", fs.f_files);
    // The host's listener for guest port 5000 goes next to the VM's socket, in its jail, and
    // lets the jail's uid connect.
    let port_5000 = inside.with_file_name("v.sock_5000");
    let listener = UnixListener::bind(&port_5000).unwrap();
    std::fs::set_permissions(&port_5000, std::fs::Permissions::from_mode(0o666)).unwrap();
    let peer = vsock_host_side(UnixStream::connect(&inside).unwrap(), &listener);
    // The guest's connection comes from the jail's user, never from root.
    assert_eq!(peer, 0x7000_0000 + supervisor.id());
    let status = supervisor.wait().unwrap();
    let mut err = String::new();
    let _ = supervisor.stderr.take().unwrap().read_to_string(&mut err);
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(
        outside.accept().is_err(),
        "the guest reached a socket outside its jail"
    );
    // Gone with the VM: no mount left behind.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(sockets.to_str().unwrap()),
        "{} still mounted",
        sockets.display()
    );
    let _ = std::fs::remove_dir_all(&jails);
}

#[test]
fn a_jail_is_never_made_in_a_directory_someone_else_controls_or_over_one_that_exists() {
    let test = "jail_refusals";
    if !root_and_kvm_available(test) {
        return;
    }
    let jails = jail_dir(test);
    std::fs::create_dir_all(&jails).unwrap();
    let kernel = guest("hello").display().to_string();
    let run = |dir: &Path, vm_id: &str| {
        bulkhead(&[
            "run",
            "--kernel",
            &kernel,
            "--console",
            "none",
            "--vm-id",
            vm_id,
            "--jail",
            "--jail-dir",
            &dir.display().to_string(),
        ])
    };
    // A VM directory that already exists (left over, or planted) is not reused.
    std::fs::create_dir(jails.join("taken")).unwrap();
    let r = run(&jails, "taken");
    assert_eq!(r.status, 2, "{}", r.stderr);
    assert!(r.stderr.contains("already exists"), "{}", r.stderr);
    // A base directory reached through a symlink, or writable by others, is refused.
    let link = jails.with_extension("link");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&jails, &link).unwrap();
    let r = run(&link, "via-link");
    assert_ne!(r.status, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("without following symlinks"),
        "{}",
        r.stderr
    );
    std::fs::remove_file(&link).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&jails, std::fs::Permissions::from_mode(0o777)).unwrap();
    let r = run(&jails, "world-writable");
    assert_eq!(r.status, 2, "{}", r.stderr);
    assert!(r.stderr.contains("writable by nobody else"), "{}", r.stderr);
    std::fs::set_permissions(&jails, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A kernel reached through a symlink is refused: a jail follows none, so a path someone
    // re-points can not choose what the VM gets.
    let link = jails.join("kernel-link");
    std::os::unix::fs::symlink(&kernel, &link).unwrap();
    let r = bulkhead(&[
        "run",
        "--kernel",
        &link.display().to_string(),
        "--console",
        "none",
        "--jail",
        "--jail-dir",
        &jails.display().to_string(),
    ]);
    assert_eq!(r.status, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("without following symlinks"),
        "{}",
        r.stderr
    );
    // The supervisor still starts threads of its own after the VM process went into its pid
    // namespace (alert delivery over HTTP is one).
    let r = bulkhead(&[
        "run",
        "--kernel",
        &kernel,
        "--console",
        "none",
        "--alerts-http",
        "http://127.0.0.1:9/alerts",
        "--jail",
        "--jail-dir",
        &jails.display().to_string(),
    ]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    // A root uid is refused before anything is made.
    let r = bulkhead(&["run", "--kernel", &kernel, "--jail", "--jail-uid", "0"]);
    assert_eq!(r.status, 2, "{}", r.stderr);
    let _ = std::fs::remove_dir_all(&jails);
}

/// A named network namespace with a tap in it, removed when dropped.
struct NetnsWithTap {
    ns: String,
    tap: String,
}

impl NetnsWithTap {
    fn create() -> NetnsWithTap {
        let id = std::process::id() % 100_000;
        let (ns, tap) = (format!("bh-jail-{id}"), format!("bhj{id}"));
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "tuntap", "add", "dev", &tap, "mode", "tap"]);
        ip(&["-n", &ns, "link", "set", &tap, "up"]);
        NetnsWithTap { ns, tap }
    }
}

impl Drop for NetnsWithTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

#[test]
fn a_jailed_vm_can_join_the_operators_network_namespace_where_its_tap_is() {
    let test = "jail_netns";
    if !root_and_kvm_available(test) {
        return;
    }
    let net = NetnsWithTap::create();
    let netns_file = PathBuf::from(format!("/run/netns/{}", net.ns));
    let jails = jail_dir(test);
    let mut supervisor = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["run", "--kernel"])
        .arg(guest("exitcodes"))
        .args([
            "--cmdline",
            "mode=idle",
            "--console",
            "none",
            "--timeout",
            "60",
        ])
        .args(["--net", &format!("tap={}", net.tap)])
        .args(["--jail", "--jail-netns"])
        .arg(&netns_file)
        .arg("--jail-dir")
        .arg(&jails)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let pid = loop {
        assert!(Instant::now() < deadline, "the jailed VM never ran");
        std::thread::sleep(Duration::from_millis(20));
        if let Some(pid) = first_child(supervisor.id()) {
            let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
            if threads >= 2 && status_field(pid, &pid.to_string(), "Seccomp:") == "2" {
                break pid;
            }
        }
    };
    // The VM process is in the operator's namespace, and the tap it opened was the one there:
    // the host has no device of that name (opening a missing tap would have made one).
    use std::os::unix::fs::MetadataExt;
    let want = format!("net:[{}]", std::fs::metadata(&netns_file).unwrap().ino());
    let have = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_eq!(have.display().to_string(), want);
    assert!(!Path::new(&format!("/sys/class/net/{}", net.tap)).exists());
    // SAFETY: kill on our own child.
    unsafe { libc::kill(supervisor.id() as i32, libc::SIGTERM) };
    assert_eq!(supervisor.wait().unwrap().code(), Some(143));
    let _ = std::fs::remove_dir_all(&jails);
}

#[test]
fn a_jail_whose_setup_fails_after_it_was_made_leaves_no_directory_or_cgroup_behind() {
    let test = "jail_cleanup";
    if !root_and_kvm_available(test) {
        return;
    }
    let jails = jail_dir(test);
    std::fs::create_dir_all(&jails).unwrap();
    let vm_id = format!("jail-cleanup-{}", std::process::id());
    // The jail is made, then the supervisor finds its control channel (descriptor 999) is not
    // there and gives up before any VM process exists.
    let config = jails.with_extension("json");
    std::fs::write(
        &config,
        serde_json::json!({
            "kernel": guest("hello"), "console": "none", "vm_id": vm_id,
            "jail": {"dir": jails}, "control_fd": 999,
        })
        .to_string(),
    )
    .unwrap();
    let r = bulkhead(&["run", "--config", &config.display().to_string()]);
    assert_eq!(r.status, 2, "{}", r.stderr);
    assert!(r.stderr.contains("control channel"), "{}", r.stderr);
    let left: Vec<_> = std::fs::read_dir(&jails).unwrap().flatten().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    for controller in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let group = controller.path().join("bulkhead").join(&vm_id);
        assert!(!group.exists(), "cgroup {} left behind", group.display());
    }
}

#[test]
fn a_jail_refuses_a_file_that_is_no_longer_the_one_that_was_checked() {
    use std::os::unix::fs::MetadataExt;
    let test = "jail_pinned";
    if !root_and_kvm_available(test) {
        return;
    }
    let jails = jail_dir(test);
    std::fs::create_dir_all(&jails).unwrap();
    let kernel = jails.with_extension("kernel");
    std::fs::copy(guest("hello"), &kernel).unwrap();
    let st = std::fs::metadata(&kernel).unwrap();
    let run = |ino: u64| {
        let config = jails.with_extension("json");
        std::fs::write(
            &config,
            serde_json::json!({
                "kernel": kernel, "console": "none", "jail": {"dir": jails},
                "pinned_files": [{"path": kernel, "dev": st.dev(), "ino": ino}],
            })
            .to_string(),
        )
        .unwrap();
        bulkhead(&["run", "--config", &config.display().to_string()])
    };
    // The file the daemon checked, still there: the VM runs.
    let r = run(st.ino());
    assert_eq!(r.status, 0, "{}", r.stderr);
    // Another file at the checked path (what a swap after the check looks like): refused
    // before anything is made, as bad input.
    let r = run(st.ino() + 1);
    assert_eq!(r.status, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("no longer the file that was checked"),
        "{}",
        r.stderr
    );
    let left: Vec<_> = std::fs::read_dir(&jails).unwrap().flatten().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
