//! `bulkhead jailer`: Firecracker's jailer layout and pid file, with the Firecracker
//! personality run inside it as an unprivileged uid, as Kata's Go runtime starts it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead::api::client;
use common::{first_child, guest, root_and_kvm_available, scratch, status_field};
use serde_json::json;

const UID: u32 = 123_457;

/// A scratch directory under the system's temporary directory: the API socket's path in the
/// chroot below it must fit a socket address (107 bytes), which one under the target
/// directory of a deep checkout does not.
fn short_scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bh-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("cannot create scratch dir");
    dir
}

#[test]
fn the_jailer_lays_out_firecrackers_chroot_writes_the_pid_file_and_runs_the_vmm_unprivileged() {
    let test = "jailer_layout";
    if !root_and_kvm_available(test) {
        return;
    }
    let base = short_scratch(test);
    let id = format!("jailer-test-{}", std::process::id());
    // The exec file is named firecracker, as Kata's pid file expects.
    std::fs::create_dir_all(base.join("bin")).unwrap();
    let exec = base.join("bin/firecracker");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_bulkhead"), &exec).unwrap();
    // What Kata prepares in the chroot before starting the jailer.
    let chroot: PathBuf = base.join("firecracker").join(&id).join("root");
    std::fs::create_dir_all(chroot.join("run")).unwrap();
    // A non-root VMM makes its socket there: the orchestrator gives it the directory.
    std::os::unix::fs::chown(chroot.join("run"), Some(UID), Some(UID)).unwrap();
    std::fs::copy(guest("exitcodes"), chroot.join("vmlinux")).unwrap();
    let mut jailer = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["jailer", "--id", &id, "--exec-file"])
        .arg(&exec)
        .args(["--uid", &UID.to_string(), "--gid", &UID.to_string()])
        .arg("--chroot-base-dir")
        .arg(&base)
        .args(["--", "--api-sock", "/run/firecracker.socket"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(base.join("out")).unwrap())
        .stderr(std::fs::File::create(base.join("err")).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(base.join("err")).unwrap_or_default();
    let socket = chroot.join("run/firecracker.socket");
    let deadline = Instant::now() + Duration::from_secs(10);
    while client::request(&socket, "GET", "/", None, None).is_err() {
        assert!(Instant::now() < deadline, "no API socket: {}", log());
        assert!(
            jailer.try_wait().unwrap().is_none(),
            "the jailer ended: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The pid file, where Kata reads it: the VMM's pid (the jailer's, kept across exec).
    let pid_file = std::fs::read_to_string(chroot.join("firecracker.pid")).unwrap();
    assert_eq!(pid_file.trim(), jailer.id().to_string());
    // The layout: the exec file copied in, device nodes for the jail's uid alone.
    let copied = std::fs::symlink_metadata(chroot.join("firecracker")).unwrap();
    assert!(copied.is_file());
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let kvm = std::fs::metadata(chroot.join("dev/kvm")).unwrap();
    assert!(kvm.file_type().is_char_device());
    assert_eq!((kvm.uid(), kvm.mode() & 0o777), (UID, 0o600));
    // The personality runs in the chroot as the jail's uid.
    let pid = jailer.id();
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    assert!(root.join("firecracker").is_file() && root.join("vmlinux").is_file());
    assert!(!root.join("home").exists());
    // The chroot's root is root's alone, and /etc is empty and read-only: the VMM can place
    // no loader configuration (ld.so.preload) for the next program run there.
    let top = std::fs::metadata(&root).unwrap();
    assert_eq!((top.uid(), top.mode() & 0o022), (0, 0));
    assert_eq!(std::fs::read_dir(root.join("etc")).unwrap().count(), 0);
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap()
    );
    assert!(status_field(pid, &pid.to_string(), "Uid:")
        .split_whitespace()
        .all(|u| u == UID.to_string()));
    let put = |path: &str, body: serde_json::Value| {
        let a = client::request(
            &socket,
            "PUT",
            path,
            Some(body.to_string().as_bytes()),
            None,
        )
        .unwrap();
        assert_eq!(
            a.status,
            204,
            "{path}: {}; {}",
            String::from_utf8_lossy(&a.body),
            log()
        );
    };
    put(
        "/boot-source",
        json!({"kernel_image_path": "/vmlinux", "boot_args": "mode=idle"}),
    );
    put(
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 128}),
    );
    put("/actions", json!({"action_type": "InstanceStart"}));
    let info = client::request(&socket, "GET", "/", None, None).unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.body).unwrap();
    assert_eq!(info["state"], "Running");
    // Its VM process: the jail's uid, every thread confined.
    let vm = first_child(pid)
        .and_then(first_child)
        .expect("no VM process");
    assert!(status_field(vm, &vm.to_string(), "Uid:")
        .split_whitespace()
        .all(|u| u == UID.to_string()));
    assert_eq!(status_field(vm, &vm.to_string(), "Seccomp:"), "2");
    // SAFETY: kill on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = jailer.wait().unwrap();
    assert_eq!(status.code(), Some(143), "{}", log());
    assert!(!Path::new(&socket).exists());
    let _ = std::fs::remove_dir_all(&base);
}

