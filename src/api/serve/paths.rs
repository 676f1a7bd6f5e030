//! The files a tenant names for a VM (kernel, initrd, disks), checked the way the tenant would
//! meet them: on a thread of its own that takes the caller's credentials (uid, primary group,
//! supplementary groups), so the kernel's own permission rules decide, and never as root. The
//! path is resolved as that user, must lie in the tenant's directories as written and once
//! resolved, and is then opened (read-only, or read-write for a writable disk) following no
//! symlink, non-blocking: a FIFO or device answers at once and is refused by its type.
//!
//! A path that does not answer within [`DEADLINE`] (a hung network or FUSE mount in the
//! tenant's directory) is refused, and its thread is left to finish alone: a tenant may have at
//! most [`MAX_PENDING`] such checks outstanding, so it can not pile up threads, and nobody else
//! waits on them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::config::serve::Tenant;
use crate::jail::dirs;
use crate::jail::privileges::{become_user_on_this_thread, User};

/// How long a path may take to resolve and open.
pub const DEADLINE: Duration = Duration::from_secs(2);
/// Checks of one tenant that may be outstanding at once (those past their deadline included).
pub const MAX_PENDING: usize = 4;

/// A file the tenant may use: where it is once resolved, and which file it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usable {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
}

/// What checking a path came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Usable(Usable),
    /// Outside the tenant's directories, missing, not its to use, or not a file of the kind
    /// asked for: one answer for all, so nothing outside the directories is revealed.
    Refused,
    /// The path did not answer within [`DEADLINE`].
    TooSlow,
    /// The tenant already has [`MAX_PENDING`] checks outstanding.
    Busy,
}

/// What the file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// A kernel or an initrd: a regular file, read.
    Boot,
    /// A disk: a regular file or a block device, read, and written unless read-only.
    Disk { write: bool },
}

/// Checks `path` for `tenant`, as `user`. `pending` counts the tenant's outstanding checks.
pub fn check(
    tenant: &Tenant,
    user: &User,
    path: &Path,
    what: Use,
    pending: &Arc<AtomicUsize>,
) -> Verdict {
    if !tenant.allows(path) {
        return Verdict::Refused;
    }
    if pending.fetch_add(1, Ordering::AcqRel) >= MAX_PENDING {
        pending.fetch_sub(1, Ordering::AcqRel);
        return Verdict::Busy;
    }
    let (tx, rx) = mpsc::channel();
    let job = (tenant.clone(), user.clone(), path.to_path_buf());
    let counter = pending.clone();
    let started = std::thread::Builder::new()
        .name("path-check".into())
        .spawn(move || {
            let (tenant, user, path) = job;
            // This thread takes the user's credentials for good and ends after this check.
            let found = become_user_on_this_thread(&user)
                .ok()
                .and_then(|()| resolve(&tenant, &path, what));
            counter.fetch_sub(1, Ordering::AcqRel);
            let _ = tx.send(found);
        });
    if started.is_err() {
        pending.fetch_sub(1, Ordering::AcqRel);
        return Verdict::Busy;
    }
    match rx.recv_timeout(DEADLINE) {
        Ok(Some(usable)) => Verdict::Usable(usable),
        Ok(None) => Verdict::Refused,
        Err(mpsc::RecvTimeoutError::Timeout) => Verdict::TooSlow,
        Err(mpsc::RecvTimeoutError::Disconnected) => Verdict::Refused,
    }
}

/// On the checking thread, as the user: resolve, check the place, open, check the kind.
fn resolve(tenant: &Tenant, path: &Path, what: Use) -> Option<Usable> {
    let real = std::fs::canonicalize(path).ok()?;
    if !tenant.allows(&real) {
        return None;
    }
    let access = match what {
        Use::Disk { write: true } => libc::O_RDWR,
        _ => libc::O_RDONLY,
    };
    let flags = access | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    let fd = dirs::open_absolute(&real, flags).ok()?;
    let st = dirs::stat(&fd).ok()?;
    let kind = st.st_mode & libc::S_IFMT;
    let fits = kind == libc::S_IFREG || (kind == libc::S_IFBLK && matches!(what, Use::Disk { .. }));
    let (dev, ino) = dirs::identity(&st);
    fits.then_some(Usable {
        path: real,
        dev,
        ino,
    })
}
