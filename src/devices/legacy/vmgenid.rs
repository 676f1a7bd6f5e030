//! The VM generation ID (Microsoft's "Virtual Machine Generation ID", as QEMU and Firecracker
//! offer it): 16 random bytes at a fixed guest address that the ACPI tables name (`VMGENCTR`).
//! Every VM gets its own at boot; a VM restored from a snapshot gets a new one, and the Generic
//! Event Device's interrupt makes the guest look (`Notify (VGEN, 0x80)`). Linux's vmgenid driver
//! then mixes the new ID into its RNG and reseeds it at once, so two clones of one snapshot
//! never go on drawing the same random numbers.

use crate::vstate::dirty::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// The ID's size.
pub const VMGENID_LEN: usize = 16;

/// Why a new generation could not be made.
#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    #[error("cannot draw a VM generation ID: {0}")]
    Random(#[source] std::io::Error),
    #[error("cannot write the VM generation ID at {addr:#x}: {source}")]
    Write {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot raise the generation change interrupt: {0}")]
    Interrupt(#[source] std::io::Error),
}

/// The ID's place in guest memory and the interrupt that announces a new one.
pub struct VmGenId {
    addr: u64,
    irq: EventFd,
}

impl VmGenId {
    pub fn new(addr: u64, irq: EventFd) -> VmGenId {
        VmGenId { addr, irq }
    }

    /// Writes a fresh random ID (at boot, before the guest runs: no interrupt).
    pub fn write_new(&self, mem: &GuestMemoryMmap) -> Result<[u8; VMGENID_LEN], VmGenIdError> {
        let mut id = [0u8; VMGENID_LEN];
        crate::devices::virtio::rng::getrandom(&mut id).map_err(VmGenIdError::Random)?;
        mem.write_slice(&id, GuestAddress(self.addr))
            .map_err(|source| VmGenIdError::Write {
                addr: self.addr,
                source,
            })?;
        Ok(id)
    }

    /// A new generation for a restored VM: a fresh ID, then the interrupt (which the guest's
    /// interrupt controllers, restored by then, deliver once it runs).
    pub fn new_generation(&self, mem: &GuestMemoryMmap) -> Result<(), VmGenIdError> {
        self.write_new(mem)?;
        self.irq.write(1).map_err(VmGenIdError::Interrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_generation_writes_a_new_id_and_raises_the_interrupt() {
        let mem = crate::vstate::memory::create_guest_memory(
            16 << 20,
            crate::vstate::memory::Backing::Private,
            false,
        )
        .unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let gen = VmGenId::new(0xd_f000, irq.try_clone().unwrap());
        let first = gen.write_new(&mem).unwrap();
        assert!(irq.read().is_err(), "a boot's ID raises nothing");
        gen.new_generation(&mem).unwrap();
        let mut second = [0u8; VMGENID_LEN];
        mem.read_slice(&mut second, GuestAddress(0xd_f000)).unwrap();
        assert_ne!(first, second);
        assert_eq!(irq.read().unwrap(), 1);
    }
}
