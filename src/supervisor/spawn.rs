//! Starting the VM process: a fork of the supervisor, made while it is still single-threaded,
//! that goes straight on to build the VM.
//!
//! Why a fork and not an exec of this binary: the exec, the dynamic loader and a second
//! runtime start-up cost about half a millisecond more on every VM start, and the handover
//! needed serialised settings and fixed descriptors. What a fresh exec would add, a new
//! address-space layout, matters little here: the supervisor never trusts a pointer, length or
//! index from the VM process (it reads atomics and checks every value), so knowing its layout
//! gives a compromised VM process nothing to aim at. The child keeps only what it needs: the
//! shared mapping of the telemetry region, the wake eventfd, the console file, stdio and the
//! read end of a pipe whose other end only the supervisor holds; every other inherited
//! descriptor is closed before it touches anything, and the kernel kills it if the supervisor
//! dies (PR_SET_PDEATHSIG; the pipe tells it whether the supervisor died before that was set).
//!
//! A jailed VM process is forked into a pid namespace of its own, whose first and only
//! process it is, and enters the rest of its jail before it builds the VM.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::jail::VmJail;
use crate::telemetry::{Region, RegionError};

/// Where the VM process finds the console file and the wake eventfd; every descriptor above
/// these is closed.
const CONSOLE_FD: RawFd = 3;
const WAKE_FD: RawFd = 4;
/// The read end of the supervisor's life pipe.
const LIFE_FD: RawFd = 5;
/// The front end's control channel, when there is one.
const CONTROL_FD: RawFd = 6;
/// The VM process's end of the vsock connection broker, when the VM has vsock.
const BROKER_FD: RawFd = 7;

