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
/// `BPF_JMP | BPF_JEQ | BPF_K`; build.rs checks the placeholders appear nowhere else.
const JEQ_K: u16 = 0x15;

/// Decodes the embedded BPF program for `role`, with the run-time values patched in for the
/// calling process.
pub fn program(role: ThreadRole) -> Result<BpfProgram, SeccompError> {
    let bytes = role.bpf();
    if bytes.is_empty() || bytes.len() % 8 != 0 {
        return Err(SeccompError::Malformed(role.name()));
    }
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let pid = u32::try_from(pid).map_err(|_| SeccompError::Malformed(role.name()))?;
    let rtmin = u32::try_from(crate::signal::kick_signal())
        .map_err(|_| SeccompError::Malformed(role.name()))?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| {
            let mut insn = sock_filter {
                code: u16::from_le_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            };
            if insn.code == JEQ_K {
                insn.k = match insn.k {
                    OWN_PID => pid,
                    SIGRTMIN => rtmin,
                    k => k,
                };
            }
            insn
        })
        .collect())
}

/// Installs `role`'s filter on the calling thread (and threads it creates later).
pub fn apply(role: ThreadRole) -> Result<(), SeccompError> {
    let program = program(role)?;
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install {
        role: role.name(),
        source,
    })
}

/// Installs `role`'s filter on every thread of the process at once (TSYNC): for a process
/// whose helper threads were started before it confines itself.
pub fn apply_all_threads(role: ThreadRole) -> Result<(), SeccompError> {
    let program = program(role)?;
    seccompiler::apply_filter_all_threads(&program).map_err(|source| SeccompError::Install {
        role: role.name(),
        source,
    })
}

/// Makes a system call no filter allows, to prove the filters work (debug builds only).
#[cfg(debug_assertions)]
pub fn forbidden_syscall() {
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

/// The parent process's pid, read before a thread confines itself (no filter allows getppid).
#[cfg(debug_assertions)]
pub fn parent_pid() -> libc::pid_t {
    // SAFETY: getppid has no preconditions.
    unsafe { libc::getppid() }
}

/// Tries to kill `parent` (the supervisor) with tgkill, as a thread taken over by a guest
/// might (debug builds only). The filters allow tgkill on this process alone.
#[cfg(debug_assertions)]
pub fn signal_parent(parent: libc::pid_t) {
    // SAFETY: tgkill with integer arguments touches no memory.
    unsafe {
        libc::syscall(libc::SYS_tgkill, parent, parent, libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BPF_RET: u16 = 0x06;
    const SECCOMP_RET_TRAP: u32 = 0x0003_0000;

    #[test]
    fn every_role_has_a_filter_that_traps_by_default() {
        for role in [ThreadRole::Vmm, ThreadRole::Vcpu, ThreadRole::Supervisor] {
            let prog = program(role).unwrap();
            assert!(prog.len() > 10, "{role:?} filter is suspiciously short");
            // The mismatch action is a `ret TRAP` somewhere in the program.
            assert!(
                prog.iter()
                    .any(|i| i.code == BPF_RET && i.k == SECCOMP_RET_TRAP),
                "{role:?} filter never traps"
            );
        }
    }

    #[test]
    fn tgkill_is_limited_to_this_process_in_every_role() {
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() } as u32;
        for role in [ThreadRole::Vmm, ThreadRole::Vcpu, ThreadRole::Supervisor] {
            let prog = program(role).unwrap();
            assert!(
                prog.iter().any(|i| i.code == JEQ_K && i.k == pid),
                "{role:?} never compares with this process's pid"
            );
            assert!(
                !prog.iter().any(|i| i.k == OWN_PID || i.k == SIGRTMIN),
                "{role:?} kept a placeholder"
            );
        }
    }

    #[test]
    fn vcpu_filter_is_stricter_than_vmm_filter() {
        assert!(program(ThreadRole::Vcpu).unwrap().len() < program(ThreadRole::Vmm).unwrap().len());
    }
}
