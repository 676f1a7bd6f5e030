//! Debugging hooks: ways to make the VMM misbehave on purpose, so tests can prove its
//! defences (the seccomp filters, the SIGSYS reporter, the supervisor's verdicts). Every hook
//! is named and fired here; the code that fires them is compiled into debug builds only, and a
//! release build refuses `--test-hook` before anything starts.

/// Debugging hooks that make the VMM misbehave on purpose, so tests can prove its defences.
/// A release build parses them (to refuse them with a clear message) but never fires one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestHook {
    /// The vCPU thread makes a system call its seccomp filter forbids before its first KVM_RUN.
    VcpuForbiddenSyscall,
    /// The VMM thread does the same before serving its event loop.
    VmmForbiddenSyscall,
    /// A guest write to port 0xf6 makes the vCPU thread do the same: a stand-in for a guest
    /// that has taken over a VMM thread.
    GuestForbiddenSyscall,
    /// The supervisor makes a system call its own filter forbids once the VM is running.
    SupervisorForbiddenSyscall,
    /// The vCPU thread tries to kill the supervisor (its parent) with tgkill.
    SignalSupervisor,
    /// The vCPU thread aborts, as on a stack overflow or a failed allocation.
    VcpuAbort,
    /// The vCPU thread panics, as on a bug in bulkhead's own code.
    VcpuPanic,
    /// The VMM thread makes a call its filter allows only with other arguments.
    VmmForbiddenCall(ForbiddenCall),
    /// The vCPU thread does the same.
    VcpuForbiddenCall(ForbiddenCall),
}

/// A system call a thread's filter allows, with arguments it does not: one per tightened
/// rule, for `--test-hook vmm-forbidden-call:NAME` and `vcpu-forbidden-call:NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForbiddenCall {
    /// socket(AF_INET, SOCK_STREAM): the VMM thread may open Unix sockets only.
    SocketInet,
    /// socket(AF_UNIX, SOCK_DGRAM): and stream ones only.
    SocketDgram,
    /// futex(FUTEX_CMP_REQUEUE_PRIVATE): private waits and wakes only.
    FutexRequeue,
    /// futex(FUTEX_WAIT), process-shared.
    FutexShared,
    /// madvise(MADV_MERGEABLE): MADV_DONTNEED only.
    MadviseMergeable,
    /// mmap(MAP_SHARED | MAP_ANONYMOUS): private memory only.
    MmapShared,
    /// mmap of a file descriptor: anonymous memory only.
    MmapFile,
    /// mremap(MREMAP_MAYMOVE | MREMAP_FIXED): MAYMOVE only.
    MremapFixed,
    /// tgkill with a signal the filter does not list (0, which only checks the thread).
    TgkillOtherSignal,
    /// socket(AF_UNIX, SOCK_STREAM): the VMM thread may open no socket at all (the
    /// supervisor's broker connects guest connections).
    SocketUnixStream,
    /// connect to a Unix socket by path: in no thread's filter.
    ConnectUnix,
}