/// Errors starting the VM process.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error("cannot create the wake eventfd: {0}")]
    Wake(#[source] std::io::Error),
    #[error("cannot start the VM process: {0}")]
    Fork(#[source] std::io::Error),
    #[error("cannot create the VM process's pid namespace: {0}")]
    PidNamespace(#[source] std::io::Error),
    #[error("cannot find the process to hand the VM over to: {0}")]
    Peer(#[source] std::io::Error),
    #[error(transparent)]
    Handover(#[from] crate::handover::HandoverError),
}

/// What the VM process is handed besides its own descriptors: the front end's control
/// channel, the vsock broker's far end, and each share's connected backend.
#[derive(Default)]
pub struct Handed {
    pub control: Option<OwnedFd>,
    pub broker: Option<OwnedFd>,
    pub shares: Vec<OwnedFd>,
    /// KVM's supported CPUID, when the supervisor had it (crate::cpuid_cache).
    pub supported_cpuid: Option<kvm_bindings::CpuId>,
}

/// The running VM process, as the supervisor holds it.
pub struct VmProcess {
    pub pid: libc::pid_t,
    pub region: Region,
    /// Written by the VM process when it posts events; read by the supervisor.
    pub wake: EventFd,
    /// The write end of the life pipe: closed when the supervisor dies.
    _life: OwnedFd,
    /// For a VM handed over to a process this supervisor did not fork: the read end of the
    /// alive pipe, which says the VM process's status (or hangs up when it is killed) in place
    /// of a wait status. Non-blocking.
    pub alive: Option<OwnedFd>,
}

/// Forks the VM process, which builds and runs the VM `config` describes and exits with its
/// status. `console` is the console file, when the console is a file.
///
/// Must be called while the supervisor has no thread but this one: a fork copies only the
/// calling thread, and a lock another thread held would stay held in the child forever.
/// With `jail`, the VM process runs `jail.config` in it.
pub fn spawn(
    config: &VmConfig,
    start_ns: u64,
    (region, _memfd): (Region, OwnedFd),
    console: Option<&File>,
    jail: Option<&VmJail>,
    handed: Handed,
) -> Result<VmProcess, SpawnError> {
    let Handed {
        control,
        broker,
        shares,
        supported_cpuid,
    } = handed;
    let config = jail.map_or(config, |j| &j.config);
    let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(SpawnError::Wake)?;
    let console_fd = console.map(AsRawFd::as_raw_fd);
    let (life_read, life_write) = life_pipe().map_err(SpawnError::Fork)?;
    // The supervisor's own pid namespace, to return to once the VM process is forked: while
    // its children's namespace is another, the kernel refuses it new threads.
    let own_pid_ns = match jail {
        Some(_) => Some(File::open("/proc/self/ns/pid").map_err(SpawnError::PidNamespace)?),
        None => None,
    };
    if own_pid_ns.is_some() {
        // The next child this process forks is the first process of a new pid namespace.
        // SAFETY: unshare with a flag only.
        if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
            return Err(SpawnError::PidNamespace(std::io::Error::last_os_error()));
        }
    }
    // The heap still holds what parsing the command line and the settings touched (clap's
    // command tree alone is about 250 KiB) though most of it is free: give the free pages back
    // before the fork, or both processes keep them for the VM's life.
    crate::residency::trim_heap();
    // SAFETY: the process is single-threaded here (see above), so the child may go on running
    // ordinary code; fork has no memory effects on this process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(SpawnError::Fork(std::io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(life_write);
        let mut channel_fds = vec![
            control.as_ref().map(AsRawFd::as_raw_fd),
            broker.as_ref().map(AsRawFd::as_raw_fd),
        ];
        channel_fds.extend(shares.iter().map(|fd| Some(fd.as_raw_fd())));
        let kept = become_vm_process(life_read, console_fd, wake.as_raw_fd(), &channel_fds);
        let status = match kept {
            Ok((console, wake, life, kept)) => {
                let jailed = jail.map(|j| (j, life));
                let mut kept = kept.into_iter();
                let (control, broker) = (kept.next().flatten(), kept.next().flatten());
                let channels = crate::vmproc::Channels {
                    control,
                    broker,
                    lifeline: None,
                    shares: kept.flatten().collect(),
                    supported_cpuid,
                };
                // A panic on the VMM thread ends here, never unwinding into the supervisor's
                // frames this process was forked from (whose values are the supervisor's).
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    crate::vmproc::run(config, start_ns, region, wake, console, jailed, channels)
                }))
                .unwrap_or(crate::exit::status::RUNTIME_ERROR)
            }
            Err(e) => {
                log::error!("VM process: {e}");
                crate::exit::status::RUNTIME_ERROR
            }
        };
        std::process::exit(status);
    }
    if let Some(ns) = own_pid_ns {
        // SAFETY: setns on a namespace descriptor this process opened; the supervisor's own
        // pid namespace is always one it may give its children.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
            let e = std::io::Error::last_os_error();
            crate::process::kill_and_reap(pid);
            return Err(SpawnError::PidNamespace(e));
        }
    }
    // The control channel, the broker's far end and the shares' sockets are the VM
    // process's alone.
    drop(control);
    drop(broker);
    drop(shares);
    Ok(VmProcess {
        pid,
        region,
        wake,
        _life: life_write,
        alive: None,
    })
}

/// Hands the VM over to the process at the other end of `socket` (see [`crate::handover`])
/// instead of forking one: it runs the VM `config` describes (it reads the same settings).
/// `region` is the telemetry region and its memfd. The process's pid is the socket's peer's:
/// the socket pair was made by that process.
pub fn hand_over(
    socket: &std::os::unix::net::UnixDatagram,
    (region, memfd): (Region, OwnedFd),
    console: Option<&File>,
    control: Option<OwnedFd>,
    broker: Option<OwnedFd>,
) -> Result<VmProcess, SpawnError> {
    let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(SpawnError::Wake)?;
    let (life_read, life_write) = life_pipe().map_err(SpawnError::Fork)?;
    let (alive_read, alive_write) = life_pipe().map_err(SpawnError::Fork)?;
    // SAFETY: fcntl on a descriptor this process owns.
    if unsafe { libc::fcntl(alive_read.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
        return Err(SpawnError::Fork(std::io::Error::last_os_error()));
    }
    let pid = peer_pid(socket).map_err(SpawnError::Peer)?;
    let dup = |fd: RawFd| -> Result<OwnedFd, SpawnError> {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor this process owns.
        let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if new < 0 {
            return Err(SpawnError::Fork(std::io::Error::last_os_error()));
        }
        // SAFETY: a new descriptor nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(new) })
    };
    let parts = crate::handover::Parts {
        region: memfd,
        wake: dup(wake.as_raw_fd())?,
        life: life_read,
        alive: alive_write,
        console: console.map(|c| dup(c.as_raw_fd())).transpose()?,
        control,
        broker,
    };
    crate::handover::send(socket, &parts)?;
    Ok(VmProcess {
        pid,
        region,
        wake,
        _life: life_write,
        alive: Some(alive_read),
    })
}

/// The pid of the process that made the socket pair `socket` belongs to.
fn peer_pid(socket: &std::os::unix::net::UnixDatagram) -> std::io::Result<libc::pid_t> {
    // SAFETY: an all-zero ucred is a valid buffer.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if cred.pid <= 0 {
        return Err(std::io::Error::other(
            "the hand-over socket has no peer process",
        ));
    }
    Ok(cred.pid)
}