/// Runs the jailer for `id` under `base` with a short-lived VMM (`--version`); its exit status
/// and stderr.
fn jail_once(base: &Path, id: &str, exec: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["jailer", "--id", id, "--exec-file"])
        .arg(exec)
        .args(["--uid", &UID.to_string(), "--gid", &UID.to_string()])
        .arg("--chroot-base-dir")
        .arg(base)
        .args(["--", "--version"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn a_chroot_an_earlier_occupant_left_is_refused_and_nothing_planted_there_is_run_or_followed() {
    let test = "jailer_reuse";
    if !root_and_kvm_available(test) {
        return;
    }
    let base = scratch(test);
    std::fs::create_dir_all(base.join("bin")).unwrap();
    let exec = base.join("bin/firecracker");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_bulkhead"), &exec).unwrap();
    let root_of = |id: &str| base.join("firecracker").join(id).join("root");
    let outside = base.join("outside");
    std::fs::create_dir_all(&outside).unwrap();

    // A clean run, then the same id again: the chroot holds the first run's files.
    let (status, err) = jail_once(&base, "reuse-a", &exec);
    assert_eq!(status, 0, "{err}");
    let (status, err) = jail_once(&base, "reuse-a", &exec);
    assert_ne!(status, 0);
    assert!(err.contains("left by an earlier jail"), "{err}");

    // A chroot its previous uid owned, with a loader preload planted in it.
    let planted = root_of("reuse-b");
    std::fs::create_dir_all(planted.join("etc")).unwrap();
    std::fs::write(planted.join("etc/ld.so.preload"), "/planted.so\n").unwrap();
    for p in [&planted, &planted.join("etc")] {
        std::os::unix::fs::chown(p, Some(UID), Some(UID)).unwrap();
    }
    let (status, err) = jail_once(&base, "reuse-b", &exec);
    assert_ne!(status, 0);
    assert!(err.contains("owned by root"), "{err}");
    assert!(
        !err.contains("ld.so"),
        "the planted preload was read: {err}"
    );

    // A root's chroot with a symlink where the jailer would bind its libraries.
    let planted = root_of("reuse-c");
    std::fs::create_dir_all(planted.join("usr")).unwrap();
    std::os::unix::fs::symlink(&outside, planted.join("usr/lib")).unwrap();
    let (status, err) = jail_once(&base, "reuse-c", &exec);
    assert_ne!(status, 0);
    assert!(err.contains("left by an earlier jail"), "{err}");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "a file was made outside"
    );

    // The directories on the way must be root's alone too.
    let planted = base.join("firecracker").join("reuse-d");
    std::fs::create_dir_all(&planted).unwrap();
    std::os::unix::fs::chown(&planted, Some(UID), Some(UID)).unwrap();
    let (status, err) = jail_once(&base, "reuse-d", &exec);
    assert_ne!(status, 0);
    assert!(err.contains("owned by root"), "{err}");
}
