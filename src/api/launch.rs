//! Starting a `bulkhead run` supervisor from a front end, and knowing when it ends: the one
//! way `bulkhead serve` (a jailed supervisor per VM) and the Firecracker personality (the
//! supervisor that hands its VM over) do it. The supervisor is this binary, given its settings
//! file; a front end never builds a VM itself.
//!
//! The end is watched through a pidfd (readable once the process has exited), so an async
//! front end awaits it without a thread per VM and without a SIGCHLD handler; the reaping is a
//! plain `waitpid` of that one pid.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;

use tokio::io::unix::AsyncFd;

use crate::process;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start the supervisor {}: {source}", exe.display())]
    Spawn {
        exe: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot fork a supervisor: {0}")]
    Fork(#[source] std::io::Error),
    #[error("cannot watch supervisor {pid}: {source}")]
    Watch {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
}

/// How to start one supervisor.
pub struct Launch<'a> {
    /// This program.
    pub exe: &'a Path,
    /// The settings file `bulkhead run --config` reads.
    pub config: &'a Path,
    /// `--log-level`, when not the default.
    pub log_level: Option<&'static str>,
    /// `--no-seccomp`: the operator turned the filters off on the front end's command line
    /// (a settings file alone can not).
    pub no_seccomp: bool,
    /// Descriptors the supervisor gets at fixed numbers: (this process's, the supervisor's).
    pub inherit: Vec<(RawFd, RawFd)>,
    /// Where its standard output and error go (standard input is then /dev/null); this
    /// process's own stdio when None.
    pub output: Option<File>,
    /// In a process group of its own, so a signal meant for the front end's group (Ctrl-C, a
    /// stop of its unit with KillMode=process) does not reach it: the daemon's supervisors
    /// outlive a daemon restart.
    pub own_group: bool,
    /// Killed when this process dies (PR_SET_PDEATHSIG): the personality's supervisor does
    /// not outlive the front end that holds its control channel.
    pub dies_with_us: bool,
}

/// A supervisor this process started and has not reaped yet.
#[derive(Debug)]
pub struct Supervisor {
    pid: i32,
    /// Readable once the supervisor has exited.
    pidfd: OwnedFd,
}

impl Supervisor {
    pub fn start(launch: Launch<'_>) -> Result<Supervisor, LaunchError> {
        let mut cmd = std::process::Command::new(launch.exe);
        // Named bulkhead, whatever this binary is called: invoked as `firecracker` it would
        // be the personality again.
        cmd.arg0("bulkhead");
        if let Some(level) = launch.log_level {
            cmd.args(["--log-level", level]);
        }
        cmd.args(["run", "--config"]).arg(launch.config);
        if launch.no_seccomp {
            cmd.arg("--no-seccomp");
        }
        if let Some(out) = launch.output {
            // Its own output, and no input. Without one, all three are the front end's (the
            // personality's: in a jailer's chroot there may be no /dev/null to open).
            cmd.stdin(Stdio::null());
            let err = out.try_clone().map_err(|source| LaunchError::Spawn {
                exe: launch.exe.to_path_buf(),
                source,
            })?;
            cmd.stdout(out).stderr(err);
        }
        if launch.own_group {
            cmd.process_group(0);
        }
        let inherit = launch.inherit;
        // The child moves them through a fixed array: it may not allocate.
        debug_assert!(inherit.len() <= 8, "{} descriptors to pass", inherit.len());
        let dies_with_us = launch.dies_with_us;
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the closure runs in the forked child before exec and calls only fcntl, dup2,
        // prctl, getppid and _exit (through place_descriptors and die_with), which are
        // async-signal-safe, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                place_descriptors(&inherit)?;
                if dies_with_us {
                    die_with(parent)?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            exe: launch.exe.to_path_buf(),
            source,
        })?;
        // The std handle is dropped without waiting: the pid is reaped here, by `reap`.
        let pid = i32::try_from(child.id()).unwrap_or(-1);
        drop(child);
        Self::watch(pid)
    }

    /// Starts a supervisor for `settings` in a child of this process, without exec: it shares
    /// this process's pages copy-on-write (the binary's relocated data, the heap) instead of
    /// starting the program again and parsing a settings file, and it is running sooner.
    /// The child dies with this process (PR_SET_PDEATHSIG), keeps standard input, output and
    /// error, gets `inherit`'s descriptors at their numbers and no other descriptor.
    ///
    /// Only a process with one thread may do this: a fork copies the calling thread alone, and
    /// a lock another thread held would stay held in the child. None when this process has
    /// more; the caller starts one with [`Supervisor::start`] then.
    pub fn fork(
        settings: crate::RawConfig,
        inherit: &[(RawFd, RawFd)],
    ) -> Result<Option<Supervisor>, LaunchError> {
        if !single_threaded() {
            return Ok(None);
        }
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: this process has one thread (checked above; it starts none in between), so
        // the child may go on running ordinary code; fork has no memory effects here.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(LaunchError::Fork(std::io::Error::last_os_error()));
        }
        if pid == 0 {
            // The child never returns into the front end's code: the supervisor's status is
            // its exit status, a panic a runtime error.
            let status = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                forked_supervisor(parent, settings, inherit)
            }))
            .unwrap_or(crate::exit::status::RUNTIME_ERROR);
            // SAFETY: _exit ends this child at once, running none of the front end's exit
            // handlers or destructors (its runtime and sockets are the parent's).
            unsafe { libc::_exit(status) };
        }
        Self::watch(pid).map(Some)
    }

    /// Watches a child this process just started, through a pidfd.
    fn watch(pid: i32) -> Result<Supervisor, LaunchError> {
        // SAFETY: pidfd_open with an integer pid and no flags; the result is checked.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let Ok(fd) =
            RawFd::try_from(fd).map_err(|_| ()).and_then(
                |fd| {
                    if fd >= 0 {
                        Ok(fd)
                    } else {
                        Err(())
                    }
                },
            )
        else {
            let source = std::io::Error::last_os_error();
            process::kill_and_reap(pid);
            return Err(LaunchError::Watch { pid, source });
        };
        // SAFETY: pidfd_open returned a new descriptor this process now owns alone.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Supervisor { pid, pidfd })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Its exit status, once it has ended (it is then reaped); None while it runs.
    pub fn try_reap(&self) -> Option<i32> {
        process::try_reap(self.pid)
    }

    /// Waits (without blocking the runtime) until the supervisor ends; returns its exit status
    /// as a shell shows it. Reaps it.
    pub async fn ended(self) -> i32 {
        let pid = self.pid;
        // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it open and unchanged
        // until it is dropped.
        let registered =
            unsafe { AsyncFd::register_with_interest(self.pidfd, tokio::io::Interest::READABLE) };
        match registered {
            Ok(fd) => {
                // Readable once the process has exited; it stays readable.
                let _ = fd.readable().await;
                drop(fd);
                process::reap(pid)
            }
            Err(e) => {
                log::warn!("supervisor {pid}: cannot watch its pidfd ({e}); waiting for it");
                tokio::task::spawn_blocking(move || process::reap(pid))
                    .await
                    .unwrap_or(crate::exit::status::RUNTIME_ERROR)
            }
        }
    }

    /// Kills and reaps it.
    pub fn kill(self) {
        process::kill_and_reap(self.pid);
    }
}

