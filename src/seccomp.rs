//! Per-thread-role seccomp filters, compiled from seccomp/*.json by build.rs and embedded.
//!
//! Every filter's default action is trap: the SIGSYS handler in [`crate::signal`] reports the
//! thread and system call and ends the process. This module only loads and installs filters;
//! the owner of each thread decides when (always before the thread touches guest input).

use seccompiler::{sock_filter, BpfProgram};

static VMM_BPF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vmm.bpf"));
static VCPU_BPF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vcpu.bpf"));
static SUPERVISOR_BPF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/supervisor.bpf"));

/// The roles a bulkhead thread can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadRole {
    /// The main thread: event loop, device back-ends, VM lifecycle.
    Vmm,
    /// A vCPU thread: KVM_RUN and the exit handlers.
    Vcpu,
    /// The supervisor process, once the VM process is running: watching, writing outputs,
    /// ending the VM.
    Supervisor,
}

impl ThreadRole {
    pub fn name(self) -> &'static str {
        match self {
            ThreadRole::Vmm => "vmm",
            ThreadRole::Vcpu => "vcpu",
            ThreadRole::Supervisor => "supervisor",
        }
    }

    fn bpf(self) -> &'static [u8] {
        match self {
            ThreadRole::Vmm => VMM_BPF,
            ThreadRole::Vcpu => VCPU_BPF,
            ThreadRole::Supervisor => SUPERVISOR_BPF,
        }
    }
}

/// Errors loading or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("the embedded {0} filter is malformed")]
    Malformed(&'static str),
    #[error("the {0} filter needs the VM process's pid")]
    NoVmPid(&'static str),
    #[error("cannot install the {role} seccomp filter: {source}")]
    Install {
        role: &'static str,
        #[source]
        source: seccompiler::Error,
    },
}

/// In seccomp/*.json, the calling process's pid: `tgkill` may signal this process only, so a
/// thread taken over can not signal the supervisor (or anyone else).
const OWN_PID: u32 = 0x7fff_fff1;
/// In seccomp/*.json, SIGRTMIN, which libc decides at run time.
const SIGRTMIN: u32 = 0x7fff_fff2;
/// In seccomp/supervisor.json, the VM process's pid: the only process the supervisor may kill.
const VM_PID: u32 = 0x7fff_fff3;
/// In seccomp/*.json, the id of the thread installing the filter: musl's abort() raises SIGABRT
/// with tkill(2), which names no process, so it may name this thread alone.
const OWN_TID: u32 = 0x7fff_fff4;
/// In seccomp/supervisor.json, the ids of the supervisor's other threads (started before its
/// filter, which goes on all threads at once), for their abort(); the installing thread's id
/// where there are fewer.
const OTHER_TIDS: [u32; 2] = [0x7fff_fff5, 0x7fff_fff6];
/// `BPF_JMP | BPF_JEQ | BPF_K`; build.rs checks the placeholders appear nowhere else.
const JEQ_K: u16 = 0x15;

/// Decodes the embedded BPF program for `role`, with the run-time values patched in for the
/// calling process; `vm_pid` is the VM process the supervisor watches (its role needs it).
pub fn program(role: ThreadRole, vm_pid: Option<libc::pid_t>) -> Result<BpfProgram, SeccompError> {
    program_for_threads(role, vm_pid, &[])
}

/// [`program`], with `others` the ids of the process's other threads a filter installed on
/// all threads at once covers (the supervisor's; two at most are listed).
fn program_for_threads(
    role: ThreadRole,
    vm_pid: Option<libc::pid_t>,
    others: &[libc::pid_t],
) -> Result<BpfProgram, SeccompError> {
    let bytes = role.bpf();
    if bytes.is_empty() || bytes.len() % 8 != 0 {
        return Err(SeccompError::Malformed(role.name()));
    }
    let malformed = |_| SeccompError::Malformed(role.name());
    // SAFETY: getpid has no preconditions.
    let pid = u32::try_from(unsafe { libc::getpid() }).map_err(malformed)?;
    // SAFETY: gettid has no preconditions.
    let tid = u32::try_from(unsafe { libc::gettid() }).map_err(malformed)?;
    let mut other_tids = [tid; OTHER_TIDS.len()];
    for (slot, &other) in other_tids.iter_mut().zip(others) {
        *slot = u32::try_from(other).map_err(malformed)?;
    }
    let rtmin = u32::try_from(crate::signal::kick_signal()).map_err(malformed)?;
    let vm_pid = vm_pid.map(u32::try_from).transpose().map_err(malformed)?;
    // Sized at once: collecting into a Result grows the vector a doubling at a time.
    let mut program = Vec::with_capacity(bytes.len() / 8);
    for c in bytes.chunks_exact(8) {
        let mut insn = sock_filter {
            code: u16::from_le_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        };
        if insn.code == JEQ_K {
            insn.k = match insn.k {
                OWN_PID => pid,
                OWN_TID => tid,
                SIGRTMIN => rtmin,
                VM_PID => vm_pid.ok_or(SeccompError::NoVmPid(role.name()))?,
                k => OTHER_TIDS
                    .iter()
                    .zip(other_tids)
                    .find(|(&placeholder, _)| placeholder == k)
                    .map_or(k, |(_, other)| other),
            };
        }
        program.push(insn);
    }
    Ok(program)
}

/// Installs `role`'s filter on the calling thread (and threads it creates later).
pub fn apply(role: ThreadRole) -> Result<(), SeccompError> {
    let program = program(role, None)?;
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install {
        role: role.name(),
        source,
    })
}

