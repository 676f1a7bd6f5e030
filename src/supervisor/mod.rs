//! The supervisor: `bulkhead run`'s outer process. It holds the outputs, forks the VM
//! process, confines itself with a seccomp filter of its own, then watches: it turns what the
//! VM process reports (untrusted) and what the kernel tells it into metrics and alerts, ends
//! the VM on a time limit or a stop-vm response, and reports how the VM ended.
//!
//! It never touches guest input: it reads only the telemetry region, whose every value it
//! checks, and the VM process's wait status.

mod ending;
mod http;
mod outputs;
mod shares;
mod spawn;
mod terminal;
mod watch;

use std::time::SystemTime;

pub use ending::EXIT_SECCOMP_VIOLATION;
pub use ending::{StopCause, VmEnd};
pub use outputs::{write_initial_metrics, OutputError};

use crate::broker::{self, BrokerServer};
use crate::config::VmConfig;
use crate::exit::status;
use crate::jail::VmJail;
use crate::seccomp::{self, ThreadRole};
use crate::signal;
use crate::telemetry::{AlertContext, Engine, Limits, Region};
use outputs::Outputs;
use terminal::SavedTerminal;
use watch::Watch;

/// Why settings a front end handed over make no VM.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    Restore(#[from] crate::snapshot::RestoreSettingsError),
    #[error(transparent)]
    Invalid(#[from] crate::ConfigError),
}

/// Runs one VM under supervision and returns `bulkhead run`'s exit status.
pub fn run(config: &VmConfig) -> i32 {
    run_from(config, crate::logger::process_start_ns())
}

/// [`run`] for settings a front end holds (a snapshot's, when they name one, filled in as
/// `bulkhead run` does), in a process the front end forked for it: the VM's timings count
/// from `start_ns` (CLOCK_MONOTONIC), not from the front end's own start.
pub fn run_settings(raw: crate::RawConfig, start_ns: u64) -> i32 {
    let config = crate::snapshot::restore_settings(raw)
        .map_err(SettingsError::from)
        .and_then(|raw| Ok(VmConfig::from_raw(raw, crate::config::host_mem_mib())?));
    match config {
        Ok(config) => run_from(&config, start_ns),
        Err(e) => {
            log::error!("{e}");
            status::BAD_INPUT
        }
    }
}

