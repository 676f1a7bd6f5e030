//! The VM process: `bulkhead run`'s inner process, started by the supervisor (as
//! `bulkhead vm-process`), which builds and runs one VM under its seccomp filters.
//!
//! It finds what the supervisor handed it at fixed descriptors: the setup (settings as JSON)
//! on [`SETUP_FD`], the telemetry region on [`TELEMETRY_FD`], the eventfd that wakes the
//! supervisor on [`WAKE_FD`], and an opened console file on [`CONSOLE_FD`]. It reports how the
//! VM ended in the region's exit record and by its exit status.

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::builder::{build_vm, BuildEnv};
use crate::config::VmConfig;
use crate::exit::{status, VmExitReason};
use crate::signal;
use crate::telemetry::{Region, Reporter};

pub const SETUP_FD: RawFd = 3;
pub const TELEMETRY_FD: RawFd = 4;
pub const WAKE_FD: RawFd = 5;
pub const CONSOLE_FD: RawFd = 6;

/// The largest setup message accepted: a config with every device at the longest paths is a
/// few tens of KiB.
const MAX_SETUP: u64 = 1 << 20;

/// What the supervisor hands over besides descriptors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Setup {
    pub config: VmConfig,
    /// CLOCK_MONOTONIC nanoseconds when `bulkhead run` started.
    pub start_ns: u64,
    /// True when [`CONSOLE_FD`] holds the console file.
    pub console_fd: bool,
}

/// Errors taking over what the supervisor handed down.
#[derive(Debug, thiserror::Error)]
pub enum VmProcessError {
    #[error("cannot read the setup from the supervisor: {0}")]
    ReadSetup(#[source] std::io::Error),
    #[error("the supervisor's setup is malformed: {0}")]
    Setup(#[source] serde_json::Error),
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::RegionError),
    #[error("cannot harden the VM process: {0}")]
    Harden(#[source] std::io::Error),
}

/// Makes the VM process leave no core dump (it would hold guest memory and secrets) and
/// refuse ptrace by other processes of the same user.
fn harden() -> Result<(), VmProcessError> {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a valid struct; prctl with constant arguments.
    let ok = unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &no_core) == 0
            && libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(VmProcessError::Harden(std::io::Error::last_os_error()))
    }
}

/// Takes ownership of descriptor `fd`, handed down by the supervisor.
fn inherited(fd: RawFd) -> File {
    // SAFETY: the supervisor placed these descriptors for this process alone, and each is
    // taken once.
    unsafe { File::from_raw_fd(fd) }
}

fn take_over() -> Result<(Setup, Reporter, Option<File>), VmProcessError> {
    let mut text = String::new();
    inherited(SETUP_FD)
        .take(MAX_SETUP)
        .read_to_string(&mut text)
        .map_err(VmProcessError::ReadSetup)?;
    let setup: Setup = serde_json::from_str(&text).map_err(VmProcessError::Setup)?;
    let region = Region::attach(TELEMETRY_FD)?;
    // The mapping stays; the descriptor is not needed any more.
    drop(inherited(TELEMETRY_FD));
    // SAFETY: WAKE_FD is the supervisor's eventfd, handed to this process alone.
    let wake = unsafe { EventFd::from_raw_fd(WAKE_FD) };
    let console = setup.console_fd.then(|| inherited(CONSOLE_FD));
    let region = Arc::new(region);
    signal::set_telemetry(region.as_ptr());
    Ok((setup, Reporter::new(region, Some(wake)), console))
}

/// Runs the VM process and returns its exit status.
pub fn main() -> i32 {
    let (setup, reporter, console_file) = match harden().and_then(|()| take_over()) {
        Ok(parts) => parts,
        Err(e) => {
            log::error!("VM process: {e}");
            return status::RUNTIME_ERROR;
        }
    };
    // SIGTERM from the supervisor ends the VM in order (the console flushed) rather than at
    // once; every thread started from here on inherits the block.
    let stop = match signal::signalfd(&[libc::SIGTERM]) {
        Ok(fd) => fd,
        Err(e) => {
            log::error!("VM process: cannot watch for SIGTERM: {e}");
            return status::RUNTIME_ERROR;
        }
    };
    let config = setup.config;
    let region = reporter.region_arc().clone();
    let env = BuildEnv {
        reporter,
        console_file,
        start_ns: setup.start_ns,
    };
    let vmm = match build_vm(&config, env) {
        Ok(vmm) => vmm,
        Err(e) => {
            log::error!("{}", crate::error_chain(&e));
            return if e.is_bad_input() {
                status::BAD_INPUT
            } else {
                status::RUNTIME_ERROR
            };
        }
    };
    match vmm.run(Some(stop)) {
        Ok(outcome) => {
            let (kind, a, b) = outcome.reason.to_record();
            region.exit.write(kind, a, b);
            // The record carries no text: details only this process knows are logged here.
            if matches!(
                outcome.reason,
                VmExitReason::UnhandledExit { .. } | VmExitReason::VcpuFailed { .. }
            ) {
                log::error!("VM {}: {}", config.vm_id, outcome.reason);
            }
            outcome.reason.status()
        }
        Err(e) => {
            log::error!("{}", crate::error_chain(&e));
            status::RUNTIME_ERROR
        }
    }
}
