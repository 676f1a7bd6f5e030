//! A jailed VM process's own view of the system: new mount, IPC, UTS and network namespaces,
//! and a root directory that holds only what the VM needs (its kernel, initrd and disks bind
//! mounted in, the device nodes it uses), entered with pivot_root so the host's tree is gone
//! from the process, not merely hidden.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("{what} failed: {source}")]
    Call {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: not a usable path")]
    BadPath(PathBuf),
    #[error("jail entry {0:?} must be one plain file name")]
    BadName(String),
}

/// One host file or device made visible in the jail's root as `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub host: PathBuf,
    /// A path relative to the jail root (`vmlinux`, `dev/kvm`); no `..`.
    pub name: PathBuf,
    pub read_only: bool,
    /// A device node: mounted without `nodev`.
    pub device: bool,
}

fn cstring(path: &Path) -> Result<CString, RootError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| RootError::BadPath(path.to_path_buf()))
}

fn call(what: impl Into<String>, rc: libc::c_int) -> Result<(), RootError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(RootError::Call {
            what: what.into(),
            source: std::io::Error::last_os_error(),
        })
    }
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    flags: libc::c_ulong,
    what: &str,
) -> Result<(), RootError> {
    let target_c = cstring(target)?;
    let source_c = source.map(cstring).transpose()?;
    // SAFETY: the strings are valid and NUL-terminated (or null where the call allows it); no
    // filesystem type or data is passed.
    let rc = unsafe {
        libc::mount(
            source_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target_c.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    call(format!("{what} ({})", target.display()), rc)
}

/// Mounts a tmpfs of its own at `target` with `options` (`size=`, `nr_inodes=`, `mode=`,
/// `uid=`, `gid=`), never executable, with no device or set-id file that would count.
pub fn mount_tmpfs(target: &Path, options: &str) -> Result<(), RootError> {
    let target_c = cstring(target)?;
    let data = std::ffi::CString::new(options).map_err(|_| RootError::Call {
        what: format!("tmpfs options {options:?}"),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: valid NUL-terminated strings; mount reads them.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target_c.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data.as_ptr().cast(),
        )
    };
    call(format!("mounting a tmpfs ({})", target.display()), rc)
}

/// Detaches whatever is mounted at `target` (lazily: nothing may be using it by then).
pub fn unmount(target: &Path) -> Result<(), RootError> {
    let target_c = cstring(target)?;
    // SAFETY: a valid NUL-terminated path; umount2 reads it.
    let rc = unsafe { libc::umount2(target_c.as_ptr(), libc::MNT_DETACH) };
    call(format!("unmounting {}", target.display()), rc)
}

/// Leaves the host's mount, IPC and UTS namespaces (the pid namespace is entered by the
/// process that forks this one, the network namespace by [`leave_network`] once the VM's taps
/// are open) and stops mount events from propagating back to the host. `hostname` becomes the
/// jail's host name. Call it before the process starts any thread: namespaces entered by
/// unshare belong to the calling thread alone.
pub fn enter_namespaces(hostname: &str) -> Result<(), RootError> {
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    // SAFETY: unshare with flags only.
    call("unshare", unsafe { libc::unshare(flags) })?;
    mount(
        None,
        Path::new("/"),
        libc::MS_REC | libc::MS_PRIVATE,
        "making / private",
    )?;
    // SAFETY: the pointer and length describe `hostname`'s bytes.
    call("sethostname", unsafe {
        libc::sethostname(hostname.as_ptr().cast(), hostname.len())
    })
}

/// Leaves the host's network namespace for a new one with nothing in it but a loopback device
/// that is down. Taps opened before stay usable: a tap's descriptor is bound to its device,
/// which stays where the host's bridge or routes expect it.
pub fn leave_network() -> Result<(), RootError> {
    // SAFETY: unshare with flags only.
    call("unshare(CLONE_NEWNET)", unsafe {
        libc::unshare(libc::CLONE_NEWNET)
    })
}

/// Joins the network namespace bound at `path` (e.g. `/run/netns/NAME`): setns refuses a file
/// that is not a network namespace.
pub fn join_network(path: &Path) -> Result<(), RootError> {
    let c = cstring(path)?;
    // SAFETY: a valid NUL-terminated path; the descriptor is closed below.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return call(format!("opening {}", path.display()), -1);
    }
    // SAFETY: setns on the descriptor just opened, asking for a network namespace.
    let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    let joined = call(
        format!("joining the network namespace {}", path.display()),
        rc,
    );
    // SAFETY: closing the descriptor opened above, used by nothing else.
    unsafe { libc::close(fd) };
    joined
}

/// Mounts at `root/proc` a proc file system showing only this pid namespace's processes
/// (the VM process alone) and none of the system-wide files (`subset=pid`): the VMM reads its
/// own threads' state there, nothing else.
pub fn mount_proc(root: &Path) -> Result<(), RootError> {
    mount_proc_with(root, "subset=pid")
}

/// [`mount_proc`] with the proc options `options` (e.g. `subset=pid,hidepid=invisible`).
pub fn mount_proc_with(root: &Path, options: &str) -> Result<(), RootError> {
    let target = root.join("proc");
    match std::fs::create_dir(&target) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(RootError::Call {
                what: format!("creating {}", target.display()),
                source,
            })
        }
    }
    let target_c = cstring(&target)?;
    let options_c = CString::new(options).map_err(|_| RootError::BadPath(target.clone()))?;
    // SAFETY: all strings are valid and NUL-terminated.
    let rc = unsafe {
        libc::mount(
            c"proc".as_ptr(),
            target_c.as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            options_c.as_ptr().cast(),
        )
    };
    call(format!("mounting proc on {}", target.display()), rc)
}

