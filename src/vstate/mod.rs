//! VM state: the KVM handle, guest memory, the VM with its memslots and irqchip, and vCPUs.

pub mod coalesced;
pub mod dirty;
pub mod kvm;
pub mod memory;
pub mod pause;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
