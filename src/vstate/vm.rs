//! The VM: its KVM fd, its guest memory registered as memslots, and the in-kernel irqchip.

use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, KVM_CAP_X86_USER_SPACE_MSR,
    KVM_MSR_EXIT_REASON_FILTER, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{
    Cap, IoEventAddress, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd,
};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::memory::host_regions;
use crate::arch::x86_64::{layout, msr};

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot create the VM: {0}")]
    Create(#[source] kvm_ioctls::Error),
    #[error("KVM refused {what}: {source}")]
    Setup {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory has {regions} regions but KVM offers only {slots} memslots")]
    TooManyRegions { regions: usize, slots: usize },
    #[error("cannot register guest RAM at {addr:#x} ({size} bytes) as memslot {slot}: {source}")]
    Memslot {
        slot: u32,
        addr: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot attach an ioeventfd at MMIO {addr:#x} (value {value}): {source}")]
    Ioeventfd {
        addr: u64,
        value: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot route GSI {gsi} to an eventfd: {source}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// One VM and the memory that belongs to it alone.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    memory: GuestMemoryMmap,
    msrs_filtered: bool,
}

impl Vm {
    /// Creates the VM, filters its MSRs, registers exactly the regions of `memory` as
    /// memslots, and creates the in-kernel PIC/IOAPIC/LAPIC and PIT.
    pub fn new(kvm: &Kvm, memory: GuestMemoryMmap) -> Result<Vm, VmError> {
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        // First: once the VM has memslots or an irqchip, KVM waits out an SRCU grace period
        // to swap MSR filters, 15 ms on this project's hosts; before, it takes microseconds.
        let msrs_filtered = filter_msrs(kvm, &fd)?;
        let setup = |what| move |source| VmError::Setup { what, source };
        fd.set_tss_address(layout::KVM_TSS_ADDRESS)
            .map_err(setup("the TSS address"))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(setup("the identity map address"))?;
        let vm = Vm {
            fd,
            memory,
            msrs_filtered,
        };
        vm.register_memslots(kvm.get_nr_memslots())?;
        vm.fd
            .create_irq_chip()
            .map_err(setup("creating the irqchip"))?;
        // The dummy speaker makes port 0x61 an in-kernel device too, as Linux's PIT
        // calibration expects.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.fd.create_pit2(pit).map_err(setup("creating the PIT"))?;
        Ok(vm)
    }

    /// False when this KVM can not filter MSRs to user space (the guest then runs with KVM's
    /// own answers, and `msr_probe` can not fire).
    pub fn msrs_filtered(&self) -> bool {
        self.msrs_filtered
    }

    fn register_memslots(&self, max_slots: usize) -> Result<(), VmError> {
        let regions = host_regions(&self.memory);
        if regions.len() > max_slots {
            return Err(VmError::TooManyRegions {
                regions: regions.len(),
                slots: max_slots,
            });
        }
        for (slot, (guest_addr, size, host_addr)) in (0u32..).zip(regions) {
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: guest_addr,
                memory_size: size,
                userspace_addr: host_addr,
            };
            // SAFETY: `host_addr..host_addr+size` is a live mapping owned by `self.memory`,
            // which lives as long as the VM fd; the regions come from one GuestMemoryMmap, so
            // they do not overlap in guest-physical space.
            unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| {
                VmError::Memslot {
                    slot,
                    addr: guest_addr,
                    size,
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Makes a write to `evt` raise `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }

    /// Makes a 32-bit guest write of `value` to MMIO `addr` signal `evt` inside KVM, with no
    /// exit to user space.
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        value: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), value)
            .map_err(|source| VmError::Ioeventfd {
                addr,
                value,
                source,
            })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}

/// Sends guest accesses to MSRs outside the allow-list (`msr::ALLOWED_MSR_RANGES`) to
/// user space, where they are answered with #GP and reported, instead of KVM answering
/// them silently. False when this KVM can not filter MSRs (the guest then runs with
/// KVM's own answers and `msr_probe` can not fire).
fn filter_msrs(kvm: &Kvm, fd: &VmFd) -> Result<bool, VmError> {
    if !kvm.check_extension(Cap::X86UserSpaceMsr) || !kvm.check_extension(Cap::X86MsrFilter) {
        return Ok(false);
    }
    let setup = |what| move |source| VmError::Setup { what, source };
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        args: [u64::from(KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
        ..Default::default()
    };
    fd.enable_cap(&cap)
        .map_err(setup("MSR exits to user space"))?;
    // Every bit set: the ranges are allowed whole.
    let bitmap = [0xffu8; 0x600];
    let ranges: Vec<MsrFilterRange<'_>> = msr::ALLOWED_MSR_RANGES
        .iter()
        .map(|&(base, msr_count)| MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base,
            msr_count,
            bitmap: &bitmap,
        })
        .collect();
    fd.set_msr_filter(MsrFilterDefaultAction::DENY, &ranges)
        .map_err(setup("the MSR filter"))?;
    Ok(true)
}