/// Fills the (empty, bulkhead-made) directory `root` with `entries`, each a bind mount of its
/// host file, `nosuid` and `noexec` always, `nodev` unless it is a device, read-only when asked.
pub fn populate(root: &Path, entries: &[Entry]) -> Result<(), RootError> {
    for e in entries {
        let plain = e
            .name
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain || e.name.as_os_str().is_empty() {
            return Err(RootError::BadName(e.name.display().to_string()));
        }
        let mut flags = libc::MS_NOSUID | libc::MS_NOEXEC;
        if !e.device {
            flags |= libc::MS_NODEV;
        }
        if e.read_only {
            flags |= libc::MS_RDONLY;
        }
        bind_file(&e.host, &root.join(&e.name), true, flags)?;
    }
    Ok(())
}

/// Makes the host file `host` visible, read-only, at the same path under `root` (a mount
/// point left by an earlier jail of the same name is reused).
pub fn bind_same_path_read_only(root: &Path, host: &Path) -> Result<(), RootError> {
    bind_at_read_only(root, host, host)
}

/// Makes the host file `host` visible, read-only, at `at` under `root`.
pub fn bind_at_read_only(root: &Path, host: &Path, at: &Path) -> Result<(), RootError> {
    let inside: PathBuf = at
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect();
    if inside.as_os_str().is_empty() {
        return Err(RootError::BadPath(host.to_path_buf()));
    }
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    bind_file(host, &root.join(inside), false, flags)
}

/// Bind mounts the file `host` on `target` (an empty file made for it, which must be new when
/// `fresh`), then remounts it with `flags` (`MS_RDONLY`, `MS_NODEV`, ...).
fn bind_file(
    host: &Path,
    target: &Path,
    fresh: bool,
    flags: libc::c_ulong,
) -> Result<(), RootError> {
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|source| RootError::Call {
            what: format!("creating {}", parent.display()),
            source,
        })?;
    }
    // The mount point: an empty file (a directory would not take a file's bind mount).
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(fresh)
        .create(!fresh)
        .truncate(false)
        .open(target)
        .map_err(|source| RootError::Call {
            what: format!("creating {}", target.display()),
            source,
        })?;
    bind_onto(host, target, flags)
}

/// Bind mounts `host` on `target` (which must exist; `/proc/self/fd/N` lands on that very
/// file), then remounts it with `flags`.
pub fn bind_onto(host: &Path, target: &Path, flags: libc::c_ulong) -> Result<(), RootError> {
    bind(host, target)?;
    restrict(target, flags)
}

/// Bind mounts `host` on `target`, which must exist.
pub fn bind(host: &Path, target: &Path) -> Result<(), RootError> {
    mount(Some(host), target, libc::MS_BIND, "bind mount")
}

/// Remounts the bind mount at `target` (its root: a descriptor opened before the bind mount
/// still leads to the file under it) with `flags`.
pub fn restrict(target: &Path, flags: libc::c_ulong) -> Result<(), RootError> {
    mount(
        None,
        target,
        libc::MS_BIND | libc::MS_REMOUNT | flags,
        "restricting a bind mount",
    )
}

/// Mounts an empty, read-only tmpfs on the directory `target`.
pub fn mount_empty_read_only(target: &Path) -> Result<(), RootError> {
    let target_c = cstring(target)?;
    // SAFETY: valid NUL-terminated strings; mount reads them.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target_c.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"size=4k,nr_inodes=1,mode=0555".as_ptr().cast(),
        )
    };
    call(
        format!("mounting an empty tmpfs ({})", target.display()),
        rc,
    )
}

