//! One VM's jail, start to end. The supervisor prepares it (the per-VM directory, the cgroup,
//! the files the VM may use, resolved once), the VM process enters it before it builds the VM
//! ([`VmJail::enter`]) and locks itself in once the VM is built ([`VmJail::lock`]), and the
//! supervisor removes what is left after the VM process is reaped.
//!
//! The VM process builds the VM as root inside its new root: it opens the files bind mounted
//! there, `/dev/kvm` and the taps, which the jail's uid could not. Then it leaves the network
//! namespace, sets its rlimits and drops to the jail's uid and gid, before any thread starts
//! and before the guest runs a single instruction.

use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::cgroup::{self, CgroupError, Limits, VmCgroup};
use super::dirs::{self, DirError};
use super::privileges::{self, PrivilegeError, Rlimits};
use super::root::{self, Entry, RootError};
use crate::config::{JailConfig, VmConfig, MIN_FILE_SIZE_MIB};

/// A VM process's uid and gid, unless configured: this plus the supervisor's pid, so two
/// running VMs never share one. Far above the ranges distributions hand to users and to
/// subordinate-id maps.
pub const JAIL_ID_BASE: u32 = 900_000_000;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("--jail needs root (bulkhead runs as uid {0})")]
    NotRoot(u32),
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Root(#[from] RootError),
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is not a regular file or a block device")]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("jail file_size_mib {limit} is smaller than the writable disk {path} ({size} bytes)")]
    FileSize {
        limit: u64,
        path: PathBuf,
        size: u64,
    },
    #[error("cannot create the jail directory {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl JailError {
    /// True when the operator's input is at fault (a missing file, a bad limit), not the host.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            JailError::NotRoot(_)
                | JailError::File { .. }
                | JailError::NotAFile { .. }
                | JailError::FileSize { .. }
                | JailError::Dir(DirError::Exists { .. } | DirError::Unsafe { .. })
        )
    }
}

/// One host file the VM may use, at the same absolute path inside the jail.
#[derive(Debug, Clone)]
struct JailFile {
    path: PathBuf,
    read_only: bool,
    device: bool,
}

/// A prepared jail.
#[derive(Debug)]
pub struct VmJail {
    /// `DIR/VM-ID`: bulkhead's own directory for this VM.
    pub vm_dir: PathBuf,
    /// `DIR/VM-ID/root`: the VM process's `/`.
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// The VM's settings with every file path resolved to the one the jail holds.
    pub config: VmConfig,
    files: Vec<JailFile>,
    /// Directories (absolute, as the VM sees them) that hold its vsock sockets.
    socket_dirs: Vec<PathBuf>,
    socket_owner: u32,
    /// A network namespace to join rather than a new one.
    netns: Option<PathBuf>,
    cgroup: Option<VmCgroup>,
    rlimits: Rlimits,
}