impl ForbiddenCall {
    pub const ALL: [(&'static str, ForbiddenCall); 11] = [
        ("socket-inet", ForbiddenCall::SocketInet),
        ("socket-dgram", ForbiddenCall::SocketDgram),
        ("futex-requeue", ForbiddenCall::FutexRequeue),
        ("futex-shared", ForbiddenCall::FutexShared),
        ("madvise-mergeable", ForbiddenCall::MadviseMergeable),
        ("mmap-shared", ForbiddenCall::MmapShared),
        ("mmap-file", ForbiddenCall::MmapFile),
        ("mremap-fixed", ForbiddenCall::MremapFixed),
        ("tgkill-other-signal", ForbiddenCall::TgkillOtherSignal),
        ("socket-unix-stream", ForbiddenCall::SocketUnixStream),
        ("connect-unix", ForbiddenCall::ConnectUnix),
    ];
}

/// A `--test-hook` that names no hook.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown test hook {0:?}")]
pub struct UnknownTestHook(pub String);

impl std::str::FromStr for TestHook {
    type Err = UnknownTestHook;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vcpu-forbidden-syscall" => Ok(TestHook::VcpuForbiddenSyscall),
            "vmm-forbidden-syscall" => Ok(TestHook::VmmForbiddenSyscall),
            "guest-forbidden-syscall" => Ok(TestHook::GuestForbiddenSyscall),
            "supervisor-forbidden-syscall" => Ok(TestHook::SupervisorForbiddenSyscall),
            "signal-supervisor" => Ok(TestHook::SignalSupervisor),
            "vcpu-abort" => Ok(TestHook::VcpuAbort),
            "vcpu-panic" => Ok(TestHook::VcpuPanic),
            _ => {
                let call = |name: &str| {
                    ForbiddenCall::ALL
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|&(_, c)| c)
                };
                if let Some(c) = s.strip_prefix("vmm-forbidden-call:").and_then(call) {
                    return Ok(TestHook::VmmForbiddenCall(c));
                }
                if let Some(c) = s.strip_prefix("vcpu-forbidden-call:").and_then(call) {
                    return Ok(TestHook::VcpuForbiddenCall(c));
                }
                Err(UnknownTestHook(s.to_string()))
            }
        }
    }
}

/// Where a thread fires its hook, after it has installed its seccomp filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// A vCPU thread, before its first KVM_RUN; `parent` is the supervisor's pid, read before
    /// the filter went in (no filter allows getppid).
    VcpuStart { parent: libc::pid_t },
    /// A vCPU thread, inside the guard that turns its panics into a failed vCPU.
    VcpuRun,
    /// The VMM thread, before it serves its event loop.
    VmmStart,
    /// The supervisor, once the VM runs.
    SupervisorRunning,
}

/// Fires `hook` if it belongs at `point`.
#[cfg(debug_assertions)]
pub fn fire(hook: Option<TestHook>, point: Point) {
    use TestHook::*;
    match (hook, point) {
        (Some(VcpuForbiddenSyscall), Point::VcpuStart { .. })
        | (Some(VmmForbiddenSyscall), Point::VmmStart)
        | (Some(SupervisorForbiddenSyscall), Point::SupervisorRunning) => forbidden_syscall(),
        (Some(VcpuForbiddenCall(call)), Point::VcpuStart { .. })
        | (Some(VmmForbiddenCall(call)), Point::VmmStart) => forbidden_call(call),
        (Some(VcpuAbort), Point::VcpuStart { .. }) => std::process::abort(),
        (Some(SignalSupervisor), Point::VcpuStart { parent }) => signal_parent(parent),
        (Some(VcpuPanic), Point::VcpuRun) => panic!("--test-hook vcpu-panic"),
        _ => {}
    }
}

/// Release builds fire nothing.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn fire(_hook: Option<TestHook>, _point: Point) {}

/// The parent process's pid, for [`Point::VcpuStart`].
pub fn parent_pid() -> libc::pid_t {
    // SAFETY: getppid has no preconditions.
    unsafe { libc::getppid() }
}

/// The port device a guest uses to fire `GuestForbiddenSyscall`, if that is the hook.
#[cfg(debug_assertions)]
pub fn guest_port(hook: Option<TestHook>) -> Option<(std::sync::Arc<SeccompHookPort>, u64)> {
    (hook == Some(TestHook::GuestForbiddenSyscall))
        .then(|| (std::sync::Arc::new(SeccompHookPort), SECCOMP_HOOK_PORT))
}

/// The guest port that, with `--test-hook guest-forbidden-syscall`, stands for a device bug
/// a guest exploits to run code of its choice on a vCPU thread.
#[cfg(debug_assertions)]
pub const SECCOMP_HOOK_PORT: u64 = 0xf6;

#[cfg(debug_assertions)]
pub struct SeccompHookPort;

#[cfg(debug_assertions)]
impl crate::devices::BusDevice for SeccompHookPort {
    fn read(&self, _offset: u64, _data: &mut [u8]) -> bool {
        false
    }

