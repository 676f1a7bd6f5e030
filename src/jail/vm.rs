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
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::cgroup::{self, CgroupError, Limits, VmCgroup};
use super::dirs::{self, DirError};
use super::privileges::{self, PrivilegeError, Rlimits};
use super::root::{self, Entry, RootError};
use crate::config::{JailConfig, VmConfig, MIN_FILE_SIZE_MIB};

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
    #[error("{what} {path} is no longer the file that was checked (it was replaced)")]
    FileChanged { what: &'static str, path: PathBuf },
    #[error("vsock socket {0}: a jailed VM's socket needs a plain file name")]
    SocketName(PathBuf),
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
                | JailError::FileChanged { .. }
                | JailError::Dir(DirError::Open { .. })
                | JailError::FileSize { .. }
                | JailError::SocketName(_)
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
    /// The file the supervisor resolved (device, inode): the one bound in must be it.
    id: (u64, u64),
}

/// Where a jailed VM's vsock sockets are, in its root.
pub const SOCKET_DIR: &str = "/vsock";

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
    socket_owner: u32,
    /// A network namespace to join rather than a new one.
    netns: Option<PathBuf>,
    cgroup: Option<VmCgroup>,
    rlimits: Rlimits,
    /// Set once the directory and cgroup are gone.
    removed: bool,
    /// The vsock socket directory's tmpfs, on the host.
    socket_dir: Option<PathBuf>,
    /// The supervisor that made it: only it removes it (a forked VM process, unwinding from a
    /// panic through the supervisor's frames, must not).
    owner: libc::pid_t,
}

/// The vsock socket directory's size: sockets take no room; the owner's stray files little.
pub const SOCKET_DIR_BYTES: u64 = 1 << 20;
pub const SOCKET_DIR_INODES: u64 = 1024;

/// Whatever way the supervisor leaves a jail behind (a step after it failed, an early return),
/// its directory and cgroup go with it.
impl Drop for VmJail {
    fn drop(&mut self) {
        self.remove();
    }
}