/// Makes `root` the process's `/` and detaches the old root entirely.
pub fn pivot(root: &Path) -> Result<(), RootError> {
    // pivot_root needs the new root to be a mount point.
    mount(
        Some(root),
        root,
        libc::MS_BIND | libc::MS_REC,
        "bind mounting the new root",
    )?;
    let root_c = cstring(root)?;
    // SAFETY: a valid NUL-terminated path.
    call("chdir to the new root", unsafe {
        libc::chdir(root_c.as_ptr())
    })?;
    let dot = c".";
    // "pivot_root . ." stacks the old root on the new one; detaching "." then drops it.
    // SAFETY: both arguments are valid NUL-terminated paths.
    call("pivot_root", unsafe {
        libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int
    })?;
    // SAFETY: a valid NUL-terminated path.
    call("detaching the old root", unsafe {
        libc::umount2(dot.as_ptr(), libc::MNT_DETACH)
    })?;
    // SAFETY: a valid NUL-terminated path.
    call("chdir /", unsafe { libc::chdir(c"/".as_ptr()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHILD: &str = "BULKHEAD_JAIL_ROOT_TEST_CHILD";

    /// Runs in a process of its own (it changes that process's root for good).
    #[test]
    fn child_enters_a_root_with_only_its_files() {
        let Ok(dir) = std::env::var(CHILD) else {
            return;
        };
        let dir = PathBuf::from(dir);
        let host_file = dir.join("kernel-on-host");
        std::fs::write(&host_file, b"vmlinux bytes").unwrap();
        let root = dir.join("root");
        std::fs::create_dir(&root).unwrap();
        let host_uts = std::fs::read_link("/proc/thread-self/ns/uts").unwrap();
        let host_net = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        enter_namespaces("vm-test").unwrap();
        leave_network().unwrap();
        assert_ne!(
            std::fs::read_link("/proc/thread-self/ns/uts").unwrap(),
            host_uts
        );
        assert_ne!(
            std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
            host_net
        );
        populate(
            &root,
            &[
                Entry {
                    host: host_file,
                    name: "vmlinux".into(),
                    read_only: true,
                    device: false,
                },
                Entry {
                    host: "/dev/null".into(),
                    name: "dev/null".into(),
                    read_only: false,
                    device: true,
                },
            ],
        )
        .unwrap();
        pivot(&root).unwrap();
        let mut names: Vec<String> = std::fs::read_dir("/")
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["dev", "vmlinux"]);
        assert_eq!(std::fs::read("/vmlinux").unwrap(), b"vmlinux bytes");
        // Read-only, and the host's tree is gone.
        assert!(std::fs::write("/vmlinux", b"x").is_err());
        assert!(!Path::new("/etc").exists());
        std::fs::write("/dev/null", b"works").unwrap();
        // SAFETY: gettid has no preconditions.
        println!("CHILD-OK tid={}", unsafe { libc::gettid() });
        // Stay until the parent has looked at this process's mounts from outside.
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    }

    #[test]
    fn a_process_in_the_jail_sees_only_its_own_files_and_namespaces() {
        if !crate::jail::test_as_root("entering namespaces and pivoting root") {
            return;
        }
        let dir = std::env::temp_dir().join(format!("bulkhead-jail-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut child =
            crate::jail::child_test("jail::root::tests::child_enters_a_root_with_only_its_files")
                .env(CHILD, &dir)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut text = String::new();
        let mut line = String::new();
        while std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0 {
            text.push_str(&line);
            if line.contains("CHILD-OK") {
                break;
            }
            line.clear();
        }
        // Seen from the host: the jail's mount table holds its root and its two files, and
        // nothing of the old root (not even stacked on the new one).
        // This thread's table: libtest may run the child test on a thread of its own, and
        // namespaces entered by unshare belong to the calling thread.
        let tid = line.trim().rsplit("tid=").next().unwrap_or("").to_string();
        let mountinfo =
            std::fs::read_to_string(format!("/proc/{}/task/{tid}/mountinfo", child.id()));
        drop(child.stdin.take());
        let status = child.wait().unwrap();
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
        assert!(status.success() && text.contains("CHILD-OK"), "{text}{err}");
        let mountinfo = mountinfo.unwrap();
        let mut points: Vec<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .collect();
        points.sort();
        assert_eq!(points, ["/", "/dev/null", "/vmlinux"], "{mountinfo}");
        // The bind mounts lived in the child's mount namespace only.
        let root = dir.join("root");
        assert_eq!(std::fs::read(root.join("vmlinux")).unwrap(), b"");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn entry_names_stay_inside_the_root() {
        for name in ["../escape", "/abs", "", "a/../../b"] {
            let e = Entry {
                host: "/dev/null".into(),
                name: name.into(),
                read_only: true,
                device: false,
            };
            assert!(
                matches!(
                    populate(Path::new("/nonexistent"), &[e]),
                    Err(RootError::BadName(_))
                ),
                "{name:?}"
            );
        }
    }
}