/// Confines the supervisor: its filter on every thread of the process at once (TSYNC: its
/// HTTP thread was started before), with `vm_pid` the one process it may signal.
pub fn confine_supervisor(vm_pid: libc::pid_t) -> Result<(), SeccompError> {
    let role = ThreadRole::Supervisor;
    // SAFETY: gettid has no preconditions.
    let own = unsafe { libc::gettid() };
    // The other threads running now, which the filter covers too: their abort() is tkill on
    // themselves. (Beyond two, or unlisted, a thread's abort() is a refused call.)
    // SAFETY: getpid has no preconditions.
    let others: Vec<libc::pid_t> = crate::procfs::threads(unsafe { libc::getpid() })
        .unwrap_or_default()
        .into_iter()
        .filter(|&t| t != own)
        .collect();
    let program = program_for_threads(role, Some(vm_pid), &others)?;
    seccompiler::apply_filter_all_threads(&program).map_err(|source| SeccompError::Install {
        role: role.name(),
        source,
    })
}

/// The interpreter build.rs checks the dispatch with, for the tests below.
#[cfg(test)]
#[path = "../build/bpf_run.rs"]
mod bpf_run;

/// The shortening build.rs applies, for its own tests (the build checks only the filters as
/// they are; these check what those do not exercise).
#[cfg(test)]
#[path = "../build/bpf_opt.rs"]
mod bpf_opt;

#[cfg(test)]
mod tests {
    use super::*;

    const SECCOMP_RET_TRAP: u32 = 0x0003_0000;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

    /// Runs `prog` the way the kernel does for system call `nr` with `args` and returns the
    /// action.
    fn verdict(prog: &[sock_filter], nr: i64, args: [u64; 6]) -> u32 {
        super::bpf_run::run(prog, nr as u32, AUDIT_ARCH_X86_64, args)
    }

    fn allowed(prog: &[sock_filter], nr: i64, args: [u64; 6]) -> bool {
        match verdict(prog, nr, args) {
            SECCOMP_RET_ALLOW => true,
            SECCOMP_RET_TRAP => false,
            other => panic!("unexpected action {other:#x}"),
        }
    }

    fn pid() -> u64 {
        // SAFETY: getpid has no preconditions.
        unsafe { libc::getpid() as u64 }
    }

    const ROLES: [ThreadRole; 3] = [ThreadRole::Vmm, ThreadRole::Vcpu, ThreadRole::Supervisor];
    const SOME_VM: libc::pid_t = 4242;

    #[test]
    fn every_role_traps_what_it_does_not_allow() {
        for role in ROLES {
            let prog = program(role, Some(SOME_VM)).unwrap();
            let wake = (libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG) as u64;
            assert!(
                allowed(&prog, libc::SYS_futex, [0, wake, 1, 0, 0, 0]),
                "{role:?}"
            );
            assert!(!allowed(&prog, libc::SYS_execve, [0; 6]), "{role:?}");
            assert!(!allowed(&prog, libc::SYS_ptrace, [0; 6]), "{role:?}");
        }
    }