fn run_from(config: &VmConfig, start_ns: u64) -> i32 {
    if !config.process.seccomp {
        log::warn!("*** --no-seccomp: seccomp filters are OFF; this VMM is not confined. Debugging only. ***");
    }
    let start_wall = SystemTime::now();
    if let Err(e) = signal::install_sigsys_reporter(signal::SigsysReporter::Supervisor) {
        log::error!("cannot install the SIGSYS reporter: {e}");
        return status::RUNTIME_ERROR;
    }
    signal::set_thread_name(ThreadRole::Supervisor.name());
    let mut outputs = match Outputs::open(config) {
        Ok(o) => o,
        Err(e) => {
            log::error!("{}", crate::error_chain(&e));
            return status::BAD_INPUT;
        }
    };
    let terminal = SavedTerminal::save(libc::STDIN_FILENO, &config.vm.console);
    // Blocked before the VM process starts, so none is missed; the child's mask is reset.
    let signals =
        match signal::signalfd(&[libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP]) {
            Ok(fd) => fd,
            Err(e) => {
                log::error!("cannot watch signals: {e}");
                return status::RUNTIME_ERROR;
            }
        };
    let mut jail = match config
        .process
        .jail
        .as_ref()
        .map(|j| VmJail::prepare(config, j))
    {
        None => None,
        Some(Ok(jail)) => {
            announce(&jail);
            Some(jail)
        }
        Some(Err(e)) => {
            log::error!("VM {}: {}", config.process.vm_id, crate::error_chain(&e));
            return if e.is_bad_input() {
                status::BAD_INPUT
            } else {
                status::RUNTIME_ERROR
            };
        }
    };
    let control = match config.process.control_fd.map(take_control) {
        None => None,
        Some(Ok(fd)) => Some(fd),
        Some(Err(e)) => {
            log::error!("control channel: {e}");
            return status::BAD_INPUT;
        }
    };
    // A control socket is a listener the VM process serves; its path goes when the VM does.
    let (control, _control_socket) = match (&config.process.control_socket, control) {
        (Some(path), None) => match ControlSocket::bind(path) {
            Ok((socket, fd)) => (Some(fd), Some(socket)),
            Err(e) => {
                log::error!("control socket {}: {e}", path.display());
                return status::BAD_INPUT;
            }
        },
        (Some(_), Some(_)) => {
            log::error!("--control-socket can not be used with an inherited control channel");
            return status::BAD_INPUT;
        }
        (None, control) => (control, None),
    };
    let handover = match config.process.handover_fd.map(take_control) {
        None => None,
        Some(Ok(fd)) => Some(std::os::unix::net::UnixDatagram::from(fd)),
        Some(Err(e)) => {
            log::error!("hand-over socket: {e}");
            return status::BAD_INPUT;
        }
    };
    let region = match Region::create() {
        Ok(r) => r,
        Err(e) => {
            log::error!("{e}");
            if let Some(j) = jail.as_mut() {
                j.remove();
            }
            return status::RUNTIME_ERROR;
        }
    };
    // The VM's series exist before its process does, so a scrape never finds a running VM
    // without them.
    if let Some(metrics) = &outputs.metrics {
        if let Err(e) = metrics.write_initial(config, &region.0, start_wall) {
            log::error!("{e}");
            if let Some(j) = jail.as_mut() {
                j.remove();
            }
            return status::RUNTIME_ERROR;
        }
    }
    // Guest connections to host ports are connected here and handed over: the VM process's
    // filter has no `connect`.
    let broker = match config
        .vm
        .vsock
        .as_ref()
        .map(|v| make_broker(&v.uds, jail.as_ref()))
    {
        None => None,
        Some(Ok(pair)) => Some(pair),
        Some(Err(e)) => {
            log::error!("vsock broker: {e}");
            return status::RUNTIME_ERROR;
        }
    };
    let (broker, broker_far) = match broker {
        Some((server, far)) => (Some(server), Some(far)),
        None => (None, None),
    };
    // Each share's backend starts now, while this process is single-threaded (it forks).
    let (backends, share_sockets) = match shares::Backends::start(config) {
        Ok(started) => started,
        Err(e) => {
            log::error!("VM {}: {}", config.process.vm_id, crate::error_chain(&e));
            if let Some(j) = jail.as_mut() {
                j.remove();
            }
            return if e.is_bad_input() {
                status::BAD_INPUT
            } else {
                status::RUNTIME_ERROR
            };
        }
    };
    let spawned = match &handover {
        // The VM runs in the process at the socket's other end (config forbids a jail here).
        Some(socket) => spawn::hand_over(
            socket,
            region,
            outputs.console.as_ref(),
            control,
            broker_far,
        ),
        None => spawn::spawn(
            config,
            start_ns,
            region,
            outputs.console.as_ref(),
            jail.as_ref(),
            spawn::Handed {
                control,
                broker: broker_far,
                shares: share_sockets,
                // A restored VM's vCPUs take the CPUID saved with them.
                supported_cpuid: match config.vm.restore {
                    Some(_) => None,
                    None => crate::cpuid_cache::supported(&config.process.kvm_device),
                },
            },
        ),
    };
    drop(handover);
    let vm = match spawned {
        Ok(vm) => vm,
        Err(e) => {
            log::error!("{}", crate::error_chain(&e));
            if let Some(j) = jail.as_mut() {
                j.remove();
            }
            return status::RUNTIME_ERROR;
        }
    };
    // The console file is the VM process's now.
    outputs.console = None;
    // Its thread takes the VM's user before the supervisor's filter goes on (and covers it).
    if let Some(Err(e)) = broker.map(BrokerServer::start) {
        log::error!("vsock broker: {e}");
        stop_now(vm.pid, terminal.as_ref(), jail.as_mut());
        return status::RUNTIME_ERROR;
    }
    if let Err(e) = outputs.start_http() {
        log::error!("{e}");
        stop_now(vm.pid, terminal.as_ref(), jail.as_mut());
        return status::RUNTIME_ERROR;
    }
    let ctx = AlertContext {
        vm_id: config.process.vm_id.clone(),
        tenant: config.process.tenant.clone(),
        hostname: hostname(),
    };
    // What the set-up freed stays resident for the VM's life unless given back: a supervisor
    // that handed its VM over (the Firecracker personality's) forked nothing, so the trim
    // before the fork never ran, and it held 244 KiB of heap against 40.
    crate::residency::trim_heap();
    crate::residency::release_spent_stack();
    if config.process.seccomp {
        if let Err(e) = seccomp::confine_supervisor(vm.pid) {
            log::error!("{e}");
            stop_now(vm.pid, terminal.as_ref(), jail.as_mut());
            return status::RUNTIME_ERROR;
        }
    }
    crate::test_hooks::fire(
        config.test_hook,
        crate::test_hooks::Point::SupervisorRunning,
    );
    let limits = Limits {
        vcpus: u16::try_from(config.vm.vcpus).unwrap_or(u16::MAX),
        devices: u16::try_from(config.vm.device_names().len()).unwrap_or(u16::MAX),
    };
    let engine = Engine::new(limits, config.vm.device_names(), start_ns);
    let watched = Watch::new(
        config, vm, outputs, engine, ctx, signals, start_ns, start_wall,
    )
    .run();
    let end = watched.end;
    // Each backend ends once the VM process's end of its socket has closed; reaped here.
    drop(backends);
    if let Some(j) = jail.as_mut() {
        j.remove();
    }
    if let Some(t) = terminal {
        t.restore();
    }
    let message = format!(
        "VM {} (tenant {}): {end}",
        config.process.vm_id, config.process.tenant
    );
    if end.is_orderly() {
        log::info!("{message}");
    } else {
        log::error!("{message}");
    }
    end.status()
}

