//! Per-thread-role seccomp filters, compiled from seccomp/*.json by build.rs and embedded.
//!
//! Every filter's default action is trap: the SIGSYS handler in [`crate::signal`] reports the
//! thread and system call and ends the process. This module only loads and installs filters;
//! the owner of each thread decides when (always before the thread touches guest input).

use seccompiler::{sock_filter, BpfProgram};

static VMM_BPF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vmm.bpf"));
static VCPU_BPF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vcpu.bpf"));

/// The roles a bulkhead thread can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadRole {
    /// The main thread: event loop, device back-ends, VM lifecycle.
    Vmm,
    /// A vCPU thread: KVM_RUN and the exit handlers.
    Vcpu,
}

impl ThreadRole {
    pub fn name(self) -> &'static str {
        match self {
            ThreadRole::Vmm => "vmm",
            ThreadRole::Vcpu => "vcpu",
        }
    }

    fn bpf(self) -> &'static [u8] {
        match self {
            ThreadRole::Vmm => VMM_BPF,
            ThreadRole::Vcpu => VCPU_BPF,
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

/// Decodes the embedded BPF program for `role`.
pub fn program(role: ThreadRole) -> Result<BpfProgram, SeccompError> {
    let bytes = role.bpf();
    if bytes.is_empty() || bytes.len() % 8 != 0 {
        return Err(SeccompError::Malformed(role.name()));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| sock_filter {
            code: u16::from_le_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
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

#[cfg(test)]
mod tests {
    use super::*;

    const BPF_RET: u16 = 0x06;
    const SECCOMP_RET_TRAP: u32 = 0x0003_0000;

    #[test]
    fn every_role_has_a_filter_that_traps_by_default() {
        for role in [ThreadRole::Vmm, ThreadRole::Vcpu] {
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
    fn vcpu_filter_is_stricter_than_vmm_filter() {
        assert!(program(ThreadRole::Vcpu).unwrap().len() < program(ThreadRole::Vmm).unwrap().len());
    }
}
