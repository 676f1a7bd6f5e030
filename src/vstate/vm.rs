//! The VM: its KVM fd, its guest memory registered as memslots, and its irqchip: the local
//! APICs in KVM, and either KVM's PIC, IOAPIC and PIT too or (split) nothing else, the IOAPIC
//! then being `devices::legacy::Ioapic` with its routes set here.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_enable_cap, kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1,
    kvm_irq_routing_msi, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KvmIrqRouting, KVM_CAP_SPLIT_IRQCHIP, KVM_CAP_X86_USER_SPACE_MSR, KVM_IRQ_ROUTING_MSI,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MSR_EXIT_REASON_FILTER, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{
    Cap, IoEventAddress, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd,
};
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::coalesced::{CoalescedError, CoalescedPort};
use super::dirty::{self, GuestMemoryMmap};

use super::memory::host_regions;
use crate::arch::x86_64::{layout, msr};
use crate::config::IrqChip;
use crate::devices::legacy::ioapic::{MsiMessage, MsiRoutes, PINS};
use crate::devices::virtio::worker::QueueNotifiers;

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
    #[error("the snapshot's irqchip is not the kind this VM was made with")]
    IrqchipMismatch,
    #[error("the VM does not track dirty pages (--track-dirty-pages): a diff snapshot needs it")]
    NotTracking,
    #[error("cannot read KVM's dirty log of memslot {slot}: {source}")]
    DirtyLog {
        slot: u32,
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

/// A VM's state outside its vCPUs and devices, as a snapshot keeps it.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmArchState {
    /// kvmclock: the guest's time base.
    pub clock: kvm_clock_data,
    /// KVM's PIC, IOAPIC and PIT, for a full irqchip (a split one's IOAPIC is bulkhead's own
    /// device and saved with the devices).
    pub irqchip: Option<KvmIrqchipState>,
}

/// KVM's own interrupt controllers and PIT.
#[derive(Clone, Serialize, Deserialize)]
pub struct KvmIrqchipState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
}

const IRQCHIP_PIC_MASTER: u32 = 0;
const IRQCHIP_PIC_SLAVE: u32 = 1;
const IRQCHIP_IOAPIC: u32 = 2;

/// One VM and the memory that belongs to it alone. A clone is another handle on the same VM
/// (the snapshot path holds one).
#[derive(Debug, Clone)]
pub struct Vm {
    /// Shared with the IOAPIC's routes ([`Vm::msi_routes`]) and the devices' queue notifiers
    /// ([`Vm::queue_notifiers`]).
    fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    msrs_filtered: bool,
    irqchip: IrqChip,
}