/// A close-on-exec pipe: (read end, write end).
fn life_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is valid for writes of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two new descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// What the VM process keeps: the console file, the wake eventfd, the life pipe, and its
/// channels (the control channel, the broker, the shares' sockets) that there are.
type Kept = (Option<File>, EventFd, OwnedFd, Vec<Option<OwnedFd>>);

/// In the child: dies with the supervisor, restores the signal mask, and keeps only the
/// descriptors it needs (stdio, the console file, the wake eventfd and the life pipe, moved to
/// 3, 4 and 5, then its channels when there are: the control channel at 6, the broker at 7,
/// the shares' sockets from 8).
fn become_vm_process(
    life: OwnedFd,
    console: Option<RawFd>,
    wake: RawFd,
    channels: &[Option<RawFd>],
) -> std::io::Result<Kept> {
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    crate::vmproc::die_with_supervisor(&life)?;
    // SAFETY: pthread_sigmask and signal with valid arguments; `empty` is a valid sigset_t
    // owned by this frame.
    unsafe {
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
    // Copies go above every number they are then placed at, so placing one never closes
    // another's copy.
    let high_base = (CONTROL_FD + channels.len() as RawFd).max(10);
    // SAFETY: fcntl and dup2 on descriptors this process owns.
    let wake_high = check(unsafe { libc::fcntl(wake, libc::F_DUPFD, high_base) })?;
    // SAFETY: as above.
    let life_high = check(unsafe { libc::fcntl(life.as_raw_fd(), libc::F_DUPFD, high_base) })?;
    let mut channels_high = vec![None; channels.len()];
    for (high, fd) in channels_high.iter_mut().zip(channels) {
        if let Some(fd) = fd {
            // SAFETY: as above.
            *high = Some(check(unsafe {
                libc::fcntl(*fd, libc::F_DUPFD, high_base)
            })?);
        }
    }
    let console_high = match console {
        // SAFETY: as above.
        Some(fd) => Some(check(unsafe { libc::fcntl(fd, libc::F_DUPFD, high_base) })?),
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
    // SAFETY: as above.
    check(unsafe { libc::dup2(life_high, LIFE_FD) })?;
    for (high, at) in channels_high.iter().zip(CONTROL_FD..) {
        if let Some(fd) = high {
            // SAFETY: as above.
            check(unsafe { libc::dup2(*fd, at) })?;
        }
    }
    let last = (CONTROL_FD..)
        .zip(&channels_high)
        .last()
        .map_or(BROKER_FD, |(at, _)| at);
    // SAFETY: close_range closes descriptors only; nothing in this process uses the ones above
    // its last channel any more.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, last.max(BROKER_FD) + 1, u32::MAX, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just placed for this process alone.
    let console = console_high.map(|_| unsafe { File::from_raw_fd(CONSOLE_FD) });
    // SAFETY: as above.
    let wake = unsafe { EventFd::from_raw_fd(WAKE_FD) };
    // The original number was either closed with the rest or now holds another of the three:
    // only the copy at LIFE_FD is the pipe's.
    std::mem::forget(life);
    // SAFETY: as above.
    let life = unsafe { OwnedFd::from_raw_fd(LIFE_FD) };
    let mut kept: Vec<Option<OwnedFd>> = Vec::with_capacity(channels_high.len());
    kept.resize_with(channels_high.len(), || None);
    for ((slot, high), at) in kept.iter_mut().zip(channels_high).zip(CONTROL_FD..) {
        *slot = match high {
            // SAFETY: as above.
            Some(_) => Some(unsafe { OwnedFd::from_raw_fd(at) }),
            None => {
                // SAFETY: closing a descriptor this process does not use, whatever it is.
                unsafe { libc::close(at) };
                None
            }
        };
    }
    Ok((console, wake, life, kept))
}
