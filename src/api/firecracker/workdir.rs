//! The personality's working directory (its VMM's settings, metrics and alerts), and the
//! removal of those a killed personality left behind.
//!
//! The front end removes its own directory when it ends, even when its first process was
//! killed (its death signal is SIGTERM). A SIGKILL to the whole process group or cgroup (an
//! orchestrator's, systemd's KillMode=control-group) leaves nobody to do it. So each directory
//! holds a `.lock` its personality's processes keep locked (flock) while they live, and a
//! front end whose VM runs removes the directories beside its own that nobody holds any more:
//! bulkhead's own (named `bulkhead-fc-*`, with the lock file), made by this user.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const PREFIX: &str = "bulkhead-fc-";
const LOCK: &str = ".lock";

/// A working directory, locked for as long as this value (and its copies in forked children)
/// lives. The lock is on the open file, which a fork shares: the first process makes and
/// locks it before it forks the front end, so a directory is never unlocked while either
/// lives, and the front end's copy alone keeps it locked once the host has closed its own.
pub struct WorkDir {
    pub path: PathBuf,
    _lock: File,
}

impl WorkDir {
    /// A new directory under a name nobody can guess: in the temporary directory, or, in a jail
    /// that has none, in /run (the one place the jailer lets it write; its root is root's), or
    /// in the working directory. None when none of them can be made.
    pub fn create() -> Option<WorkDir> {
        let name = format!(
            "{PREFIX}{}",
            crate::config::random_vm_id().unwrap_or_else(|_| std::process::id().to_string())
        );
        let candidates = [
            std::env::temp_dir().join(&name),
            PathBuf::from("/run").join(&name),
            PathBuf::from(&name),
        ];
        let path = candidates
            .into_iter()
            .find(|dir| std::fs::DirBuilder::new().mode(0o700).create(dir).is_ok())?;
        let path = std::env::current_dir()
            .map(|cwd| cwd.join(&path))
            .unwrap_or(path);
        let lock = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path.join(LOCK));
        match lock.and_then(|f| try_lock(&f).map(|()| f)) {
            Ok(lock) => Some(WorkDir { path, _lock: lock }),
            Err(e) => {
                log::error!("cannot lock the working directory {}: {e}", path.display());
                let _ = std::fs::remove_dir_all(&path);
                None
            }
        }
    }
}

fn try_lock(file: &File) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor this process owns; the result is checked.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Removes the working directories beside `own` whose personality is gone: named as
/// [`WorkDir::create`] names them, owned by this user, with a lock file nobody holds. A
/// directory without its lock file yet (being made right now) is left alone. Returns how many
/// it removed.
pub fn sweep_stale(own: &Path) -> usize {
    let Some(parent) = own.parent() else {
        return 0;
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mut removed = 0;
    for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        let path = entry.path();
        let ours = entry.file_name().to_string_lossy().starts_with(PREFIX)
            && path != own
            && std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir() && m.uid() == me);
        if !ours {
            continue;
        }
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path.join(LOCK));
        // Locked here, it stays locked while it is removed: no personality holds it.
        if let Ok(lock) = lock {
            if try_lock(&lock).is_ok() && std::fs::remove_dir_all(&path).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_directory_nobody_holds_is_swept_and_one_without_its_lock_file_is_left() {
        let base = std::env::temp_dir().join(format!("bulkhead-workdir-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let dir = |name: &str| base.join(format!("{PREFIX}{name}"));
        for name in ["own", "held", "stale", "making"] {
            std::fs::create_dir(dir(name)).unwrap();
        }
        for name in ["own", "held", "stale"] {
            File::create(dir(name).join(LOCK)).unwrap();
        }
        let held = File::open(dir("held").join(LOCK)).unwrap();
        try_lock(&held).unwrap();
        std::fs::create_dir(base.join("other-dir")).unwrap();
        File::create(base.join("other-dir").join(LOCK)).unwrap();

        assert_eq!(sweep_stale(&dir("own")), 1);
        assert!(!dir("stale").exists());
        for kept in [
            dir("own"),
            dir("held"),
            dir("making"),
            base.join("other-dir"),
        ] {
            assert!(kept.exists(), "{} was removed", kept.display());
        }
        drop(held);
        let _ = std::fs::remove_dir_all(&base);
    }
}