impl Vm {
    /// Creates the VM, filters its MSRs, registers exactly the regions of `memory` as
    /// memslots, and creates the irqchip `irqchip` asks for.
    pub fn new(kvm: &Kvm, memory: GuestMemoryMmap, irqchip: IrqChip) -> Result<Vm, VmError> {
        let fd = Arc::new(kvm.create_vm().map_err(VmError::Create)?);
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
            irqchip,
        };
        vm.register_memslots(kvm.get_nr_memslots())?;
        match irqchip {
            IrqChip::Split => {
                // Local APICs only; GSIs 0-23 are kept for the user-space IOAPIC's pins and
                // start with no route, so nothing reaches the guest until it unmasks a pin.
                let cap = kvm_enable_cap {
                    cap: KVM_CAP_SPLIT_IRQCHIP,
                    args: [PINS as u64, 0, 0, 0],
                    ..Default::default()
                };
                vm.fd
                    .enable_cap(&cap)
                    .map_err(setup("a split irqchip (KVM_CAP_SPLIT_IRQCHIP)"))?;
            }
            IrqChip::Full => {
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
            }
        }
        Ok(vm)
    }

    /// False when this KVM can not filter MSRs to user space (the guest then runs with KVM's
    /// own answers, and `msr_probe` can not fire).
    pub fn msrs_filtered(&self) -> bool {
        self.msrs_filtered
    }

    /// Reads the clock and, for a full irqchip, KVM's PIC, IOAPIC and PIT. The vCPUs must be
    /// paused.
    pub fn save_state(&self) -> Result<VmArchState, VmError> {
        let get = |what| move |source| VmError::Setup { what, source };
        let clock = self.fd.get_clock().map_err(get("reading the clock"))?;
        let irqchip = match self.irqchip {
            IrqChip::Split => None,
            IrqChip::Full => {
                let chip = |chip_id, what| {
                    let mut chip = kvm_irqchip {
                        chip_id,
                        ..Default::default()
                    };
                    self.fd.get_irqchip(&mut chip).map_err(get(what))?;
                    Ok::<_, VmError>(chip)
                };
                Some(KvmIrqchipState {
                    pic_master: chip(IRQCHIP_PIC_MASTER, "reading the master PIC")?,
                    pic_slave: chip(IRQCHIP_PIC_SLAVE, "reading the slave PIC")?,
                    ioapic: chip(IRQCHIP_IOAPIC, "reading the IOAPIC")?,
                    pit: self.fd.get_pit2().map_err(get("reading the PIT"))?,
                })
            }
        };
        Ok(VmArchState { clock, irqchip })
    }

    /// Sets a saved clock and irqchip on this VM, made with the same irqchip, before any vCPU
    /// runs.
    pub fn restore_state(&self, state: &VmArchState) -> Result<(), VmError> {
        let set = |what| move |source| VmError::Setup { what, source };
        // KVM takes no flags back but the ones that say which fields to set; the saved ones
        // describe the host it was read on.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(set("the clock"))?;
        match (&state.irqchip, self.irqchip) {
            (Some(chips), IrqChip::Full) => {
                for chip in [&chips.pic_master, &chips.pic_slave, &chips.ioapic] {
                    self.fd.set_irqchip(chip).map_err(set("an irqchip"))?;
                }
                self.fd.set_pit2(&chips.pit).map_err(set("the PIT"))?;
            }
            (None, IrqChip::Split) => {}
            _ => return Err(VmError::IrqchipMismatch),
        }
        Ok(())
    }

    fn register_memslots(&self, max_slots: usize) -> Result<(), VmError> {
        let regions = host_regions(&self.memory);
        if regions.len() > max_slots {
            return Err(VmError::TooManyRegions {
                regions: regions.len(),
                slots: max_slots,
            });
        }
        // KVM logs the guest's writes to a region whose own log (of the VMM's writes) is on.
        let flags = if self.tracks_dirty_pages() {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, (guest_addr, size, host_addr)) in (0u32..).zip(regions) {
            let region = kvm_userspace_memory_region {
                slot,
                flags,
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

    /// Whether guest RAM logs the pages that change (it was made with `track_dirty`).
    pub fn tracks_dirty_pages(&self) -> bool {
        self.memory.iter().all(|r| dirty::log_of(r).tracking()) && self.memory.num_regions() > 0
    }

    /// The pages written since the last call, per region (memslot), one bit per page: the
    /// guest's writes from KVM's log and the VMM's own from the regions' logs. Both logs are
    /// cleared. The vCPUs must be paused and the devices idle, or a write can land between
    /// the two reads and be in neither this answer nor the next.
    pub fn take_dirty_pages(&self) -> Result<Vec<Vec<u64>>, VmError> {
        if !self.tracks_dirty_pages() {
            return Err(VmError::NotTracking);
        }
        let mut taken = Vec::with_capacity(self.memory.num_regions());
        for (slot, region) in (0u32..).zip(self.memory.iter()) {
            let len = usize::try_from(region.len()).unwrap_or(usize::MAX);
            let mut pages = match self.fd.get_dirty_log(slot, len) {
                Ok(pages) => pages,
                Err(source) => {
                    // The slots read so far were cleared: their pages go back for the next
                    // diff.
                    self.return_dirty_pages(&taken);
                    return Err(VmError::DirtyLog { slot, source });
                }
            };
            for (word, vmm) in pages.iter_mut().zip(dirty::log_of(region).take()) {
                *word |= vmm;
            }
            taken.push(pages);
        }
        Ok(taken)
    }

    /// Puts pages taken by [`Vm::take_dirty_pages`] back (into the VMM's log), for when the
    /// diff they were taken for was not written: the next diff must still have them.
    pub fn return_dirty_pages(&self, taken: &[Vec<u64>]) {
        for (region, words) in self.memory.iter().zip(taken) {
            let pages = usize::try_from(region.len()).unwrap_or(0) / dirty::PAGE_SIZE;
            for page in (0..pages).filter(|&p| dirty::page_set(words, p)) {
                dirty::log_of(region).mark_dirty(page * dirty::PAGE_SIZE, dirty::PAGE_SIZE);
            }
        }
    }

    /// Makes a write to `evt` raise `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Queue notifications at MMIO `addr` (a QUEUE_NOTIFY register), for a device's worker to
    /// move into KVM when the driver starts the device.
    pub fn queue_notifiers(&self, addr: u64) -> KvmQueueNotifiers {
        KvmQueueNotifiers {
            fd: self.fd.clone(),
            addr,
        }
    }

    /// KVM's ring of held-back writes to `port`, mapped through `vcpu` (any of this VM's), its
    /// zone registered while `wanted` is set; None when this KVM has no coalesced port I/O.
    pub fn coalesced_port(
        &self,
        kvm: &Kvm,
        vcpu: &impl std::os::fd::AsRawFd,
        port: u16,
        wanted: Arc<AtomicBool>,
    ) -> Result<Option<CoalescedPort>, CoalescedError> {
        CoalescedPort::new(kvm, self.fd.clone(), vcpu, port, wanted)
    }

    /// The GSI routing table, for the user-space IOAPIC of a split irqchip.
    pub fn msi_routes(&self) -> KvmMsiRoutes {
        KvmMsiRoutes {
            fd: self.fd.clone(),
        }
    }
}

/// Attaches ioeventfds: a 32-bit guest write of the queue's index to `addr` signals its
/// eventfd inside KVM, with no exit to user space.
pub struct KvmQueueNotifiers {
    fd: Arc<VmFd>,
    addr: u64,
}

impl QueueNotifiers for KvmQueueNotifiers {
    fn attach(&self, queue: u32, evt: &EventFd) -> Result<(), std::io::Error> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(self.addr), queue)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// Sets KVM's GSI routes from the IOAPIC's pins (GSI n is pin n); the irqfds registered on
/// those GSIs follow the new routes inside KVM.
pub struct KvmMsiRoutes {
    fd: Arc<VmFd>,
}

impl MsiRoutes for KvmMsiRoutes {
    fn set_routes(&self, routes: &[Option<MsiMessage>; PINS]) -> Result<(), std::io::Error> {
        let no_memory = |_| std::io::Error::from_raw_os_error(libc::ENOMEM);
        let mut table = KvmIrqRouting::new(0).map_err(no_memory)?;
        for (gsi, msi) in (0u32..).zip(routes) {
            let Some(msi) = msi else { continue };
            table
                .push(kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    u: kvm_irq_routing_entry__bindgen_ty_1 {
                        msi: kvm_irq_routing_msi {
                            address_lo: msi.address,
                            data: msi.data,
                            ..Default::default()
                        },
                    },
                    ..Default::default()
                })
                .map_err(no_memory)?;
        }
        self.fd
            .set_gsi_routing(&table)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
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
