//! Signal handlers: the seccomp violation reporter (SIGSYS) and the vCPU kick.
//!
//! Both run on whatever thread the signal hits, so they only touch atomics, const-initialised
//! thread-locals and the stack, and call only write(2), getpid(2), gettid(2), tgkill(2) and
//! _exit(2): no allocation, no locks, no `log`.
//!
//! The SIGSYS reporter hands the thread and system call to the supervisor through the
//! telemetry region, then lets SIGSYS kill the process, so the supervisor also learns of the
//! violation from the kernel (the wait status), which a compromised process can not forge
//! away.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{fence, AtomicBool, AtomicPtr, Ordering};

use kvm_bindings::kvm_run;

use crate::exit::status;
use crate::telemetry::Page;

/// The telemetry region the reporter writes to (null in the supervisor).
static TELEMETRY: AtomicPtr<Page> = AtomicPtr::new(std::ptr::null_mut());
/// Whether the reporter serves the supervisor (see [`SigsysReporter`]).
static IN_SUPERVISOR: AtomicBool = AtomicBool::new(false);

/// Makes the SIGSYS reporter record violations in `page`, which must stay mapped for the rest
/// of the process's life (the VM process leaks its handle on the region for this).
pub fn set_telemetry(page: *const Page) {
    TELEMETRY.store(page.cast_mut(), Ordering::Release);
}

/// Which process the SIGSYS reporter serves, which decides how it ends the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigsysReporter {
    /// The VM process: any SIGSYS ends it by SIGSYS, which its supervisor reads in the wait
    /// status (one someone sent with `kill` names no system call). It runs once.
    VmProcess,
    /// The supervisor: its own violation is reported and ends it with status 159; a SIGSYS
    /// someone sent is ignored, every time.
    Supervisor,
}

thread_local! {
    /// This thread's role name, for violation reports.
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
    /// This vCPU thread's kvm_run page, so a kick can set `immediate_exit` on it.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Records `name` (truncated to 15 bytes) as this thread's name for violation reports.
pub fn set_thread_name(name: &str) {
    let mut buf = [0u8; 16];
    let len = name.len().min(15);
    buf[..len].copy_from_slice(&name.as_bytes()[..len]);
    THREAD_NAME.with(|c| c.set(buf));
}

/// Makes kicks on this thread set `immediate_exit` in `run`. Pass null before the vCPU fd
/// (and so the mapping) goes away.
pub fn set_kvm_run(run: *mut kvm_run) {
    KVM_RUN.with(|c| c.set(run));
}

/// The real-time signal used to kick vCPUs out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Appends `bytes` to `buf` at `*pos`, as far as they fit.
fn put(buf: &mut [u8], pos: &mut usize, bytes: &[u8]) {
    for &b in bytes {
        if let Some(slot) = buf.get_mut(*pos) {
            *slot = b;
            *pos += 1;
        }
    }
}

/// Appends `n` in decimal without allocating.
fn put_decimal(buf: &mut [u8], pos: &mut usize, n: i64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 || i == 0 {
            break;
        }
    }
    if n < 0 {
        put(buf, pos, b"-");
    }
    put(buf, pos, &digits[i..]);
}

/// Formats the one-line violation report.
fn format_violation(buf: &mut [u8], thread: &[u8], syscall: i64) -> usize {
    let mut pos = 0;
    put(buf, &mut pos, b"bulkhead: seccomp violation: thread ");
    let name_len = thread.iter().position(|&b| b == 0).unwrap_or(thread.len());
    put(
        buf,
        &mut pos,
        if name_len == 0 {
            b"unnamed"
        } else {
            &thread[..name_len]
        },
    );
    put(buf, &mut pos, b" made forbidden system call ");
    put_decimal(buf, &mut pos, syscall);
    put(buf, &mut pos, b"; ending with SIGSYS (status ");
    put_decimal(buf, &mut pos, i64::from(status::SECCOMP_VIOLATION));
    put(buf, &mut pos, b")\n");
    pos
}

/// `si_code` of a SIGSYS the kernel raised for a seccomp filter (SYS_SECCOMP).
const SYS_SECCOMP: libc::c_int = 1;

