//! Starting the VM process: a fresh exec of this binary (new address space, new ASLR layout),
//! with the telemetry region, the wake eventfd, the setup and the console at fixed
//! descriptors, and the kernel's promise to kill it if the supervisor dies.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::telemetry::{Region, RegionError};
use crate::vmproc::{Setup, CONSOLE_FD, SETUP_FD, TELEMETRY_FD, WAKE_FD};

/// Errors starting the VM process.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error("cannot create {what}: {source}")]
    Fd {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the VM process: {0}")]
    Start(#[source] std::io::Error),
    #[error("cannot encode the VM's settings (a path that is not UTF-8?): {0}")]
    Encode(#[source] serde_json::Error),
}

/// The running VM process, as the supervisor holds it.
pub struct VmProcess {
    pub child: Child,
    pub region: Region,
    /// Written by the VM process when it posts events; read by the supervisor.
    pub wake: EventFd,
}

/// A copy of `fd` numbered 10 or above, close-on-exec, so the child's dup2 to 3..6 can not
/// overwrite a descriptor it still has to copy.
fn high(fd: RawFd, what: &'static str) -> Result<OwnedFd, SpawnError> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor and touches no memory.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
    if new < 0 {
        return Err(SpawnError::Fd {
            what,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `new` was just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Starts `bulkhead vm-process` for `config`. `console` is the console file the supervisor
/// opened, if the console is a file.
pub fn spawn(
    config: &VmConfig,
    start_ns: u64,
    console: Option<&File>,
    log_level: log::LevelFilter,
) -> Result<VmProcess, SpawnError> {
    let (region, memfd) = Region::create()?;
    let wake =
        EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| SpawnError::Fd {
            what: "the wake eventfd",
            source,
        })?;
    let mut pipe = [0; 2];
    // SAFETY: `pipe` has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(SpawnError::Fd {
            what: "the setup pipe",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: both ends were just created and belong to us alone.
    let (setup_r, setup_w) = unsafe { (OwnedFd::from_raw_fd(pipe[0]), File::from_raw_fd(pipe[1])) };

    let handed: Vec<(OwnedFd, RawFd)> = {
        let mut v = vec![
            (high(setup_r.as_raw_fd(), "the setup pipe")?, SETUP_FD),
            (high(memfd.as_raw_fd(), "the telemetry fd")?, TELEMETRY_FD),
            (high(wake.as_raw_fd(), "the wake eventfd")?, WAKE_FD),
        ];
        if let Some(file) = console {
            v.push((high(file.as_raw_fd(), "the console fd")?, CONSOLE_FD));
        }
        v
    };
    drop(setup_r);
    let moves: Vec<(RawFd, RawFd)> = handed
        .iter()
        .map(|(fd, to)| (fd.as_raw_fd(), *to))
        .collect();
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };

    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg("--log-level")
        .arg(level_name(log_level))
        .arg("vm-process");
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (dup2, prctl, getppid, _exit) on integers it owns.
    unsafe {
        cmd.pre_exec(move || {
            for &(from, to) in &moves {
                // dup2 leaves the new descriptor open across exec.
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // The VM process must not outlive its supervisor, even a killed one.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(SpawnError::Start)?;
    drop(handed);

    let setup = Setup {
        config: config.clone(),
        start_ns,
        console_fd: console.is_some(),
    };
    let text = serde_json::to_vec(&setup).map_err(SpawnError::Encode)?;
    let mut setup_w = setup_w;
    // A VM process that died at once makes this fail with EPIPE; the watch loop reports
    // how it ended.
    if let Err(e) = setup_w.write_all(&text) {
        log::debug!("handing over the setup: {e}");
    }
    drop(setup_w);
    Ok(VmProcess {
        child,
        region,
        wake,
    })
}

fn level_name(level: log::LevelFilter) -> &'static str {
    match level {
        log::LevelFilter::Off | log::LevelFilter::Error => "error",
        log::LevelFilter::Warn => "warn",
        log::LevelFilter::Info => "info",
        log::LevelFilter::Debug => "debug",
        log::LevelFilter::Trace => "trace",
    }
}
