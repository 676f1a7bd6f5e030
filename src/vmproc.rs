//! The VM process: `bulkhead run`'s inner process, forked by the supervisor, which builds and
//! runs one VM under its seccomp filters and reports through the telemetry region: counters
//! and events while it runs, then the exit record and its exit status.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::builder::{build_vm, AfterOpen, BuildEnv};
use crate::config::VmConfig;
use crate::exit::{status, VmExitReason};
use crate::handover::Parts;
use crate::jail::VmJail;
use crate::signal;
use crate::telemetry::{Region, Reporter, VmCounter};

/// Makes the VM process leave no core dump (it would hold guest memory) and refuse ptrace by
/// other processes of the same user.
fn harden() -> std::io::Result<()> {
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
        Err(std::io::Error::last_os_error())
    }
}

/// Makes the kernel kill this process when the supervisor dies, then checks that it has not
/// died already: `life` is the read end of a pipe whose write end only the supervisor holds,
/// so it reports a hang-up once the supervisor is gone. (The parent pid can not tell: a
/// jailed VM process's parent is outside its pid namespace and reads as 0.)
pub fn die_with_supervisor(life: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut pfd = libc::pollfd {
        fd: life.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd; a zero timeout only looks.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    if ready != 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
        // The supervisor died before the death signal was set.
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(status::RUNTIME_ERROR) };
    }
    Ok(())
}

/// Counts every panic of this process's own code in the region (`bulkhead_vmm_panics_total`,
/// Firecracker's `vmm.panic_count`) and prints where it happened. A panicking vCPU thread is
/// caught and ends the VM; one on the VMM thread ends the process: either way the supervisor
/// sees the count. The standard hook is not called: with `RUST_BACKTRACE` set it resolves a
/// backtrace (getcwd, opening its own executable), calls the filters refuse, and the panic
/// would be reported as a seccomp violation instead.
fn count_panics(region: Arc<Region>) {
    std::panic::set_hook(Box::new(move |info| {
        region.count(VmCounter::VmmPanics);
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        match info.location() {
            Some(at) => eprintln!("bulkhead: thread {name} panicked at {at}: {message}"),
            None => eprintln!("bulkhead: thread {name} panicked: {message}"),
        }
    }));
}

/// The sockets the VM process gets from its supervisor besides stdio: the front end's control
/// channel, the vsock connection broker, and each share's connected backend.
#[derive(Debug, Default)]
pub struct Channels {
    pub control: Option<OwnedFd>,
    pub broker: Option<OwnedFd>,
    /// The supervisor's life pipe, for a VM process the supervisor did not fork.
    pub lifeline: Option<OwnedFd>,
    /// Each share's vhost-user backend (its virtiofsd), connected, in share order.
    pub shares: Vec<OwnedFd>,
    /// KVM's supported CPUID, when the supervisor had it: the builder then does not ask.
    pub supported_cpuid: Option<kvm_bindings::CpuId>,
}

