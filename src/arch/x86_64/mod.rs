//! x86_64 board setup: memory layout, boot registers and tables, CPUID and MSRs.
//!
//! Everything here is pure setup: it writes guest memory or fills KVM structures and keeps no
//! runtime state.

pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;

/// Errors while preparing the x86_64 board.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("cannot write {what} at guest address {addr:#x}: {source}")]
    GuestWrite {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("the MP table for {0} vCPUs does not fit below 1 MiB")]
    MpTableTooBig(u32),
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot build the {0} list: too many entries")]
    FamList(&'static str),
}
