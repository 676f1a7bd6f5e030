//! The shares' backends: one virtiofsd per `--share`, started by the supervisor before it
//! forks the VM process, each in virtiofsd's own sandbox (a mount, pid and network namespace
//! with the shared directory as its root, and its own seccomp filter) and read-only unless the
//! share says `rw`. The VM process never sees a path: the supervisor connects to each backend
//! and hands the connected socket over, as it does with vsock connections.
//!
//! Each directory is checked here, on the host, before anything starts: it must exist, be a
//! directory, and not be (or be under) the host's /proc, /sys or /dev; with a jail, the path
//! must be the directory itself, through no symlink. A directory that holds those trees (`/`,
//! which `bulkhead exec` shares) has them covered by empty tmpfs in its backend's view.
//!
//! A backend ends by itself when the VM process's end of its socket closes; the supervisor
//! then reaps it. One that does not end in time dies with the supervisor (PR_SET_PDEATHSIG),
//! whose seccomp filter lets it signal the VM process only.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::{ShareConfig, VmConfig};

/// Where virtiofsd is looked for after PATH: Debian's package installs it there.
const PACKAGED_VIRTIOFSD: &str = "/usr/libexec/virtiofsd";
/// Host trees a share may not expose, whatever path leads to them.
const FORBIDDEN: [&str; 3] = ["/proc", "/sys", "/dev"];
/// How long the supervisor waits for a backend to end by itself once the VM has.
const BACKEND_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("share {tag}: {}: {source}", path.display())]
    Missing {
        tag: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("share {tag}: {} is not a directory", path.display())]
    NotDirectory { tag: String, path: PathBuf },
    #[error("share {tag}: {} is the host's {tree} (or under it), which no guest may see", path.display())]
    HostTree {
        tag: String,
        path: PathBuf,
        tree: &'static str,
    },
    #[error("share {tag}: {} leads through a symlink or '..' (to {}); a jailed VM follows none: give the directory itself", path.display(), target.display())]
    Indirect {
        tag: String,
        path: PathBuf,
        target: PathBuf,
    },
    #[error("virtiofsd not found (looked for virtiofsd on PATH and {PACKAGED_VIRTIOFSD}): install Debian's virtiofsd package (trixie, or bookworm-backports) or run `cargo install virtiofsd`, or give its path with --virtiofsd")]
    NoVirtiofsd,
    #[error("the virtiofsd {} given can not be run: {source}", path.display())]
    BadVirtiofsd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("share {tag}: cannot make the backend's socket: {source}")]
    Socket {
        tag: String,
        #[source]
        source: std::io::Error,
    },
    #[error("share {tag}: cannot start {}: {source}", program.display())]
    Start {
        tag: String,
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ShareError {
    /// Whether the user's settings or host files are at fault (status 2), not the host.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, ShareError::Socket { .. } | ShareError::Start { .. })
    }
}

/// The running backends. Dropping them waits a little for each to end, then leaves the rest
/// to die with the supervisor.
pub struct Backends {
    children: Vec<Child>,
}

impl Backends {
    /// Checks every share of `config` and starts its backend: the backends, and each share's
    /// connected socket for the VM process, in share order.
    pub fn start(config: &VmConfig) -> Result<(Backends, Vec<OwnedFd>), ShareError> {
        let shares = &config.vm.shares;
        let mut backends = Backends {
            children: Vec::with_capacity(shares.len()),
        };
        if shares.is_empty() {
            return Ok((backends, Vec::new()));
        }
        let dirs = shares
            .iter()
            .map(|s| checked_dir(s, config.process.no_follow))
            .collect::<Result<Vec<_>, _>>()?;
        let program = find_virtiofsd(config.process.virtiofsd.as_deref())?;
        let mut sockets = Vec::with_capacity(shares.len());
        for (share, dir) in shares.iter().zip(&dirs) {
            let (child, socket) = start_backend(&program, share, dir)?;
            backends.children.push(child);
            sockets.push(socket);
        }
        log::info!(
            "VM {}: guest RAM is one sealed memfd mapped shared, which {} virtiofsd backend(s) map too; without shares it is private anonymous memory",
            config.process.vm_id,
            backends.children.len()
        );
        Ok((backends, sockets))
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        let deadline = Instant::now() + BACKEND_GRACE;
        for child in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Ok(None) => {
                        log::warn!(
                            "virtiofsd {} did not end with the VM; it dies with the supervisor",
                            child.id()
                        );
                        break;
                    }
                    _ => break,
                }
            }
        }
    }
}

