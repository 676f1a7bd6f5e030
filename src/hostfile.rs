//! Reading a settings file the operator names (`bulkhead run --config`, the Firecracker
//! personality's `--config-file`, `bulkhead serve --config`): a regular file only, opened
//! without blocking (a FIFO must not hang start-up), and no larger than a settings file can
//! sensibly be. And the private scratch directories bulkhead makes for its own files.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The largest settings file bulkhead reads: far beyond any real one.
pub const MAX_SETTINGS_BYTES: u64 = 1 << 20;

/// Why a settings file could not be read; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum HostFileError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {}: not a regular file", path.display())]
    NotRegular { path: PathBuf },
    #[error("config file {}: {len} bytes, more than the {MAX_SETTINGS_BYTES} a settings file may have", path.display())]
    TooLarge { path: PathBuf, len: u64 },
}

/// fstat of an open descriptor by the fstat system call itself: glibc's fstat() is
/// newfstatat(), which names a path, and std's metadata() is statx, both of which the VMM
/// thread's filter refuses.
pub fn fstat(fd: &impl std::os::fd::AsRawFd) -> std::io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid buffer for fstat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open (borrowed for the call) and `st` is valid for writes.
    let rc = unsafe { libc::syscall(libc::SYS_fstat, fd.as_raw_fd(), &mut st as *mut libc::stat) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// Reads the settings file at `path`.
pub fn read_settings(path: &Path) -> Result<String, HostFileError> {
    let fail = |source| HostFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(fail)?;
    let meta = f.metadata().map_err(fail)?;
    if !meta.is_file() {
        return Err(HostFileError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    if meta.len() > MAX_SETTINGS_BYTES {
        return Err(HostFileError::TooLarge {
            path: path.to_path_buf(),
            len: meta.len(),
        });
    }
    let mut text = String::new();
    // A file that grows while it is read stops at the limit, and fails to parse.
    f.by_ref()
        .take(MAX_SETTINGS_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(fail)?;
    Ok(text)
}

/// A new directory under the temporary directory that only this user may enter, named
/// `PREFIX-PID-N` (never one that already exists, so nobody can have prepared it).
pub fn private_dir(prefix: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    for attempt in 0..64u32 {
        let dir = base.join(format!("{prefix}-{}-{attempt}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_regular_file_of_sane_size_is_read() {
        let dir = std::env::temp_dir().join(format!("bulkhead-hostfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let small = dir.join("small.json");
        std::fs::write(&small, "{}").unwrap();
        assert_eq!(read_settings(&small).unwrap(), "{}");
        let big = dir.join("big.json");
        std::fs::write(&big, vec![b' '; MAX_SETTINGS_BYTES as usize + 1]).unwrap();
        assert!(read_settings(&big)
            .unwrap_err()
            .to_string()
            .contains("more than"));
        assert!(matches!(
            read_settings(&dir),
            Err(HostFileError::NotRegular { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