    fn write(&self, _offset: u64, _data: &[u8]) -> bool {
        forbidden_syscall();
        true
    }
}

/// Makes a system call no filter allows, to prove the filters work (debug builds only).
#[cfg(debug_assertions)]
fn forbidden_syscall() {
    // A raw packet socket: no role's filter allows it (the VMM thread may open only Unix
    // sockets, the supervisor only IP ones).
    // SAFETY: socket(2) with constant arguments touches no memory of ours; if it is somehow
    // allowed, the fd is closed at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd >= 0 {
        // SAFETY: `fd` was just returned to us and is not used elsewhere.
        unsafe { libc::close(fd) };
    }
}

/// Makes `call`: a system call the thread's filter allows, with arguments it does not. Each
/// is harmless should it go through (debug builds only).
#[cfg(debug_assertions)]
fn forbidden_call(call: ForbiddenCall) {
    use ForbiddenCall::*;
    let mut word: u32 = 0;
    let word_ptr = &mut word as *mut u32;
    // SAFETY: every call below passes constants, or a pointer to `word`, a live local the
    // kernel may read and write; memory it maps is unmapped again. None of them touches
    // memory of ours otherwise.
    unsafe {
        let rc = match call {
            SocketInet => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as libc::c_long,
            SocketDgram => libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
                as libc::c_long,
            SocketUnixStream => libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            ) as libc::c_long,
            // On no descriptor: with connect in the filter this would fail with EBADF.
            ConnectUnix => {
                let mut addr: libc::sockaddr_un = std::mem::zeroed();
                addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
                for (d, s) in addr.sun_path.iter_mut().zip(b"/run/containerd.sock") {
                    *d = *s as libc::c_char;
                }
                libc::connect(
                    -1,
                    (&addr as *const libc::sockaddr_un).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                ) as libc::c_long
            }
            // Requeues no waiter from `word` to itself.
            FutexRequeue => libc::syscall(
                libc::SYS_futex,
                word_ptr,
                libc::FUTEX_CMP_REQUEUE | libc::FUTEX_PRIVATE_FLAG,
                0,
                0,
                word_ptr,
                0,
            ),
            // Waits only while `word` is 1, which it is not: returns at once.
            FutexShared => libc::syscall(libc::SYS_futex, word_ptr, libc::FUTEX_WAIT, 1, 0),
            MadviseMergeable | MmapShared | MmapFile | MremapFixed => {
                let flags = if call == MmapShared {
                    libc::MAP_SHARED | libc::MAP_ANONYMOUS
                } else {
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS
                };
                // A file mapping: the first descriptor a process has, stdin, read-only.
                let (flags, fd) = if call == MmapFile {
                    (libc::MAP_PRIVATE, 0)
                } else {
                    (flags, -1)
                };
                let page = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    fd,
                    0,
                );
                if page != libc::MAP_FAILED {
                    match call {
                        MadviseMergeable => {
                            libc::madvise(page, 4096, libc::MADV_MERGEABLE);
                        }
                        MremapFixed => {
                            // Onto itself: EINVAL if it goes through.
                            libc::syscall(
                                libc::SYS_mremap,
                                page,
                                4096,
                                4096,
                                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                                page,
                            );
                        }
                        _ => {}
                    }
                    libc::munmap(page, 4096);
                }
                0
            }
            TgkillOtherSignal => libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), 0),
        };
        if rc >= 0 && matches!(call, SocketInet | SocketDgram | SocketUnixStream) {
            libc::close(rc as libc::c_int);
        }
    }
}

/// Tries to kill `parent` (the supervisor) with tgkill, as a thread taken over by a guest
/// might (debug builds only). The filters allow tgkill on this process alone.
#[cfg(debug_assertions)]
fn signal_parent(parent: libc::pid_t) {
    // SAFETY: tgkill with integer arguments touches no memory.
    unsafe {
        libc::syscall(libc::SYS_tgkill, parent, parent, libc::SIGKILL);
    }
}