/// `path` relative to `/`, for joining under the jail root.
fn inside(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

/// `path` made absolute (from the working directory) and normal (`..` taken lexically, which
/// is exact because no symlink is allowed) and checked: no symlink anywhere in it (a jail follows none: a path someone else can re-point must not decide what
/// the VM gets), and the kind of file `what` needs. Returns the path, whether it is a device
/// node, and which file it is ([`dirs::identity`]).
fn resolve(what: &'static str, path: &Path) -> Result<(PathBuf, bool, (u64, u64)), JailError> {
    let file = |source| JailError::File {
        what,
        path: path.to_path_buf(),
        source,
    };
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(file)?.join(path)
    };
    let mut abs = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::Normal(part) => abs.push(part),
            Component::ParentDir => {
                abs.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    let fd = dirs::open_file_no_symlinks(&abs)?;
    let st = dirs::stat(&fd).map_err(file)?;
    let kind = st.st_mode & libc::S_IFMT;
    let ok = match what {
        "KVM device" | "tun device" => kind == libc::S_IFCHR,
        "disk" => kind == libc::S_IFREG || kind == libc::S_IFBLK,
        _ => kind == libc::S_IFREG,
    };
    if !ok {
        return Err(JailError::NotAFile { what, path: abs });
    }
    Ok((abs, kind != libc::S_IFREG, dirs::identity(&st)))
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
        // A file the daemon checked as the tenant must still be that file: a tenant that
        // swapped it since (in its own directory) gets a refusal, not root's open of another.
        let pins = std::mem::take(&mut config.process.pinned_files);
        let unchanged =
            |what, path: &Path, id: (u64, u64)| match pins.iter().find(|p| p.path == path) {
                Some(p) if (p.dev, p.ino) != id => Err(JailError::FileChanged {
                    what,
                    path: path.to_path_buf(),
                }),
                _ => Ok(()),
            };
        // A restore reads the snapshot's files, and no kernel or initrd.
        if let Some(restore) = &mut config.vm.restore {
            for (what, path) in [
                ("snapshot state", &mut restore.state),
                ("snapshot memory", &mut restore.mem),
            ] {
                let (real, _, id) = resolve(what, path)?;
                unchanged(what, &real, id)?;
                *path = real.clone();
                files.push(JailFile {
                    path: real,
                    read_only: true,
                    device: false,
                    id,
                });
            }
        } else {
            let (kernel, _, id) = resolve("kernel", &config.vm.kernel)?;
            unchanged("kernel", &kernel, id)?;
            config.vm.kernel = kernel;
            files.push(JailFile {
                path: config.vm.kernel.clone(),
                read_only: true,
                device: false,
                id,
            });
        }
        if let (Some(initrd), None) = (&config.vm.initrd, &config.vm.restore) {
            let (real, _, id) = resolve("initrd", initrd)?;
            unchanged("initrd", &real, id)?;
            files.push(JailFile {
                path: real.clone(),
                read_only: true,
                device: false,
                id,
            });
            config.vm.initrd = Some(real);
        }
        // The file-size rlimit bounds the offsets the VM process may write at: it must reach
        // past the end of every writable disk.
        let mut largest: Option<(u64, PathBuf)> = None;
        for disk in &mut config.vm.disks {
            let (path, device, id) = resolve("disk", &disk.path)?;
            unchanged("disk", &path, id)?;
            disk.path = path;
            files.push(JailFile {
                path: disk.path.clone(),
                read_only: disk.read_only,
                device,
                id,
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
            // A VM that can be snapshotted writes all of its RAM into the memory file.
            None if config.process.control_fd.is_some()
                || config.process.control_socket.is_some() =>
            {
                (MIN_FILE_SIZE_MIB << 20)
                    .max(largest_size)
                    .max(config.vm.mem_bytes())
            }
            None => (MIN_FILE_SIZE_MIB << 20).max(largest_size),
        };
        let (kvm, _, id) = resolve("KVM device", &config.process.kvm_device)?;
        config.process.kvm_device = kvm;
        files.push(JailFile {
            path: config.process.kvm_device.clone(),
            read_only: false,
            device: true,
            id,
        });
        if !config.vm.nets.is_empty() {
            let (path, _, id) = resolve("tun device", Path::new("/dev/net/tun"))?;
            files.push(JailFile {
                path,
                read_only: false,
                device: true,
                id,
            });
        }
        // The vsock sockets live in the jail's own `/vsock`, whatever directory was named:
        // only the file name is kept, so no path can reach outside that directory or share
        // an ancestor with the files bind mounted in.
        if let Some(vsock) = &mut config.vm.vsock {
            let name = vsock
                .uds
                .file_name()
                .filter(|n| !n.is_empty() && *n != "." && *n != "..")
                .ok_or_else(|| JailError::SocketName(vsock.uds.clone()))?;
            vsock.uds = Path::new(SOCKET_DIR).join(name);
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
            // Whatever the umask: the owners of vsock listeners inside must be able to pass
            // (but not to list the VMs).
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(base)
                .and_then(|()| {
                    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o711))
                })
                .map_err(|source| JailError::Create {
                    path: base.clone(),
                    source,
                })?;
        }
        let base_dir = dirs::open_root_owned(base)?;
        // Others may pass through, to a socket whose path they know, but not list VM ids.
        let vm = dirs::create_exclusive(&base_dir, &config.process.vm_id, 0, 0, 0o711)?;
        let root = match dirs::create_exclusive(&vm, "root", 0, 0, 0o755) {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&vm.path);
                return Err(e.into());
            }
        };
        let id = jc
            .uid
            .unwrap_or(jc.id_base.saturating_add(pid.unsigned_abs()));
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
            socket_owner: jc.socket_owner.unwrap_or(0),
            netns: jc.netns.clone(),
            cgroup: None,
            rlimits: Rlimits {
                open_files: jc.open_files,
                file_size_bytes: file_size,
            },
            removed: false,
            socket_dir: None,
            // SAFETY: getpid has no preconditions.
            owner: unsafe { libc::getpid() },
        };
        let made = cgroup::detect().and_then(|h| {
            VmCgroup::create(
                &h,
                &format!("bulkhead/{}", jail.config.process.vm_id),
                &limits,
            )
        });
        match made {
            Ok(group) => jail.cgroup = Some(group),
            // Dropping the jail removes what was made.
            Err(e) => return Err(e.into()),
        }
        if jail.config.vm.vsock.is_some() {
            jail.make_socket_dir()?;
        }
        Ok(jail)
    }

    /// The vsock socket directory, on the host side, before the VM process exists: a tmpfs of
    /// its own of [`SOCKET_DIR_BYTES`] and [`SOCKET_DIR_INODES`], so neither the VM process
    /// nor the owner of its listeners can fill the file system under `DIR`. Its owner makes
    /// listeners for guest connections there, and the jail's group reaches them. Made in the
    /// host's mount namespace, so host and VM process see the same directory.
    fn make_socket_dir(&mut self) -> Result<(), JailError> {
        let dir = self.root.join(SOCKET_DIR.trim_start_matches('/'));
        std::fs::create_dir(&dir).map_err(|source| JailError::Create {
            path: dir.clone(),
            source,
        })?;
        let options = format!(
            "size={SOCKET_DIR_BYTES},nr_inodes={SOCKET_DIR_INODES},mode=0770,uid={},gid={}",
            self.socket_owner, self.gid
        );
        root::mount_tmpfs(&dir, &options)?;
        self.socket_dir = Some(dir);
        Ok(())
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
        root::enter_namespaces(&self.config.process.vm_id)?;
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
            // The file the supervisor resolved (and, for the daemon's, the one checked as the
            // tenant), not one put at its path since.
            let now = dirs::stat(&fd).map(|st| dirs::identity(&st));
            if now.ok() != Some(f.id) {
                return Err(JailError::FileChanged {
                    what: "file",
                    path: f.path.clone(),
                });
            }
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
        root::mount_proc(&self.root)?;
        root::pivot(&self.root)?;
        Ok(())
    }

    /// What the VM process does once its files, taps, vsock socket and KVM are open, before
    /// it reads anything the guest supplied (the kernel included) and before any thread starts.
    pub fn locker(&self) -> JailLock {
        JailLock {
            leave_network: self.netns.is_none(),
            rlimits: self.rlimits,
            uid: self.uid,
            gid: self.gid,
            socket: self
                .config
                .vm
                .vsock
                .as_ref()
                .map(|v| (v.uds.clone(), self.socket_owner)),
        }
    }

    /// Removes what the jail left on the host: its cgroup and its directory (whose mount
    /// points died with the VM process's mount namespace). Called after the VM process is
    /// reaped; errors are logged, not returned: the VM has ended either way.
    pub fn remove(&mut self) {
        // SAFETY: getpid has no preconditions.
        if unsafe { libc::getpid() } != self.owner || std::mem::replace(&mut self.removed, true) {
            return;
        }
        if let Some(dir) = self.socket_dir.take() {
            if let Err(e) = root::unmount(&dir) {
                log::warn!("jail of VM {}: {e}", self.config.process.vm_id);
            }
        }
        if let Some(group) = self.cgroup.take() {
            if let Err(e) = group.remove() {
                log::warn!("jail of VM {}: {e}", self.config.process.vm_id);
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.vm_dir) {
            log::warn!(
                "jail of VM {}: cannot remove {}: {e}",
                self.config.process.vm_id,
                self.vm_dir.display()
            );
        }
    }
}