/// The broker's two ends for a VM whose vsock socket is `uds` (as the VM process names it):
/// the supervisor's, serving the socket directory the host sees, as the jail's user when
/// jailed; and the VM process's.
fn make_broker(
    uds: &std::path::Path,
    jail: Option<&VmJail>,
) -> std::io::Result<(BrokerServer, std::os::fd::OwnedFd)> {
    let (ours, theirs) = broker::pair()?;
    // A jail keeps only the file name, in its own socket directory.
    let inside = jail.and_then(|j| j.config.vm.vsock.as_ref().map(|v| (j, v.uds.clone())));
    let (host_uds, as_user) = match inside {
        Some((j, at)) => (j.host_path(&at), Some((j.uid, j.gid))),
        None => (uds.to_path_buf(), None),
    };
    let server = BrokerServer::new(ours, &host_uds, as_user)?;
    Ok((server, std::os::fd::OwnedFd::from(theirs)))
}

/// Kills and reaps the VM process (it would die with the supervisor anyway, through
/// PR_SET_PDEATHSIG, but not be reaped), removes its jail, and puts back the terminal it may
/// have left raw.
fn stop_now(pid: libc::pid_t, terminal: Option<&SavedTerminal>, jail: Option<&mut VmJail>) {
    crate::process::kill_and_reap(pid);
    if let Some(j) = jail {
        j.remove();
    }
    if let Some(t) = terminal {
        t.restore();
    }
}

/// Tells the operator where the jail is and where the host reaches the VM's vsock sockets.
fn announce(jail: &VmJail) {
    log::info!(
        "VM {} jailed in {} as uid {} gid {}",
        jail.config.process.vm_id,
        jail.root.display(),
        jail.uid,
        jail.gid
    );
    if let Some(v) = &jail.config.vm.vsock {
        log::info!(
            "VM {}: vsock socket on the host: {} (guest connections to port P go to {}_P)",
            jail.config.process.vm_id,
            jail.host_path(&v.uds).display(),
            jail.host_path(&v.uds).display()
        );
    }
}

/// A control socket's path, removed when the supervisor is done with the VM.
struct ControlSocket(std::ffi::CString);

impl ControlSocket {
    /// Binds a listening socket at `path` (which must not exist), mode 0600: the VM process
    /// serves it, and takes connections from this user or root only.
    fn bind(path: &std::path::Path) -> std::io::Result<(ControlSocket, std::os::fd::OwnedFd)> {
        use std::os::unix::ffi::OsStrExt;
        // Made 0600 by the umask, not chmod'ed after: a path swapped for a symlink in between
        // would have its target's mode changed. (The supervisor is one thread here.)
        // SAFETY: umask has no memory effects.
        let old = unsafe { libc::umask(0o177) };
        let bound = std::os::unix::net::UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = bound?;
        let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let socket = ControlSocket(cpath);
        listener.set_nonblocking(true)?;
        Ok((socket, listener.into()))
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        // unlinkat, which the supervisor's filter allows (plain unlink it does not).
        // SAFETY: the path is a NUL-terminated string that outlives the call.
        unsafe { libc::unlinkat(libc::AT_FDCWD, self.0.as_ptr(), 0) };
    }
}

/// Takes the inherited descriptor `fd` as the control channel or hand-over socket, after
/// checking it is an open socket (the number came in the settings, not from this process).
fn take_control(fd: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: an all-zero stat is a valid buffer for fstat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only `st`; a bad descriptor fails with EBADF.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(std::io::Error::other(format!(
            "descriptor {fd} is not a socket"
        )));
    }
    // SAFETY: the descriptor is open and inherited for this purpose alone; this process
    // takes it over once, here. FD_CLOEXEC keeps it from any program started later.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        Ok(std::os::fd::OwnedFd::from_raw_fd(fd))
    }
}

/// This host's name, for alerts.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of its length; gethostname NUL-terminates within it
    // or truncates.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return "unknown".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(buf.get(..end).unwrap_or_default()).into_owned()
}