/// `path` relative to `/`, for joining under the jail root.
fn inside(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

fn resolve(what: &'static str, path: &Path) -> Result<PathBuf, JailError> {
    let file = |source| JailError::File {
        what,
        path: path.to_path_buf(),
        source,
    };
    let real = std::fs::canonicalize(path).map_err(file)?;
    let meta = std::fs::metadata(&real).map_err(file)?;
    use std::os::unix::fs::FileTypeExt;
    let kind = meta.file_type();
    let device = what == "KVM device" || what == "tun device";
    let ok = if device {
        kind.is_char_device()
    } else {
        kind.is_file() || kind.is_block_device()
    };
    if !ok {
        return Err(JailError::NotAFile {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(real)
}

impl VmJail {
    /// Prepares `config`'s jail: resolves its files, makes its directory and cgroup. Called
    /// by the supervisor, as root, before it starts the VM process.
    pub fn prepare(config: &VmConfig, jc: &JailConfig) -> Result<VmJail, JailError> {
        // SAFETY: geteuid and getpid have no preconditions.
        let (euid, pid) = unsafe { (libc::geteuid(), libc::getpid()) };
        if euid != 0 {
            return Err(JailError::NotRoot(euid));
        }
        let mut config = config.clone();
        let mut files = Vec::new();
        config.kernel = resolve("kernel", &config.kernel)?;
        files.push(JailFile {
            path: config.kernel.clone(),
            read_only: true,
            device: false,
        });
        if let Some(initrd) = &config.initrd {
            let real = resolve("initrd", initrd)?;
            files.push(JailFile {
                path: real.clone(),
                read_only: true,
                device: false,
            });
            config.initrd = Some(real);
        }
        // The file-size rlimit bounds the offsets the VM process may write at: it must reach
        // past the end of every writable disk.
        let mut largest: Option<(u64, PathBuf)> = None;
        for disk in &mut config.disks {
            disk.path = resolve("disk", &disk.path)?;
            files.push(JailFile {
                path: disk.path.clone(),
                read_only: disk.read_only,
                device: false,
            });
            let size = std::fs::metadata(&disk.path).map_or(0, |m| m.len());
            if !disk.read_only && !largest.as_ref().is_some_and(|(l, _)| size <= *l) {
                largest = Some((size, disk.path.clone()));
            }
        }
        let (largest_size, _) = largest.clone().unwrap_or_default();
        let file_size = match jc.file_size_mib {
            Some(mib) => match largest {
                Some((size, path)) if size > mib << 20 => {
                    return Err(JailError::FileSize {
                        limit: mib,
                        path,
                        size,
                    })
                }
                _ => mib << 20,
            },
            None => (MIN_FILE_SIZE_MIB << 20).max(largest_size),
        };
        config.kvm_device = resolve("KVM device", &config.kvm_device)?;
        files.push(JailFile {
            path: config.kvm_device.clone(),
            read_only: false,
            device: true,
        });
        if !config.nets.is_empty() {
            files.push(JailFile {
                path: resolve("tun device", Path::new("/dev/net/tun"))?,
                read_only: false,
                device: true,
            });
        }
        let mut socket_dirs = Vec::new();
        if let Some(vsock) = &mut config.vsock {
            if !vsock.uds.is_absolute() {
                let cwd = std::env::current_dir().map_err(|source| JailError::File {
                    what: "vsock socket",
                    path: vsock.uds.clone(),
                    source,
                })?;
                vsock.uds = cwd.join(&vsock.uds);
            }
            if let Some(dir) = vsock.uds.parent() {
                socket_dirs.push(dir.to_path_buf());
            }
        }

        if let Some(ns) = &jc.netns {
            std::fs::metadata(ns).map_err(|source| JailError::File {
                what: "network namespace",
                path: ns.clone(),
                source,
            })?;
        }
        let base = &jc.dir;
        if !base.exists() {
            // Whatever the umask: the owners of vsock listeners inside must be able to pass.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(base)
                .and_then(|()| {
                    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755))
                })
                .map_err(|source| JailError::Create {
                    path: base.clone(),
                    source,
                })?;
        }
        let base_dir = dirs::open_root_owned(base)?;
        let vm = dirs::create_exclusive(&base_dir, &config.vm_id, 0, 0, 0o755)?;
        let root = dirs::create_exclusive(&vm, "root", 0, 0, 0o755)?;
        let id = jc
            .uid
            .unwrap_or(JAIL_ID_BASE.saturating_add(pid.unsigned_abs()));
        let limits = Limits {
            cpu: Some((u64::from(jc.cpu_percent) * 1000, 100_000)),
            memory_bytes: Some(jc.memory_mib << 20),
            pids: Some(jc.pids),
        };
        let mut jail = VmJail {
            vm_dir: vm.path.clone(),
            root: root.path.clone(),
            uid: id,
            gid: jc.gid.unwrap_or(id),
            config,
            files,
            socket_dirs,
            socket_owner: jc.socket_owner.unwrap_or(0),
            netns: jc.netns.clone(),
            cgroup: None,
            rlimits: Rlimits {
                open_files: jc.open_files,
                file_size_bytes: file_size,
            },
        };
        let made = cgroup::detect().and_then(|h| {
            VmCgroup::create(&h, &format!("bulkhead/{}", jail.config.vm_id), &limits)
        });
        match made {
            Ok(group) => jail.cgroup = Some(group),
            Err(e) => {
                jail.remove();
                return Err(e.into());
            }
        }
        Ok(jail)
    }

    /// Where the host finds the socket the VM process creates at `path` (as the VM sees it).
    pub fn host_path(&self, path: &Path) -> PathBuf {
        self.root.join(inside(path))
    }

    /// In the VM process, single-threaded and still root: joins the cgroup, enters the new
    /// namespaces and the new root. The process must already be in its own pid namespace.
    pub fn enter(&self) -> Result<(), JailError> {
        if let Some(group) = &self.cgroup {
            // 0: the writing process itself, whatever its pid in this namespace.
            group.add(0)?;
        }
        root::enter_namespaces(&self.config.vm_id)?;
        if let Some(ns) = &self.netns {
            // Joined now, while the host's tree is still there to find it, and before the
            // taps (which live there) are opened.
            root::join_network(ns)?;
        }
        // Each file is opened once, without following symlinks anywhere in its (resolved)
        // path, and the bind mount is made from that descriptor, so a path swapped since the
        // supervisor resolved it can not put another file in the jail.
        let mut held = Vec::with_capacity(self.files.len());
        let mut entries = Vec::with_capacity(self.files.len());
        for f in &self.files {
            let fd = dirs::open_file_no_symlinks(&f.path)?;
            entries.push(Entry {
                host: PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
                name: inside(&f.path),
                read_only: f.read_only,
                device: f.device,
            });
            held.push(fd);
        }
        root::populate(&self.root, &entries)?;
        drop(held);
        for dir in &self.socket_dirs {
            let path = self.host_path(dir);
            std::fs::create_dir_all(&path).map_err(|source| JailError::Create {
                path: path.clone(),
                source,
            })?;
            let c = std::ffi::CString::new(path.as_os_str().as_bytes())
                .map_err(|_| JailError::Root(RootError::BadPath(path.clone())))?;
            // SAFETY: a valid NUL-terminated path; chown touches no memory of ours.
            if unsafe { libc::chown(c.as_ptr(), self.socket_owner, self.socket_owner) } != 0 {
                return Err(JailError::Create {
                    path,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        root::mount_proc(&self.root)?;
        root::pivot(&self.root)?;
        Ok(())
    }

    /// In the VM process, once the VM is built and before any thread starts: leaves the
    /// host's network namespace (unless it joined one of the operator's), sets the rlimits,
    /// and drops to the jail's uid and gid for good.
    pub fn lock(&self) -> Result<(), JailError> {
        if self.netns.is_none() {
            root::leave_network()?;
        }
        privileges::set_rlimits(self.rlimits)?;
        // Writing past the file-size limit then fails with EFBIG instead of killing the VM.
        // SAFETY: setting a signal's disposition to ignore has no memory effects.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
        privileges::drop_to(self.uid, self.gid)?;
        Ok(())
    }

    /// Removes what the jail left on the host: its cgroup and its directory (whose mount
    /// points died with the VM process's mount namespace). Called after the VM process is
    /// reaped; errors are logged, not returned: the VM has ended either way.
    pub fn remove(&mut self) {
        if let Some(group) = self.cgroup.take() {
            if let Err(e) = group.remove() {
                log::warn!("jail of VM {}: {e}", self.config.vm_id);
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.vm_dir) {
            log::warn!(
                "jail of VM {}: cannot remove {}: {e}",
                self.config.vm_id,
                self.vm_dir.display()
            );
        }
    }
}