    #[test]
    fn the_vmm_and_vcpu_filters_allow_only_the_arguments_the_runtime_uses() {
        let private = |op: i32| (op | libc::FUTEX_PRIVATE_FLAG) as u64;
        let (rw, anon) = (
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
        );
        for role in [ThreadRole::Vmm, ThreadRole::Vcpu] {
            let prog = program(role, None).unwrap();
            let futex = |op: u64| allowed(&prog, libc::SYS_futex, [0, op, 0, 0, 0, 0]);
            assert!(futex(private(libc::FUTEX_WAIT)) && futex(private(libc::FUTEX_WAKE)));
            assert!(futex(private(libc::FUTEX_WAIT_BITSET)));
            assert!(!futex(libc::FUTEX_WAIT as u64), "{role:?}: shared futex");
            assert!(
                !futex(private(libc::FUTEX_CMP_REQUEUE)),
                "{role:?}: requeue"
            );
            assert!(!futex(private(libc::FUTEX_LOCK_PI)), "{role:?}: PI");
            let mmap = |prot: u64, flags: u64| {
                allowed(&prog, libc::SYS_mmap, [0, 4096, prot, flags, u64::MAX, 0])
            };
            assert!(mmap(rw, anon) && mmap(0, anon | libc::MAP_NORESERVE as u64));
            assert!(!mmap(rw | libc::PROT_EXEC as u64, anon), "{role:?}: exec");
            assert!(!mmap(rw, (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u64));
            assert!(!mmap(rw, libc::MAP_PRIVATE as u64), "{role:?}: a file");
            assert!(!mmap(rw, anon | libc::MAP_FIXED as u64), "{role:?}: fixed");
            let madvise =
                |advice: i32| allowed(&prog, libc::SYS_madvise, [0, 4096, advice as u64, 0, 0, 0]);
            assert!(madvise(libc::MADV_DONTNEED));
            assert!(!madvise(libc::MADV_MERGEABLE) && !madvise(libc::MADV_DONTFORK));
            let mremap =
                |flags: i32| allowed(&prog, libc::SYS_mremap, [0, 4096, 8192, flags as u64, 0, 0]);
            assert!(mremap(libc::MREMAP_MAYMOVE));
            assert!(!mremap(libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED));
        }
        let vmm = program(ThreadRole::Vmm, None).unwrap();
        let socket = |domain: i32, kind: i32, protocol: u64| {
            allowed(
                &vmm,
                libc::SYS_socket,
                [domain as u64, kind as u64, protocol, 0, 0, 0],
            )
        };
        let stream = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        // No socket of any kind, and no connect: the supervisor's broker connects guest
        // connections to host sockets.
        assert!(!socket(libc::AF_UNIX, stream, 0));
        assert!(!allowed(&vmm, libc::SYS_connect, [3, 0, 110, 0, 0, 0]));
        assert!(!socket(libc::AF_UNIX, libc::SOCK_STREAM, 0), "blocking");
        assert!(!socket(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0
        ));
        assert!(!socket(libc::AF_UNIX, stream, 1));
        assert!(!socket(libc::AF_INET, stream, 0));
        assert!(!socket(libc::AF_NETLINK, stream, 0));
    }

    #[test]
    fn tgkill_reaches_only_this_process_in_every_role() {
        let own = pid();
        let sigsys = libc::SIGSYS as u64;
        let sigabrt = libc::SIGABRT as u64;
        for role in ROLES {
            let prog = program(role, Some(SOME_VM)).unwrap();
            let tgkill =
                |tgid: u64, sig: u64| allowed(&prog, libc::SYS_tgkill, [tgid, 7, sig, 0, 0, 0]);
            assert!(tgkill(own, sigabrt), "{role:?}: abort()");
            assert!(!tgkill(own + 1, sigabrt), "{role:?}: another process");
            assert!(!tgkill(1, libc::SIGKILL as u64), "{role:?}: init");
            assert!(!tgkill(own, libc::SIGKILL as u64), "{role:?}: SIGKILL");
            if role != ThreadRole::Supervisor {
                assert!(tgkill(own, sigsys), "{role:?}: the SIGSYS reporter");
                assert!(!tgkill(own + 1, sigsys), "{role:?}: SIGSYS elsewhere");
            }
        }
        let vmm = program(ThreadRole::Vmm, None).unwrap();
        let kick = crate::signal::kick_signal() as u64;
        assert!(allowed(&vmm, libc::SYS_tgkill, [own, 7, kick, 0, 0, 0]));
        assert!(!allowed(
            &vmm,
            libc::SYS_tgkill,
            [own + 1, 7, kick, 0, 0, 0]
        ));
    }

    #[test]
    fn the_supervisors_other_threads_may_abort_themselves_and_no_one_else() {
        // SAFETY: gettid has no preconditions.
        let own = unsafe { libc::gettid() } as u64;
        let (broker, http) = (own + 100, own + 200);
        let prog = program_for_threads(
            ThreadRole::Supervisor,
            Some(SOME_VM),
            &[broker as i32, http as i32],
        )
        .unwrap();
        let tkill =
            |tid: u64, sig: i32| allowed(&prog, libc::SYS_tkill, [tid, sig as u64, 0, 0, 0, 0]);
        for t in [own, broker, http] {
            assert!(tkill(t, libc::SIGABRT), "{t}");
            assert!(!tkill(t, libc::SIGKILL), "{t}: SIGKILL");
        }
        assert!(!tkill(own + 300, libc::SIGABRT), "a thread not listed");
        assert!(!tkill(SOME_VM as u64, libc::SIGABRT), "the VM process");
    }

    #[test]
    fn tkill_reaches_only_the_thread_that_installed_the_filter_and_only_to_abort() {
        // SAFETY: gettid has no preconditions.
        let own = unsafe { libc::gettid() } as u64;
        let sigabrt = libc::SIGABRT as u64;
        for role in ROLES {
            let prog = program(role, Some(SOME_VM)).unwrap();
            let tkill =
                |tid: u64, sig: u64| allowed(&prog, libc::SYS_tkill, [tid, sig, 0, 0, 0, 0]);
            assert!(tkill(own, sigabrt), "{role:?}: musl's abort()");
            assert!(!tkill(own + 1, sigabrt), "{role:?}: another thread");
            assert!(!tkill(SOME_VM as u64, sigabrt), "{role:?}: the VM process");
            assert!(!tkill(own, libc::SIGKILL as u64), "{role:?}: SIGKILL");
            assert!(!tkill(own, libc::SIGSYS as u64), "{role:?}: SIGSYS");
        }
    }

    #[test]
    fn the_supervisor_may_only_stop_or_kill_its_vm_process() {
        let prog = program(ThreadRole::Supervisor, Some(SOME_VM)).unwrap();
        let kill = |pid: i64, sig: i32| {
            allowed(&prog, libc::SYS_kill, [pid as u64, sig as u64, 0, 0, 0, 0])
        };
        assert!(kill(SOME_VM.into(), libc::SIGTERM));
        assert!(kill(SOME_VM.into(), libc::SIGKILL));
        assert!(!kill(SOME_VM.into(), libc::SIGSTOP));
        assert!(!kill(SOME_VM as i64 + 1, libc::SIGKILL));
        assert!(!kill(-1, libc::SIGKILL));
        assert!(!kill(0, libc::SIGTERM));
        assert!(matches!(
            program(ThreadRole::Supervisor, None),
            Err(SeccompError::NoVmPid(_))
        ));
    }

    #[test]
    fn no_placeholder_is_left_in_a_filter() {
        for role in ROLES {
            let prog = program(role, Some(SOME_VM)).unwrap();
            assert!(
                !prog
                    .iter()
                    .any(|i| [OWN_PID, SIGRTMIN, VM_PID].contains(&i.k)),
                "{role:?} kept a placeholder"
            );
        }
    }

    #[test]
    fn vcpu_filter_is_stricter_than_vmm_filter() {
        let len = |role| program(role, None).unwrap().len();
        assert!(len(ThreadRole::Vcpu) < len(ThreadRole::Vmm));
    }
}
