//! x86_64 board setup: memory layout, boot registers and tables, CPUID and MSRs.
//!
//! Everything here is pure setup: it writes guest memory or fills KVM structures and keeps no
//! runtime state.

pub mod acpi;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
pub mod reset_vector;

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
    #[error("the ACPI tables need more than the {0} bytes reserved for them below 1 MiB")]
    AcpiTooBig(u64),
    #[error("the DSDT can name at most 1000 virtio devices, not {0}")]
    AcpiTooManyDevices(usize),
    #[error("a device at {0:#x} is outside the 32-bit space the DSDT can describe")]
    AcpiAddress(u64),
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot build the {0} list: too many entries")]
    FamList(&'static str),
}