/// The share's directory as the backend gets it: resolved, and checked.
fn checked_dir(share: &ShareConfig, no_follow: bool) -> Result<PathBuf, ShareError> {
    let tag = || share.tag.clone();
    let resolved = std::fs::canonicalize(&share.path).map_err(|source| ShareError::Missing {
        tag: tag(),
        path: share.path.clone(),
        source,
    })?;
    if let Some(tree) = FORBIDDEN
        .into_iter()
        .find(|tree| resolved.starts_with(tree))
    {
        return Err(ShareError::HostTree {
            tag: tag(),
            path: share.path.clone(),
            tree,
        });
    }
    let is_dir = std::fs::metadata(&resolved).map(|m| m.is_dir());
    if !is_dir.map_err(|source| ShareError::Missing {
        tag: tag(),
        path: share.path.clone(),
        source,
    })? {
        return Err(ShareError::NotDirectory {
            tag: tag(),
            path: share.path.clone(),
        });
    }
    if no_follow {
        let given = std::path::absolute(&share.path).unwrap_or_else(|_| share.path.clone());
        if given != resolved {
            return Err(ShareError::Indirect {
                tag: tag(),
                path: share.path.clone(),
                target: resolved,
            });
        }
    }
    Ok(resolved)
}

/// The virtiofsd to run: the one given, else the first on PATH, else Debian's.
fn find_virtiofsd(given: Option<&Path>) -> Result<PathBuf, ShareError> {
    if let Some(path) = given {
        return match std::fs::metadata(path) {
            Ok(m) if m.is_file() => Ok(path.to_path_buf()),
            Ok(_) => Err(ShareError::BadVirtiofsd {
                path: path.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            }),
            Err(source) => Err(ShareError::BadVirtiofsd {
                path: path.to_path_buf(),
                source,
            }),
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("virtiofsd"));
    on_path
        .chain(std::iter::once(PathBuf::from(PACKAGED_VIRTIOFSD)))
        .find(|p| p.is_file())
        .ok_or(ShareError::NoVirtiofsd)
}

/// Starts `program` serving `dir` for `share` on a listening socket it inherits, and connects
/// to it. The socket's file lives only until the connection is made, in a directory only this
/// user can enter.
fn start_backend(
    program: &Path,
    share: &ShareConfig,
    dir: &Path,
) -> Result<(Child, OwnedFd), ShareError> {
    let socket_error = |source| ShareError::Socket {
        tag: share.tag.clone(),
        source,
    };
    let private = crate::hostfile::private_dir(&format!("bulkhead-fs-{}", share.tag))
        .map_err(socket_error)?;
    let path = private.join("fs.sock");
    let bound = UnixListener::bind(&path).and_then(|listener| {
        // Queued now, accepted once virtiofsd is up: nothing to wait for here.
        let stream = UnixStream::connect(&path)?;
        Ok((listener, stream))
    });
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&private);
    let (listener, stream) = bound.map_err(socket_error)?;
    let listener_fd = listener.as_raw_fd();
    let mut command = Command::new(program);
    command
        .arg(format!("--fd={listener_fd}"))
        .arg("--shared-dir")
        .arg(dir)
        .args(["--sandbox=namespace", "--seccomp=kill", "--log-level=error"])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if !share.writable {
        command.arg("--readonly");
    }
    // The host trees under the shared directory (all three when it is `/`, as `bulkhead exec`
    // shares it) are covered in the backend's own mount namespace by an empty read-only tmpfs
    // before it starts: virtiofsd serves every submount, and no guest may browse the host's
    // /sys or /dev. (virtiofsd puts its own /proc in its sandbox.)
    let hidden: Vec<std::ffi::CString> = FORBIDDEN
        .iter()
        // virtiofsd reads the host's /proc as it starts, and then mounts its own there.
        .filter(|tree| **tree != "/proc")
        .map(Path::new)
        .filter(|tree| tree.starts_with(dir) && tree.is_dir())
        .filter_map(|tree| std::ffi::CString::new(tree.as_os_str().as_encoded_bytes()).ok())
        .collect();
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe calls (fcntl, prctl, setpgid, unshare, mount) on this child's own
    // state, with strings made before the fork.
    unsafe {
        command.pre_exec(move || {
            // The listening socket is the one descriptor virtiofsd inherits: every other one
            // this process got from its own parent closes at exec.
            let all_cloexec = libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            if all_cloexec != 0 || libc::fcntl(listener_fd, libc::F_SETFD, 0) != 0
                // It dies with the supervisor if it outlives the VM.
                || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
                // Ctrl-C at the terminal is the supervisor's to act on, not the backend's.
                || libc::setpgid(0, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if !hidden.is_empty() {
                let none = c"none".as_ptr();
                let tmpfs = c"tmpfs".as_ptr();
                let root = c"/".as_ptr();
                if libc::unshare(libc::CLONE_NEWNS) != 0
                    // Nothing done here reaches the host's mounts.
                    || libc::mount(none, root, std::ptr::null(), libc::MS_SLAVE | libc::MS_REC, std::ptr::null()) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                for tree in &hidden {
                    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                    if libc::mount(tmpfs, tree.as_ptr(), tmpfs, flags, c"size=4k".as_ptr().cast()) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|source| ShareError::Start {
        tag: share.tag.clone(),
        program: program.to_path_buf(),
        source,
    })?;
    log::debug!(
        "share {}: virtiofsd {} serves {}{}",
        share.tag,
        child.id(),
        dir.display(),
        if share.writable { "" } else { " read-only" }
    );
    Ok((child, OwnedFd::from(stream)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(path: &Path) -> ShareConfig {
        ShareConfig {
            path: path.to_path_buf(),
            tag: "t".to_string(),
            writable: false,
        }
    }

    #[test]
    fn a_share_must_be_an_existing_directory_outside_the_host_kernel_trees() {
        let dir = std::env::temp_dir().join(format!("bulkhead-share-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(checked_dir(&share(&dir), true).unwrap(), dir);
        assert!(matches!(
            checked_dir(&share(&dir.join("missing")), false),
            Err(ShareError::Missing { .. })
        ));
        assert!(matches!(
            checked_dir(&share(&file), false),
            Err(ShareError::NotDirectory { .. })
        ));
        for tree in ["/proc", "/proc/self", "/sys/kernel", "/dev"] {
            assert!(
                matches!(
                    checked_dir(&share(Path::new(tree)), false),
                    Err(ShareError::HostTree { .. })
                ),
                "{tree}"
            );
        }
        // A symlink to /proc is /proc.
        let link = dir.join("proc-link");
        std::os::unix::fs::symlink("/proc", &link).unwrap();
        assert!(matches!(
            checked_dir(&share(&link), false),
            Err(ShareError::HostTree { .. })
        ));
        // A symlink to a good directory: followed outside a jail, refused in one.
        let good = dir.join("good-link");
        std::os::unix::fs::symlink(&dir, &good).unwrap();
        assert_eq!(checked_dir(&share(&good), false).unwrap(), dir);
        assert!(matches!(
            checked_dir(&share(&good), true),
            Err(ShareError::Indirect { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_virtiofsd_that_is_not_there_is_named_with_the_package_to_install() {
        let err = find_virtiofsd(Some(Path::new("/nonexistent/virtiofsd"))).unwrap_err();
        assert!(matches!(err, ShareError::BadVirtiofsd { .. }));
        assert!(err.is_bad_input());
        assert!(ShareError::NoVirtiofsd
            .to_string()
            .contains("cargo install virtiofsd"));
    }
}