extern "C" fn sigsys_handler(
    _num: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a full siginfo; `si_code` is in its fixed header.
    let from_seccomp = !info.is_null() && unsafe { (*info).si_code } == SYS_SECCOMP;
    if from_seccomp {
        // SAFETY: for a seccomp SIGSYS the kernel fills siginfo's `_sigsys` member: after the
        // three ints and padding of the header (16 bytes) come `_call_addr` (8 bytes) and then
        // `_syscall` (an int) at byte 24, i.e. int index 6. `info` is non-null and points at a
        // full siginfo.
        let syscall = i64::from(unsafe { *info.cast::<i32>().add(6) });
        let name = THREAD_NAME.with(|c| c.get());
        let page = TELEMETRY.load(Ordering::Acquire);
        if !page.is_null() {
            // SAFETY: `page` was set by `set_telemetry` to a mapping that lives as long as the
            // process; the record is atomics only, so writing it from a handler is sound.
            unsafe { (*page).seccomp.write(syscall, &name) };
        }
        let mut buf = [0u8; 192];
        let len = format_violation(&mut buf, &name, syscall);
        // SAFETY: write(2) is async-signal-safe; `buf[..len]` is initialised.
        unsafe { libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len) };
        if IN_SUPERVISOR.load(Ordering::Acquire) {
            // The supervisor's handler stays installed (no SA_RESETHAND, so every SIGSYS sent
            // from outside is ignored); it ends with the same status by exiting.
            // SAFETY: _exit(2) is async-signal-safe.
            unsafe { libc::_exit(status::SECCOMP_VIOLATION) };
        }
    } else if IN_SUPERVISOR.load(Ordering::Acquire) {
        return;
    }
    // A SIGSYS sent by someone else (kill) records nothing: it names no system call. Either
    // way the process dies by SIGSYS, as the signal's default action says.
    // SAFETY: getpid, gettid and tgkill(2) are async-signal-safe. SA_RESETHAND restored
    // SIGSYS's default action on entry and SA_NODEFER left it unblocked, so tgkill ends the
    // process by SIGSYS right here.
    unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::gettid(),
            libc::SIGSYS,
        );
    }
    // Still alive: this is a jailed VM process, the first process of its own pid namespace,
    // and the kernel drops the signals such a process sends itself while their action is the
    // default. It does not drop a signal it forces for a fault, so the forbidden call is made
    // again with the same number and arguments: the filter traps it again, and now that the
    // action is the default, that SIGSYS ends the process.
    if from_seccomp && !ctx.is_null() {
        retrap(ctx);
    }
    // SAFETY: _exit(2) is async-signal-safe; reached only if SIGSYS could not end the process.
    unsafe { libc::_exit(status::SECCOMP_VIOLATION) }
}

/// Makes again the system call a seccomp trap interrupted, as `ctx` (the handler's ucontext)
/// saved it: on a trap the kernel leaves the call's number in the saved `orig_rax` and rax,
/// and its arguments in rdi, rsi, rdx, r10, r8 and r9.
fn retrap(ctx: *mut libc::c_void) {
    // SAFETY: for an SA_SIGINFO handler `ctx` is the interrupted thread's ucontext_t; this
    // only reads its saved registers.
    let regs = unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    let reg = |r: libc::c_int| {
        usize::try_from(r)
            .ok()
            .and_then(|i| regs.get(i))
            .copied()
            .unwrap_or(0)
    };
    // SAFETY: the filter refused this exact call (it looks only at the number and the
    // arguments) and refuses it again, so the call never runs; the trap it raises ends the
    // process.
    unsafe {
        libc::syscall(
            reg(libc::REG_RAX),
            reg(libc::REG_RDI),
            reg(libc::REG_RSI),
            reg(libc::REG_RDX),
            reg(libc::REG_R10),
            reg(libc::REG_R8),
            reg(libc::REG_R9),
        )
    };
}

