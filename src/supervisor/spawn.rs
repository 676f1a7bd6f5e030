//! Starting the VM process: a fork of the supervisor, made while it is still single-threaded,
//! that goes straight on to build the VM.
//!
//! Why a fork and not an exec of this binary: the exec, the dynamic loader and a second
//! runtime start-up cost about half a millisecond more on every VM start, and the handover
//! needed serialised settings and fixed descriptors. What a fresh exec would add, a new
//! address-space layout, matters little here: the supervisor never trusts a pointer, length or
//! index from the VM process (it reads atomics and checks every value), so knowing its layout
//! gives a compromised VM process nothing to aim at. The child keeps only what it needs: the
//! shared mapping of the telemetry region, the wake eventfd, the console file and stdio; every
//! other inherited descriptor is closed before it touches anything, and the kernel kills it if
//! the supervisor dies (PR_SET_PDEATHSIG).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::telemetry::{Region, RegionError};

/// Where the VM process finds the console file and the wake eventfd; every descriptor above
/// these is closed.
const CONSOLE_FD: RawFd = 3;
const WAKE_FD: RawFd = 4;

/// Errors starting the VM process.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error("cannot create the wake eventfd: {0}")]
    Wake(#[source] std::io::Error),
    #[error("cannot start the VM process: {0}")]
    Fork(#[source] std::io::Error),
}

/// The running VM process, as the supervisor holds it.
pub struct VmProcess {
    pub pid: libc::pid_t,
    pub region: Region,
    /// Written by the VM process when it posts events; read by the supervisor.
    pub wake: EventFd,
}

/// Forks the VM process, which builds and runs the VM `config` describes and exits with its
/// status. `console` is the console file, when the console is a file.
///
/// Must be called while the supervisor has no thread but this one: a fork copies only the
/// calling thread, and a lock another thread held would stay held in the child forever.
pub fn spawn(
    config: &VmConfig,
    start_ns: u64,
    console: Option<&File>,
) -> Result<VmProcess, SpawnError> {
    let (region, _memfd) = Region::create()?;
    let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(SpawnError::Wake)?;
    let console_fd = console.map(AsRawFd::as_raw_fd);
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the process is single-threaded here (see above), so the child may go on running
    // ordinary code; fork has no memory effects on this process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(SpawnError::Fork(std::io::Error::last_os_error()));
    }
    if pid == 0 {
        let status = match become_vm_process(parent, console_fd, wake.as_raw_fd()) {
            Ok((console, wake)) => crate::vmproc::run(config, start_ns, region, wake, console),
            Err(e) => {
                log::error!("VM process: {e}");
                crate::exit::status::RUNTIME_ERROR
            }
        };
        std::process::exit(status);
    }
    Ok(VmProcess { pid, region, wake })
}

/// In the child: dies with the supervisor, restores the signal mask, and keeps only the
/// descriptors it needs (stdio, the console file and the wake eventfd, moved to 3 and 4).
fn become_vm_process(
    parent: libc::pid_t,
    console: Option<RawFd>,
    wake: RawFd,
) -> std::io::Result<(Option<File>, EventFd)> {
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    // SAFETY: prctl, getppid, pthread_sigmask and signal with valid arguments; `empty` is a
    // valid sigset_t owned by this frame.
    unsafe {
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
        if libc::getppid() != parent {
            // The supervisor died before the line above took effect.
            libc::_exit(crate::exit::status::RUNTIME_ERROR);
        }
        // The supervisor blocked the signals it reads through its signalfd.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // Ctrl-C and a hang-up reach the whole process group; the supervisor decides what
        // they mean (an orderly stop), so the VM process does not die of them first.
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    crate::signal::install_sigsys_reporter(crate::signal::SigsysReporter::VmProcess)?;
    // Move the two descriptors the VM process keeps out of the way of each other, then close
    // everything above them: the supervisor's signalfd, the region's memfd (the mapping stays),
    // its metrics and alert files.
    // SAFETY: fcntl and dup2 on descriptors this process owns.
    let wake_high = check(unsafe { libc::fcntl(wake, libc::F_DUPFD, 10) })?;
    let console_high = match console {
        // SAFETY: as above.
        Some(fd) => Some(check(unsafe { libc::fcntl(fd, libc::F_DUPFD, 10) })?),
        None => None,
    };
    match console_high {
        // SAFETY: as above.
        Some(fd) => check(unsafe { libc::dup2(fd, CONSOLE_FD) })?,
        // SAFETY: closing a descriptor this process no longer needs, whatever it is.
        None => unsafe { libc::close(CONSOLE_FD) },
    };
    // SAFETY: as above.
    check(unsafe { libc::dup2(wake_high, WAKE_FD) })?;
    // SAFETY: close_range closes descriptors only; nothing in this process uses the ones above
    // WAKE_FD any more.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, WAKE_FD + 1, u32::MAX, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just placed for this process alone.
    let console = console_high.map(|_| unsafe { File::from_raw_fd(CONSOLE_FD) });
    // SAFETY: as above.
    let wake = unsafe { EventFd::from_raw_fd(WAKE_FD) };
    Ok((console, wake))
}
