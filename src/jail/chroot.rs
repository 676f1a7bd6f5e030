//! The jailer's chroot, made so that nothing a previous occupant left can be used: every
//! directory from `CHROOT_BASE` down to `root` is root's and writable by root alone (made so
//! when missing, refused otherwise), nothing the jailer makes may be there already, and every
//! file, directory, device node and mount point beneath `root` is made through a descriptor of
//! its parent (`openat2` with `RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS`, `O_EXCL`), so no symlink
//! anyone planted is followed. Bind mounts land on the made file through `/proc/self/fd`, not
//! through a path.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};

use super::dirs::{self, Dir, DirError};
use super::root::{self, RootError};

#[derive(Debug, thiserror::Error)]
pub enum ChrootError {
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error(transparent)]
    Root(#[from] RootError),
    #[error("{0}: left by an earlier jail with this id; remove the jail directory first (a jail is never made over another's files)")]
    Stale(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An open chroot directory.
#[derive(Debug)]
pub struct Chroot {
    pub root: Dir,
}

impl Chroot {
    /// Opens `base/exec_name/id/root`, making what is missing. `base` itself may be made
    /// (with its parents) as Firecracker's jailer does, but must then be root's alone.
    pub fn open(base: &Path, exec_name: &str, id: &str) -> Result<Chroot, ChrootError> {
        if !base.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .create(base)
                .map_err(|source| ChrootError::Io {
                    what: "creating",
                    path: base.to_path_buf(),
                    source,
                })?;
        }
        let mut dir = dirs::open_root_owned(base)?;
        for name in [exec_name, id, "root"] {
            dir = dirs::root_owned_child(&dir, name, 0o755)?;
        }
        Ok(Chroot { root: dir })
    }

    /// Fails when any of `names` is already in the chroot: a previous occupant's files.
    pub fn refuse_stale(&self, names: &[&str]) -> Result<(), ChrootError> {
        for name in names {
            let c = std::ffi::CString::new(*name).map_err(|_| DirError::BadPath {
                path: self.root.path.join(name),
            })?;
            // SAFETY: an all-zero stat is a valid buffer for fstatat to fill.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: an open directory, a valid name, a valid buffer; no symlink followed.
            let rc = unsafe {
                libc::fstatat(
                    self.root.fd.as_raw_fd(),
                    c.as_ptr(),
                    &mut st,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            if rc == 0 {
                return Err(ChrootError::Stale(self.root.path.join(name)));
            }
        }
        Ok(())
    }

    /// The directory `rel` beneath the root, each missing component made root's with mode
    /// 0755 (existing ones must be root's alone).
    pub fn dir(&self, rel: &Path) -> Result<Dir, ChrootError> {
        let fd = self.root.fd.try_clone().map_err(|source| ChrootError::Io {
            what: "opening",
            path: self.root.path.clone(),
            source,
        })?;
        let mut dir = Dir {
            fd,
            path: self.root.path.clone(),
        };
        for name in names(rel)? {
            dir = dirs::root_owned_child(&dir, &name, 0o755)?;
        }
        Ok(dir)
    }

    /// The directory `name` in the root made `uid:gid`'s (0700) when missing; one already
    /// there (the orchestrator's) is left as it is.
    pub fn own_dir(&self, name: &str, uid: u32, gid: u32) -> Result<(), ChrootError> {
        let path = self.root.path.join(name);
        let c =
            std::ffi::CString::new(name).map_err(|_| DirError::BadPath { path: path.clone() })?;
        let io = |what| {
            let path = path.clone();
            move |source| ChrootError::Io { what, path, source }
        };
        // SAFETY: an open directory and a valid name.
        if unsafe { libc::mkdirat(self.root.fd.as_raw_fd(), c.as_ptr(), 0o700) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                return Ok(());
            }
            return Err(io("creating")(e));
        }
        self.give(&self.root, &c, uid, gid).map_err(io("giving"))
    }

    /// `fchownat` of `name` in `dir` to `uid:gid`, following no link.
    fn give(&self, dir: &Dir, name: &std::ffi::CStr, uid: u32, gid: u32) -> std::io::Result<()> {
        // SAFETY: an open directory and a valid name; no link is followed.
        let rc = unsafe {
            libc::fchownat(
                dir.fd.as_raw_fd(),
                name.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// A new file at `rel` (it must not exist), made with `mode`.
    pub fn new_file(&self, rel: &Path, mode: u32) -> Result<File, ChrootError> {
        let (parent, name) = self.parent_of(rel)?;
        let fd = dirs::open_beneath(
            &parent,
            &name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            mode,
        )?;
        Ok(File::from(fd))
    }

    /// A character device node at `rel` like the host's `host`, for `uid:gid` alone.
    pub fn device(&self, rel: &Path, host: &Path, uid: u32, gid: u32) -> Result<(), ChrootError> {
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(host)
            .map_err(|source| ChrootError::Io {
                what: "reading",
                path: host.to_path_buf(),
                source,
            })?
            .rdev();
        let (parent, name) = self.parent_of(rel)?;
        let path = parent.path.join(&name);
        let c = std::ffi::CString::new(name.as_str())
            .map_err(|_| DirError::BadPath { path: path.clone() })?;
        let io = |what| {
            let path = path.clone();
            move |source| ChrootError::Io { what, path, source }
        };
        // SAFETY: an open directory and a valid name; mknodat fails on anything already there.
        if unsafe {
            libc::mknodat(
                parent.fd.as_raw_fd(),
                c.as_ptr(),
                libc::S_IFCHR | 0o600,
                rdev,
            )
        } != 0
        {
            return Err(io("making the device")(std::io::Error::last_os_error()));
        }
        self.give(&parent, &c, uid, gid).map_err(io("giving"))
    }

    /// Makes the host file `host` visible at `rel` beneath the root, read-only, on a new
    /// empty file made for it.
    pub fn bind_read_only(&self, host: &Path, rel: &Path) -> Result<(), ChrootError> {
        let (parent, name) = self.parent_of(rel)?;
        let target = File::from(dirs::open_beneath(
            &parent,
            &name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o444,
        )?);
        root::bind(host, &fd_path(&target))?;
        // The mount's root, opened anew through the parent: what the remount must name.
        let mounted = dirs::open_beneath(&parent, &name, libc::O_PATH, 0)?;
        root::restrict(
            &fd_path(&mounted),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        )?;
        Ok(())
    }

    /// Mounts an empty, read-only tmpfs on the directory `rel` (made for it), so nothing can
    /// be placed there: `/etc`, where the dynamic loader would read `ld.so.preload`.
    pub fn empty_read_only(&self, rel: &Path) -> Result<(), ChrootError> {
        let dir = self.dir(rel)?;
        root::mount_empty_read_only(&fd_path(&dir.fd))?;
        Ok(())
    }

    /// The directory holding `rel` (made as [`Chroot::dir`] does) and its last name.
    fn parent_of(&self, rel: &Path) -> Result<(Dir, String), ChrootError> {
        let mut parts = names(rel)?;
        let name = parts.pop().ok_or_else(|| DirError::BadPath {
            path: rel.to_path_buf(),
        })?;
        let parent: PathBuf = parts.iter().collect();
        Ok((self.dir(&parent)?, name))
    }
}

/// The path through which the kernel finds exactly the file `fd` is open on.
fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// `rel`'s components, each a plain name (no `..`, no root, no `.`).
fn names(rel: &Path) -> Result<Vec<String>, DirError> {
    rel.components()
        .filter(|c| !matches!(c, Component::RootDir))
        .map(|c| match c {
            Component::Normal(n) => n.to_str().map(str::to_string),
            _ => None,
        })
        .collect::<Option<Vec<String>>>()
        .ok_or_else(|| DirError::BadPath {
            path: rel.to_path_buf(),
        })
}
