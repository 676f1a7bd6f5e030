//! Directories a jail is built from, made so that nobody else can have placed anything in
//! them: every path is resolved with no symlink anywhere in it (`openat2` with
//! `RESOLVE_NO_SYMLINKS`), a parent must be root's and writable by root alone, and a jail's own
//! directory must not exist before bulkhead creates it (`mkdirat` fails on anything already
//! there, a symlink included).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{path}: not a usable path (relative, or with a NUL byte)")]
    BadPath { path: PathBuf },
    #[error("cannot open {path} without following symlinks: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} must be a directory owned by root and writable by nobody else (owner {uid}, mode {mode:o})")]
    Unsafe { path: PathBuf, uid: u32, mode: u32 },
    #[error("{path} already exists: a jail directory is only ever one bulkhead made itself")]
    Exists { path: PathBuf },
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot give {path} to {uid}:{gid} with mode {mode:o}: {source}")]
    Own {
        path: PathBuf,
        uid: u32,
        gid: u32,
        mode: u32,
        #[source]
        source: std::io::Error,
    },
}

/// An open directory: the fd and the path it was opened by, for messages.
#[derive(Debug)]
pub struct Dir {
    pub fd: OwnedFd,
    pub path: PathBuf,
}

/// The arguments of openat2(2) (the struct is non-exhaustive: later kernels may add fields).
fn open_how(flags: libc::c_int, resolve: u64) -> libc::open_how {
    // SAFETY: open_how is plain integers; all-zero is valid (and what unused fields must be).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = resolve;
    how
}

/// Opens the absolute directory `path`, refusing a symlink in any of its components.
pub fn open_no_symlinks(path: &Path) -> Result<Dir, DirError> {
    let fd = open_absolute(path, libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)?;
    Ok(Dir {
        fd,
        path: path.to_path_buf(),
    })
}

/// Opens the absolute path of any file as an `O_PATH` descriptor (it can be stat'ed, or
/// mounted through `/proc/self/fd`), refusing a symlink in any of its components.
pub fn open_file_no_symlinks(path: &Path) -> Result<OwnedFd, DirError> {
    open_absolute(path, libc::O_PATH | libc::O_CLOEXEC)
}