/// The last step of the jail, taken in the VM process: see [`VmJail::locker`].
#[derive(Debug, Clone)]
pub struct JailLock {
    leave_network: bool,
    rlimits: Rlimits,
    uid: u32,
    gid: u32,
    /// The VM's vsock socket (as the VM process sees it) and who may connect to it.
    socket: Option<(PathBuf, u32)>,
}

impl JailLock {
    /// Leaves the host's network namespace (unless it joined one of the operator's), lets the
    /// socket's owner and the jail's group reach the vsock socket, sets the rlimits, and drops
    /// to the jail's uid and gid for good.
    pub fn lock(&self) -> Result<(), JailError> {
        if self.leave_network {
            root::leave_network()?;
        }
        if let Some((path, owner)) = &self.socket {
            give_socket(path, *owner, self.gid)?;
        }
        privileges::set_rlimits(self.rlimits)?;
        // Writing past the file-size limit then fails with EFBIG instead of killing the VM.
        // SAFETY: setting a signal's disposition to ignore has no memory effects.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
        privileges::drop_to(self.uid, self.gid)?;
        Ok(())
    }
}

/// Gives the VM's vsock socket at `path` to `owner` and the jail's group, mode 0660. The
/// directory it is in belongs to `owner`, who could swap the socket for a symlink: the file is
/// opened without following one, checked to be a socket, and changed through that descriptor.
fn give_socket(path: &Path, owner: u32, gid: u32) -> Result<(), JailError> {
    let fail = |source| JailError::Create {
        path: path.to_path_buf(),
        source,
    };
    let fd = dirs::open_file_no_symlinks(path)
        .map_err(|e| fail(std::io::Error::other(e.to_string())))?;
    let st = dirs::stat(&fd).map_err(fail)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(fail(std::io::Error::other("not a socket")));
    }
    // The descriptor's own /proc entry names exactly the file it holds.
    let by_fd = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    std::os::unix::fs::chown(&by_fd, Some(owner), Some(gid)).map_err(fail)?;
    std::fs::set_permissions(&by_fd, std::fs::Permissions::from_mode(0o660)).map_err(fail)
}