/// Builds and runs the VM; returns the process's exit status. `region` is the supervisor's
/// telemetry region (shared across the fork), `wake` its eventfd, `console_file` the console
/// file it opened. A jailed VM process gets its jail and the life pipe (see
/// [`die_with_supervisor`]).
pub fn run(
    config: &VmConfig,
    start_ns: u64,
    region: Region,
    wake: EventFd,
    console_file: Option<File>,
    jailed: Option<(&VmJail, OwnedFd)>,
    channels: Channels,
) -> i32 {
    // One malloc arena for every thread. glibc then never makes or shrinks a heap of a
    // thread's own; shrinking one maps PROT_NONE over it with MAP_FIXED and may read /proc,
    // calls the vCPU and VMM filters refuse. (musl's allocator has one heap for all threads.)
    // SAFETY: mallopt with integer arguments, before this process starts a thread.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1)
    };
    if let Err(e) = harden() {
        log::error!("VM process: cannot harden itself: {e}");
        return status::RUNTIME_ERROR;
    }
    if let Some((jail, _)) = &jailed {
        if let Err(e) = signal::install_abort_exit() {
            log::error!("VM process: cannot install its abort handler: {e}");
            return status::RUNTIME_ERROR;
        }
        if let Err(e) = jail.enter() {
            log::error!(
                "VM process: cannot enter its jail: {}",
                crate::error_chain(&e)
            );
            return status::RUNTIME_ERROR;
        }
    }
    let region = Arc::new(region);
    // The SIGSYS reporter writes to the region until the process is gone: this handle is
    // never dropped, so the mapping is never unmapped.
    std::mem::forget(region.clone());
    signal::set_telemetry(region.as_ptr());
    count_panics(region.clone());
    // SIGTERM from the supervisor ends the VM in order (the console flushed) rather than at
    // once; every thread started from here on inherits the block.
    let stop = match signal::signalfd(&[libc::SIGTERM]) {
        Ok(fd) => fd,
        Err(e) => {
            log::error!("VM process: cannot watch for SIGTERM: {e}");
            return status::RUNTIME_ERROR;
        }
    };
    // A jailed VM process gives up root once everything privileged is open, before it reads
    // the kernel or anything else the guest supplied. Changing credentials resets the death
    // signal and the dumpable flag: both are set again.
    let after_open: Option<AfterOpen> = jailed.map(|(jail, life)| {
        let lock = jail.locker();
        Box::new(move || {
            lock.lock()?;
            harden()?;
            die_with_supervisor(&life)?;
            Ok(())
        }) as AfterOpen
    });
    let env = BuildEnv {
        reporter: Reporter::new(region.clone(), Some(wake)),
        console_file,
        start_ns,
        after_open,
        control: channels.control,
        broker: channels.broker,
        shares: channels.shares,
        supported_cpuid: channels.supported_cpuid,
    };

    let vmm = match build_vm(config, env) {
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
    match vmm.run(Some(stop), channels.lifeline) {
        Ok(outcome) => {
            let (kind, a, b) = outcome.reason.to_record();
            region.exit.write(kind, a, b);
            // The record carries no text: details only this process knows are logged here.
            if matches!(
                outcome.reason,
                VmExitReason::UnhandledExit { .. } | VmExitReason::VcpuFailed { .. }
            ) {
                log::error!("VM {}: {}", config.process.vm_id, outcome.reason);
            }
            outcome.reason.status()
        }
        Err(e) => {
            log::error!("{}", crate::error_chain(&e));
            status::RUNTIME_ERROR
        }
    }
}

/// Runs the VM `config` describes in this process, which the supervisor did not fork: it
/// handed over `parts` on `socket` (see [`crate::handover`]). Returns the status this process
/// should exit with: `bulkhead run`'s, as the front end sends it once the supervisor ended,
/// or the VM process's own when the front end is gone.
pub fn run_handed(config: &VmConfig, parts: Parts, socket: UnixDatagram) -> i32 {
    let start_ns = crate::logger::process_start_ns();
    let mut keep = parts.raw_fds();
    keep.push(socket.as_raw_fd());
    if let Err(e) = close_all_except(&keep) {
        log::error!("VM process: cannot close inherited descriptors: {e}");
        return status::RUNTIME_ERROR;
    }
    // SAFETY: signal with valid arguments.
    unsafe {
        // As a forked VM process does: the supervisor decides what these mean.
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    if let Err(e) = signal::install_sigsys_reporter(signal::SigsysReporter::VmProcess) {
        log::error!("VM process: cannot install the SIGSYS reporter: {e}");
        return status::RUNTIME_ERROR;
    }
    let Parts {
        region,
        wake,
        life,
        alive,
        console,
        control,
        broker,
    } = parts;
    let region_map = match Region::attach(&region) {
        Ok(r) => r,
        Err(e) => {
            log::error!("VM process: {e}");
            return status::RUNTIME_ERROR;
        }
    };
    // The mapping stays; the descriptor is not needed.
    drop(region);
    // SAFETY: the descriptor was handed over as the wake eventfd and is owned here alone.
    let wake = unsafe { EventFd::from_raw_fd(wake.into_raw_fd()) };
    let channels = Channels {
        control,
        broker,
        lifeline: Some(life),
        shares: Vec::new(),
        supported_cpuid: None,
    };
    let own = run(
        config,
        start_ns,
        region_map,
        wake,
        console.map(File::from),
        None,
        channels,
    );
    crate::handover::report_status(alive, own);
    crate::handover::read_status(&socket).unwrap_or(own)
}

/// Closes every descriptor above standard error except `keep`.
fn close_all_except(keep: &[RawFd]) -> std::io::Result<()> {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|fd| *fd > 2).collect();
    keep.sort_unstable();
    let mut from: u32 = 3;
    for fd in keep.into_iter().filter_map(|fd| u32::try_from(fd).ok()) {
        if fd > from {
            close_range(from, fd - 1)?;
        }
        from = fd.saturating_add(1);
    }
    close_range(from, u32::MAX)
}

fn close_range(first: u32, last: u32) -> std::io::Result<()> {
    // SAFETY: close_range closes descriptors only; the caller keeps every one it still uses
    // outside the range.
    if unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