/// Opens the absolute `path` with `flags` (the caller's own O_* flags), refusing a symlink in
/// any of its components.
pub fn open_absolute(path: &Path, flags: libc::c_int) -> Result<OwnedFd, DirError> {
    let bad = || DirError::BadPath {
        path: path.to_path_buf(),
    };
    if !path.is_absolute() {
        return Err(bad());
    }
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| bad())?;
    let how = open_how(
        flags,
        libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    );
    // SAFETY: `c` is a valid NUL-terminated string and `how` a valid open_how of the size
    // passed; openat2 only reads them.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(DirError::Open {
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: openat2 returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Opens the single name `name` in `parent` with `flags` (and `mode` when it creates),
/// staying beneath `parent` and following no symlink, magic link included.
pub fn open_beneath(
    parent: &Dir,
    name: &str,
    flags: libc::c_int,
    mode: u32,
) -> Result<OwnedFd, DirError> {
    let path = parent.path.join(name);
    let single = !name.is_empty() && name != "." && name != ".." && !name.contains('/');
    let c = CString::new(name)
        .ok()
        .filter(|_| single)
        .ok_or_else(|| DirError::BadPath { path: path.clone() })?;
    let mut how = open_how(
        flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    );
    how.mode = u64::from(mode);
    // SAFETY: `parent.fd` is an open directory, `c` a valid NUL-terminated name and `how` a
    // valid open_how of the size passed; openat2 only reads them.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            parent.fd.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(DirError::Open {
            path,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: openat2 returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The directory `name` in `parent`, made (root's, `mode`) if missing; an existing one must be
/// a directory only root can change (owned by uid 0, not writable by group or others).
pub fn root_owned_child(parent: &Dir, name: &str, mode: u32) -> Result<Dir, DirError> {
    let path = parent.path.join(name);
    let c = CString::new(name).map_err(|_| DirError::BadPath { path: path.clone() })?;
    // SAFETY: `parent.fd` is an open directory and `c` a valid NUL-terminated name.
    if unsafe { libc::mkdirat(parent.fd.as_raw_fd(), c.as_ptr(), mode) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(DirError::Create { path, source: e });
        }
    }
    let fd = open_beneath(parent, name, libc::O_PATH | libc::O_DIRECTORY, 0)?;
    let st = stat(&fd).map_err(|source| DirError::Open {
        path: path.clone(),
        source,
    })?;
    if st.st_uid != 0 || st.st_mode & 0o022 != 0 {
        return Err(DirError::Unsafe {
            path,
            uid: st.st_uid,
            mode: st.st_mode & 0o7777,
        });
    }
    Ok(Dir { fd, path })
}

/// Which file a stat describes, as (device, inode): a block device is the device it names,
/// whichever node names it, so it is (its device number, 0).
pub fn identity(st: &libc::stat) -> (u64, u64) {
    if st.st_mode & libc::S_IFMT == libc::S_IFBLK {
        (st.st_rdev, 0)
    } else {
        (st.st_dev, st.st_ino)
    }
}

/// fstat of `fd` (an O_PATH descriptor works too).
pub fn stat(fd: &OwnedFd) -> std::io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid buffer for fstat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `st` is valid for writes.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// Opens `path` (no symlinks) and checks that only root can change what is in it: a directory
/// owned by uid 0, not writable by group or others. What bulkhead creates below it can then
/// not be replaced by another user.
pub fn open_root_owned(path: &Path) -> Result<Dir, DirError> {
    let dir = open_no_symlinks(path)?;
    let st = stat(&dir.fd).map_err(|source| DirError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
    if !is_dir || st.st_uid != 0 || st.st_mode & 0o022 != 0 {
        return Err(DirError::Unsafe {
            path: path.to_path_buf(),
            uid: st.st_uid,
            mode: st.st_mode & 0o7777,
        });
    }
    Ok(dir)
}

/// Creates the directory `name` (one path component) in `parent`, which must not exist yet,
/// and gives it to `uid:gid` with `mode`. Returns it opened. `parent` should come from
/// [`open_root_owned`]: then nobody but root can swap the new directory before it is opened.
pub fn create_exclusive(
    parent: &Dir,
    name: &str,
    uid: u32,
    gid: u32,
    mode: u32,
) -> Result<Dir, DirError> {
    let path = parent.path.join(name);
    let single = !name.is_empty() && name != "." && name != ".." && !name.contains('/');
    let c = CString::new(name)
        .ok()
        .filter(|_| single)
        .ok_or_else(|| DirError::BadPath { path: path.clone() })?;
    // Created 0700 first: nobody else can enter it until its owner and mode are final.
    // SAFETY: `parent.fd` is an open directory and `c` a valid NUL-terminated name.
    if unsafe { libc::mkdirat(parent.fd.as_raw_fd(), c.as_ptr(), 0o700) } != 0 {
        let source = std::io::Error::last_os_error();
        return Err(if source.raw_os_error() == Some(libc::EEXIST) {
            DirError::Exists { path }
        } else {
            DirError::Create { path, source }
        });
    }
    let dir = Dir {
        fd: open_beneath(parent, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?,
        path,
    };
    let own_err = |source| DirError::Own {
        path: dir.path.clone(),
        uid,
        gid,
        mode,
        source,
    };
    // SAFETY: fchown and fchmod on a directory fd we hold; no memory is involved.
    if unsafe { libc::fchown(dir.fd.as_raw_fd(), uid, gid) } != 0 {
        return Err(own_err(std::io::Error::last_os_error()));
    }
    // SAFETY: as above.
    if unsafe { libc::fchmod(dir.fd.as_raw_fd(), mode) } != 0 {
        return Err(own_err(std::io::Error::last_os_error()));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    /// A root-owned 0755 scratch directory (the tests need root to chown), removed when the
    /// test ends.
    struct Scratch(PathBuf);

    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl AsRef<Path> for Scratch {
        fn as_ref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Option<Scratch> {
        if !crate::jail::test_as_root("creating root-owned jail directories") {
            return None;
        }
        let dir = std::env::temp_dir().join(format!("bulkhead-jail-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Some(Scratch(dir))
    }

    #[test]
    fn a_new_directory_belongs_to_the_vm_user_with_the_mode_asked_for() {
        let Some(base) = scratch("create") else {
            return;
        };
        let parent = open_root_owned(&base).unwrap();
        create_exclusive(&parent, "vm1", 123_456, 123_457, 0o750).unwrap();
        let meta = std::fs::metadata(base.join("vm1")).unwrap();
        assert!(meta.is_dir());
        assert_eq!((meta.uid(), meta.gid()), (123_456, 123_457));
        assert_eq!(meta.mode() & 0o7777, 0o750);
    }

    #[test]
    fn anything_already_there_is_refused_a_symlink_included() {
        let Some(base) = scratch("exists") else {
            return;
        };
        let parent = open_root_owned(&base).unwrap();
        std::fs::create_dir(base.join("dir")).unwrap();
        std::os::unix::fs::symlink("/etc", base.join("link")).unwrap();
        std::fs::write(base.join("file"), b"").unwrap();
        for name in ["dir", "link", "file"] {
            assert!(
                matches!(
                    create_exclusive(&parent, name, 1, 1, 0o700),
                    Err(DirError::Exists { .. })
                ),
                "{name}"
            );
        }
        // /etc was not touched through the link.
        assert_eq!(std::fs::metadata("/etc").unwrap().uid(), 0);
        for name in ["", ".", "..", "a/b"] {
            assert!(
                matches!(
                    create_exclusive(&parent, name, 1, 1, 0o700),
                    Err(DirError::BadPath { .. })
                ),
                "{name:?}"
            );
        }
    }

    #[test]
    fn a_symlink_anywhere_in_a_parent_path_is_refused() {
        let Some(base) = scratch("symlinked") else {
            return;
        };
        std::fs::create_dir(base.join("real")).unwrap();
        std::os::unix::fs::symlink(base.join("real"), base.join("alias")).unwrap();
        assert!(open_no_symlinks(&base.join("real")).is_ok());
        assert!(matches!(
            open_no_symlinks(&base.join("alias")),
            Err(DirError::Open { .. })
        ));
        assert!(matches!(
            open_no_symlinks(Path::new("relative/dir")),
            Err(DirError::BadPath { .. })
        ));
    }

    #[test]
    fn a_parent_others_can_write_or_do_not_own_is_unsafe() {
        let Some(base) = scratch("unsafe") else {
            return;
        };
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            open_root_owned(&base),
            Err(DirError::Unsafe { mode: 0o777, .. })
        ));
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&base, Some(4242), None).unwrap();
        assert!(matches!(
            open_root_owned(&base),
            Err(DirError::Unsafe { uid: 4242, .. })
        ));
    }
}