/// Moves each (from, to) descriptor to `to`, every source out of the way first (to 10 and up,
/// close-on-exec): one may sit at another's target. dup2 makes the targets survive exec.
/// Async-signal-safe and allocation-free (it runs between fork and exec).
fn place_descriptors(inherit: &[(RawFd, RawFd)]) -> std::io::Result<()> {
    let mut moved = [-1; 8];
    if inherit.len() > moved.len() {
        return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
    }
    for (slot, (from, _)) in moved.iter_mut().zip(inherit) {
        // SAFETY: fcntl on a descriptor number; the result is checked.
        *slot = unsafe { libc::fcntl(*from, libc::F_DUPFD_CLOEXEC, 10) };
        if *slot < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    for (copy, (_, to)) in moved.iter().zip(inherit) {
        // SAFETY: dup2 between descriptor numbers; the result is checked.
        if unsafe { libc::dup2(*copy, *to) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Has this (child) process killed when `parent` dies; ends it at once if `parent` already
/// did. Async-signal-safe.
fn die_with(parent: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments; getppid and _exit have no preconditions.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The front end died before the death signal was set.
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
    Ok(())
}

/// Whether this process has one thread (the caller's).
fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|tasks| tasks.count() == 1)
}

/// The child [`Supervisor::fork`] made: set up as an exec'd `bulkhead run` would find itself
/// (its descriptors and no others, default signal handlers), then the supervisor.
fn forked_supervisor(
    parent: libc::pid_t,
    settings: crate::RawConfig,
    inherit: &[(RawFd, RawFd)],
) -> i32 {
    let start_ns = crate::telemetry::monotonic_ns();
    if let Err(e) = die_with(parent).and_then(|()| place_descriptors(inherit)) {
        log::error!("the supervisor's descriptors: {e}");
        return crate::exit::status::RUNTIME_ERROR;
    }
    // Every other descriptor the front end had (its API socket, its runtime's) is closed, as
    // close-on-exec would have; standard input, output and error stay.
    let keep: Vec<RawFd> = inherit.iter().map(|(_, to)| *to).collect();
    let top = keep.iter().copied().max().unwrap_or(2).max(2);
    for fd in 3..top {
        if !keep.contains(&fd) {
            // SAFETY: closing a descriptor number this child does not use.
            unsafe { libc::close(fd) };
        }
    }
    close_above(top);
    // A signal the front end catches (its runtime catches SIGTERM and SIGCHLD) goes back to its
    // default action, as exec would have done; one it ignores stays ignored.
    for signal in 1..libc::SIGRTMIN() {
        // SAFETY: sigaction is plain data (all-zero is a valid value), and sigaction with a
        // null new action only reads the current one into it.
        let (read, old) = unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            (libc::sigaction(signal, std::ptr::null(), &mut old), old)
        };
        let caught =
            read == 0 && old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN;
        if caught {
            // SAFETY: signal with a valid signal number and SIG_DFL.
            unsafe { libc::signal(signal, libc::SIG_DFL) };
        }
    }
    crate::supervisor::run_settings(settings, start_ns)
}

/// Closes every descriptor above `top`: close_range, or where the kernel (or a container's
/// filter) refuses it, each one /proc/self/fd lists.
fn close_above(top: RawFd) {
    let first = libc::c_uint::try_from(top + 1).unwrap_or(3);
    // SAFETY: close_range on numbers above every kept one; no flags.
    if unsafe { libc::syscall(libc::SYS_close_range, first, libc::c_uint::MAX, 0) } == 0 {
        return;
    }
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > top)
        .collect();
    for fd in open {
        // SAFETY: closing a descriptor number above every kept one (the listing's own is
        // closed already, and closing it again only fails).
        unsafe { libc::close(fd) };
    }
}