extern "C" fn kick_handler(
    _num: libc::c_int,
    _info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    let run = KVM_RUN.with(|c| c.get());
    if !run.is_null() {
        // SAFETY: `run` is this thread's own kvm_run mapping, set by the vCPU loop while it
        // owns the vCPU fd and cleared before the fd is dropped; immediate_exit is a plain
        // byte the kernel reads at KVM_RUN entry.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
    fence(Ordering::SeqCst);
}

fn install(signum: libc::c_int, handler: usize, extra_flags: libc::c_int) -> io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid "no flags, empty mask" value.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = handler;
    // No SA_RESTART: a kick must make KVM_RUN return EINTR.
    act.sa_flags = libc::SA_SIGINFO | extra_flags;
    // SAFETY: `act.sa_mask` is a valid sigset_t owned by us.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: `act` is fully initialised and the handler has the SA_SIGINFO signature.
    if unsafe { libc::sigaction(signum, &act, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Installs the SIGSYS reporter for the whole process. In the VM process it runs once: SIGSYS
/// goes back to its default action on entry (SA_RESETHAND), so the process dies by it.
pub fn install_sigsys_reporter(kind: SigsysReporter) -> io::Result<()> {
    IN_SUPERVISOR.store(kind == SigsysReporter::Supervisor, Ordering::Release);
    let flags = match kind {
        SigsysReporter::VmProcess => libc::SA_RESETHAND | libc::SA_NODEFER,
        SigsysReporter::Supervisor => libc::SA_NODEFER,
    };
    install(libc::SIGSYS, sigsys_handler as *const () as usize, flags)
}

extern "C" fn abort_handler(
    _num: libc::c_int,
    _info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // SAFETY: _exit(2) is async-signal-safe.
    unsafe { libc::_exit(128 + libc::SIGABRT) }
}

/// For a jailed VM process, the first process of its own pid namespace: the kernel drops
/// signals such a process sends itself while their action is the default, so abort()'s
/// SIGABRT would not end it (and abort() would go on to system calls its filters forbid).
/// This handler ends the process with the status a death by SIGABRT gives instead, which
/// the supervisor reads as one.
pub fn install_abort_exit() -> io::Result<()> {
    install(libc::SIGABRT, abort_handler as *const () as usize, 0)
}

/// Installs the VM process's SIGSYS reporter and the vCPU kick handler for the whole process.
pub fn install_handlers() -> io::Result<()> {
    install_sigsys_reporter(SigsysReporter::VmProcess)?;
    install(kick_signal(), kick_handler as *const () as usize, 0)
}

/// Blocks `signals` for the calling thread (and threads it starts later): one sent meanwhile
/// stays pending until [`unblock`].
pub fn block(signals: &[libc::c_int]) {
    mask(libc::SIG_BLOCK, signals);
}

/// Unblocks `signals` for the calling thread; a pending one is delivered now.
pub fn unblock(signals: &[libc::c_int]) {
    mask(libc::SIG_UNBLOCK, signals);
}

fn mask(how: libc::c_int, signals: &[libc::c_int]) {
    // SAFETY: an all-zero sigset_t is a valid buffer for sigemptyset; sigaddset only edits it;
    // pthread_sigmask reads the initialised set and does not want the old mask. It can only
    // fail for a bad `how`, which the two callers above do not pass.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Blocks `signals` for the calling thread (and threads it starts later) and returns a
/// non-blocking signalfd that reports them instead.
pub fn signalfd(signals: &[libc::c_int]) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: an all-zero sigset_t is a valid buffer for sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by us; sigaddset only edits it.
    unsafe {
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
    }
    // SAFETY: `set` is initialised; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        // pthread_sigmask returns its error rather than setting errno.
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: a new signalfd for an initialised mask.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned to us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// The next signal waiting on `fd` (a signalfd): its number, or None when there is none.
pub fn read_signal(fd: &std::os::fd::OwnedFd) -> Option<libc::c_int> {
    use std::os::fd::AsRawFd;
    // SAFETY: an all-zero signalfd_siginfo is a valid buffer.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: `info` is valid for writes of `size` bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), std::ptr::addr_of_mut!(info).cast(), size) };
    (usize::try_from(n).ok() == Some(size)).then_some(info.ssi_signo as libc::c_int)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violation_report_names_thread_and_syscall() {
        let mut buf = [0u8; 192];
        let mut name = [0u8; 16];
        name[..5].copy_from_slice(b"vcpu0");
        let n = format_violation(&mut buf, &name, 41);
        let line = std::str::from_utf8(&buf[..n]).unwrap();
        assert_eq!(
            line,
            "bulkhead: seccomp violation: thread vcpu0 made forbidden system call 41; ending with SIGSYS (status 159)\n"
        );
    }

    #[test]
    fn report_is_cut_rather_than_overflowing_a_small_buffer() {
        let mut buf = [0u8; 10];
        let n = format_violation(&mut buf, &[b'x'; 16], i64::MIN);
        assert_eq!(n, 10);
    }
}
