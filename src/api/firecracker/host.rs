//! The personality's first process, the one the orchestrator started: the VM's host.
//!
//! Kata Containers places and pins vCPU threads by reading `/proc/PID/task/*/comm` of the pid
//! it launched (or the jailer's, which execs into this program and keeps its pid), looking for
//! `fc_vcpu N`. So that process must be the VM process. At start it forks the API front end
//! (everything else the personality does, its supervisor included) and waits, single-threaded,
//! on a hand-over socket. At InstanceStart the front end starts `bulkhead run`, which hands it
//! the VM's descriptors (see [`crate::handover`]) instead of forking a VM process; this
//! process reads the settings the front end wrote and becomes the VM process. The supervisor
//! stays outside it and watches it through the alive pipe; the VM ends at once should the
//! supervisor die (its life pipe hangs up), since no death signal ties a process to a
//! grandchild.
//!
//! Signals: a SIGTERM before the VM starts goes on to the front end (which ends with 143); after
//! it, it stops the VM in order, as a SIGTERM to a VM process does. Either way this process
//! exits with the status `bulkhead run` (or, without a VM, the front end) ended with. A
//! SIGKILL ends the VM at once; the front end's death signal is SIGTERM, so it ends its
//! supervisor (whose own death signal is SIGKILL) and removes its working directory before it
//! exits: a Firecracker killed by its orchestrator leaves nothing behind.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::Path;

use crate::config::{host_mem_mib, RawConfig, VmConfig};
use crate::exit::status;
use crate::handover::{self, HandoverError};
use crate::signal;

/// Which side of the split this process is.
pub enum Split {
    /// The front end: go on serving the API; the socket reaches the host process.
    FrontEnd(UnixDatagram),
    /// The host process, once its VM (or its front end) ended: exit with this status.
    HostEnded(i32),
}

/// Forks the front end. Returns in both processes; the host's return comes when all is over.
/// Must be called while this process has a single thread (no runtime yet).
pub fn split(work: &Path, no_seccomp: bool) -> Split {
    let (host_end, front_end) = match crate::broker::pair() {
        Ok(pair) => pair,
        Err(e) => {
            log::error!("cannot make the hand-over socket: {e}");
            return Split::HostEnded(status::RUNTIME_ERROR);
        }
    };
    // SAFETY: getpid has no preconditions.
    let host = unsafe { libc::getpid() };
    // SAFETY: the process is single-threaded here (see above), so the child may go on running
    // ordinary code.
    let child = unsafe { libc::fork() };
    if child < 0 {
        log::error!(
            "cannot start the API front end: {}",
            std::io::Error::last_os_error()
        );
        return Split::HostEnded(status::RUNTIME_ERROR);
    }
    if child == 0 {
        drop(host_end);
        // Until the front end watches SIGTERM (`server`), one sent to it, its death signal
        // included, waits: its default action would end it without removing `work`.
        signal::block(&[libc::SIGTERM]);
        // SAFETY: prctl with integer arguments; getppid and _exit have no preconditions.
        unsafe {
            // SIGTERM, not SIGKILL: the front end then ends the way a SIGTERM ends it (its
            // supervisor stopped, its working directory removed) instead of leaving its
            // settings and outputs behind in the temporary directory for good.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0
                || libc::getppid() != host
            {
                // The host died before the death signal was set: nobody else removes its
                // working directory.
                let _ = std::fs::remove_dir_all(work);
                libc::_exit(status::RUNTIME_ERROR);
            }
        }
        return Split::FrontEnd(front_end);
    }
    drop(front_end);
    Split::HostEnded(host_run(child, host_end, work, no_seccomp))
}

/// The host's life: waits for the hand-over (forwarding SIGTERM to the front end meanwhile),
/// then runs the VM; or, when the front end ends without one, ends with its status.
fn host_run(front_end: libc::pid_t, socket: UnixDatagram, work: &Path, no_seccomp: bool) -> i32 {
    let term = match signal::signalfd(&[libc::SIGTERM]) {
        Ok(fd) => fd,
        Err(e) => {
            log::error!("cannot watch SIGTERM: {e}");
            return status::RUNTIME_ERROR;
        }
    };
    wait_readable(&socket, &term, front_end);
    // SIGTERM stays blocked: one that comes from here on waits for the VM's own signalfd.
    drop(term);
    match handover::receive(&socket) {
        Ok(parts) => match load_config(work, no_seccomp) {
            Ok(config) => crate::vmproc::run_handed(&config, parts, socket),
            Err(e) => {
                // Dropping the parts hangs up the alive pipe: the supervisor ends the VM.
                log::error!("the VM's host process: {e}");
                status::BAD_INPUT
            }
        },
        Err(HandoverError::Closed) => crate::process::reap(front_end),
        Err(e) => {
            log::error!("the VM's host process: {}", crate::error_chain(&e));
            crate::process::reap(front_end)
        }
    }
}

/// Blocks until `socket` has something (or hung up), passing each SIGTERM on to `front_end`.
fn wait_readable(socket: &UnixDatagram, term: &OwnedFd, front_end: libc::pid_t) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: term.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfd structs for the kernel to fill.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            continue;
        }
        let [sock, sig] = fds;
        if sig.revents & libc::POLLIN != 0 {
            while signal::read_signal(term).is_some() {
                // Our own child, not yet reaped (it is reaped only below).
                let _ = crate::process::signal(front_end, libc::SIGTERM);
            }
        }
        if sock.revents != 0 {
            return;
        }
    }
}

/// Errors reading the VM's settings in the host process.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot read the VM's settings: {0}")]
    Read(#[from] crate::hostfile::HostFileError),
    #[error(transparent)]
    Restore(#[from] crate::snapshot::RestoreSettingsError),
    #[error("the VM's settings {path}: {source}")]
    Config {
        path: String,
        #[source]
        source: crate::config::ConfigError,
    },
}

/// The settings the front end wrote for `bulkhead run` (which read and validated the same
/// file before it handed the VM over), with the command line's `--no-seccomp`.
fn load_config(work: &Path, no_seccomp: bool) -> Result<VmConfig, HostError> {
    let path = work.join("config.json");
    let shown = path.display().to_string();
    let text = crate::hostfile::read_settings(&path)?;
    let config = |source| HostError::Config {
        path: shown.clone(),
        source,
    };
    let file = RawConfig::from_json(&text).map_err(config)?;
    let flags = RawConfig {
        seccomp: no_seccomp.then_some(false),
        ..RawConfig::default()
    };
    let raw = crate::snapshot::restore_settings(file.overlay(flags))?;
    VmConfig::from_raw(raw, host_mem_mib()).map_err(config)
}
