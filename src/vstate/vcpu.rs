//! A vCPU: its setup, and the run loop that sends each KVM exit to its handler.
//!
//! Everything a guest can put in an exit (ports, addresses, data) is untrusted. Port and MMIO
//! accesses go to the buses, which refuse what they do not understand; abnormal exits end the
//! VM with a distinct reason. Nothing here panics on guest data.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

use crate::vstate::dirty::GuestMemoryMmap;
use kvm_bindings::{
    kvm_mp_state, CpuId, KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_UNINITIALIZED, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::coalesced::{CoalescedPort, WrittenPort};
use super::pause::PauseGate;
use super::vcpu_state::{self, VcpuState};
use super::vm::Vm;
use crate::arch::x86_64::regs::{self, EntryMode};
use crate::arch::x86_64::{cpuid, msr, ArchError};
use crate::devices::{Bus, BusAccess};
use crate::exit::{ExitSignal, ResetVia, VmExitReason};
use crate::telemetry::{Event, ExitKind, Reporter, VmCounter};
use crate::{debug_limited, signal, warn_limited};

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;
const RFLAGS_IF: u64 = 1 << 9;

/// Errors creating, configuring or running a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}: {source}")]
    Create {
        index: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot configure vCPU {index}: {what}: {source}")]
    Configure {
        index: u32,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted only {set} of {wanted} boot MSRs on vCPU {index}")]
    Msrs {
        index: u32,
        set: usize,
        wanted: usize,
    },
    #[error(transparent)]
    Arch(#[from] ArchError),
    #[error("cannot restore vCPU {index}: {source}")]
    Restore {
        index: u32,
        #[source]
        source: vcpu_state::VcpuStateError,
    },
}

/// Where the boot vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    pub entry: u64,
    pub mode: EntryMode,
}

/// What a vCPU shares with the VMM thread while it runs.
#[derive(Debug, Default)]
pub struct VcpuShared {
    /// The thread's kernel id, published when the thread starts.
    pub tid: AtomicI32,
    /// Set by the VMM before a kick: check whether this vCPU can ever run again.
    pub check_halt: AtomicBool,
    /// This vCPU was last seen halted with interrupts off, or waiting for a startup IPI.
    pub stuck: AtomicBool,
}

/// What the run loop dispatches guest accesses to and reports into.
pub struct VcpuIo {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub reporter: Reporter,
    pub exit: Arc<ExitSignal>,
    /// Where a kicked vCPU parks while the VM is paused (for a snapshot).
    pub pause: Arc<PauseGate>,
    /// KVM's MSR index list: the MSRs a snapshot saves.
    pub msr_list: Arc<[u32]>,
    /// Port writes KVM holds back in its ring (the UART's data register), when it can.
    pub coalesced: Option<Arc<CoalescedPort>>,
}

impl VcpuIo {
    /// Handles the port writes KVM held back, oldest first: before any exit is handled, so
    /// nothing the guest did after them is seen before them. Returns how many.
    pub fn drain_coalesced(&self) -> u64 {
        let Some(ring) = &self.coalesced else {
            return 0;
        };
        self.count_coalesced(ring.drain(&self.pio))
    }

    /// After an exit was handled (`wrote`: what a port write exit wrote): the zone follows
    /// what the device now allows, before this vCPU runs the guest again.
    fn follow_coalesced(&self, wrote: Option<WrittenPort>) {
        if let Some(ring) = &self.coalesced {
            self.count_coalesced(ring.follow(&self.pio, wrote));
        }
    }

    /// Counts `n` held-back writes handled; returns `n`.
    fn count_coalesced(&self, n: u64) -> u64 {
        if n > 0 {
            self.reporter
                .region()
                .add_vm(VmCounter::CoalescedPioWrites, n);
        }
        n
    }
}

/// One vCPU, created and configured on the VMM thread, then moved to its own thread to run.
#[derive(Debug)]
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
}

impl std::os::fd::AsRawFd for Vcpu {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl Vcpu {
    pub fn new(vm: &Vm, index: u32) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Vcpu { index, fd })
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// Sets CPUID, MSRs, the local APIC's LINT pins and the FPU; for the boot vCPU also the
    /// entry registers and boot page tables. The other vCPUs wait for INIT/SIPI.
    pub fn configure(
        &self,
        supported_cpuid: &CpuId,
        vcpus: u32,
        mem: &GuestMemoryMmap,
        boot: Option<BootEntry>,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let kvm_err = |what| {
            move |source| VcpuError::Configure {
                index,
                what,
                source,
            }
        };
        let mut cpuid = supported_cpuid.clone();
        cpuid::filter_cpuid(&mut cpuid, index, vcpus);
        self.fd.set_cpuid2(&cpuid).map_err(kvm_err("CPUID"))?;

        let msrs = msr::boot_msrs()?;
        let set = self.fd.set_msrs(&msrs).map_err(kvm_err("MSRs"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::Msrs {
                index,
                set,
                wanted: msrs.as_slice().len(),
            });
        }

        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(kvm_err("reading the local APIC"))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT1, APIC_MODE_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(kvm_err("the local APIC"))?;

        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(kvm_err("the FPU"))?;

        if let Some(boot) = boot {
            let mut sregs = self
                .fd
                .get_sregs()
                .map_err(kvm_err("reading system registers"))?;
            regs::setup_boot_sregs(mem, boot.mode, &mut sregs)?;
            self.fd
                .set_sregs(&sregs)
                .map_err(kvm_err("system registers"))?;
            self.fd
                .set_regs(&regs::boot_regs(boot.entry, boot.mode))
                .map_err(kvm_err("registers"))?;
        }
        Ok(())
    }

    /// Runs the guest until the VM is asked to stop. Must be called on the vCPU's own thread,
    /// after its seccomp filter is in place.
    pub fn run(mut self, io: &VcpuIo, shared: &VcpuShared) {
        signal::set_kvm_run(self.fd.get_kvm_run());
        let row = io.reporter.region().vcpu(self.index as usize);
        // A VM that starts paused (a snapshot loaded without resuming) parks here first.
        self.park_if_paused(io);
        while !io.exit.is_stopping() {
            let action = match self.fd.run() {
                Ok(exit) => {
                    if let Some(row) = row {
                        row.count(exit_kind(&exit));
                    }
                    shared.stuck.store(false, Ordering::Relaxed);
                    io.drain_coalesced();
                    let wrote = match &exit {
                        VcpuExit::IoOut(port, [_]) => Some(WrittenPort::Byte(*port)),
                        VcpuExit::IoOut(port, _) => Some(WrittenPort::Wide(*port)),
                        _ => None,
                    };
                    let action = handle_exit(exit, self.index, io);
                    io.follow_coalesced(wrote);
                    action
                }
                Err(e) if e.errno() == libc::EINTR => {
                    if let Some(row) = row {
                        row.count(ExitKind::Interrupted);
                    }
                    // A pause or a stop: what the guest wrote is handled before it parks.
                    io.drain_coalesced();
                    self.fd.set_kvm_immediate_exit(0);
                    if shared.check_halt.swap(false, Ordering::AcqRel) {
                        shared.stuck.store(self.is_stuck(), Ordering::Release);
                    }
                    self.park_if_paused(io);
                    ExitAction::Continue
                }
                Err(e) if e.errno() == libc::EAGAIN => ExitAction::Continue,
                Err(e) => ExitAction::Stop(VmExitReason::VcpuFailed {
                    vcpu: self.index,
                    error: format!("KVM_RUN failed: {e}"),
                }),
            };
            match action {
                ExitAction::Continue => {}
                ExitAction::InternalError => {
                    let suberror = self.internal_error_suberror();
                    stop(
                        io,
                        VmExitReason::InternalError {
                            vcpu: self.index,
                            suberror,
                        },
                    );
                }
                ExitAction::Stop(reason) => {
                    if matches!(reason, VmExitReason::TripleFault { .. }) {
                        self.log_fault_state();
                    }
                    stop(io, reason)
                }
            }
        }
        signal::set_kvm_run(std::ptr::null_mut());
    }

    /// Parks on the pause gate while the VM is paused, saving this vCPU's state when the VMM
    /// collects it. The guest's kvmclock is told it was paused (KVM_KVMCLOCK_CTRL), so its
    /// soft-lockup watchdog does not count the pause against it.
    fn park_if_paused(&self, io: &VcpuIo) {
        if !io.pause.is_paused() {
            return;
        }
        // EINVAL when the guest never enabled kvmclock: nothing to tell it then.
        let _ = self.fd.kvmclock_ctrl();
        io.pause.park_if_asked(
            self.index as usize,
            || io.exit.is_stopping(),
            || vcpu_state::save(&self.fd, &io.msr_list),
        );
    }

    /// Sets a saved state on this vCPU, which has not run yet (a restore).
    pub fn restore(&self, state: &VcpuState) -> Result<(), VcpuError> {
        vcpu_state::restore(&self.fd, state).map_err(|source| VcpuError::Restore {
            index: self.index,
            source,
        })
    }

    /// True if this vCPU can not run again on its own: halted with interrupts disabled, or
    /// still waiting for INIT/SIPI.
    fn is_stuck(&self) -> bool {
        let Ok(kvm_mp_state { mp_state }) = self.fd.get_mp_state() else {
            return false;
        };
        match mp_state {
            KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED => true,
            KVM_MP_STATE_HALTED => self.fd.get_regs().is_ok_and(|r| r.rflags & RFLAGS_IF == 0),
            _ => false,
        }
    }

    /// Where a triple fault left the vCPU: the instruction, the mode, the stack and the
    /// exception KVM was delivering. The VM ends right after, so this is the one look at it
    /// (a kernel's symbol table turns `rip` into a function; for a guest that tried to break
    /// out it is evidence). Intel's KVM keeps that state; AMD's resets the vCPU first.
    fn log_fault_state(&self) {
        let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return;
        };
        // On AMD, KVM re-initialises the vCPU before it reports the shutdown: what is left is
        // the reset state, not the fault's.
        if regs.rip == 0xfff0 && sregs.cs.selector == 0xf000 {
            warn_limited!(
                "vCPU {} triple-faulted; KVM reset the vCPU before reporting it (as on AMD), so where is not known",
                self.index
            );
            return;
        }
        let exception = self.fd.get_vcpu_events().map_or_else(
            |_| "unknown".to_string(),
            |e| {
                format!(
                    "nr {} injected {} pending {} error code {:#x}",
                    e.exception.nr,
                    e.exception.injected,
                    e.exception.pending,
                    e.exception.error_code
                )
            },
        );
        warn_limited!(
            "vCPU {} triple-faulted at rip {:#x} rsp {:#x} rflags {:#x} cs {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} idt {:#x}+{:#x}; exception: {exception}",
            self.index,
            regs.rip,
            regs.rsp,
            regs.rflags,
            sregs.cs.selector,
            sregs.cr0,
            sregs.cr2,
            sregs.cr3,
            sregs.cr4,
            sregs.efer,
            sregs.idt.base,
            sregs.idt.limit,
        );
    }

    fn internal_error_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
        // member the kernel filled.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }
}

fn set_lvt_mode(regs: &mut [libc::c_char; 1024], offset: usize, mode: u32) {
    let Some(bytes) = regs.get_mut(offset..offset + 4) else {
        return;
    };
    let mut raw = [0u8; 4];
    for (dst, src) in raw.iter_mut().zip(bytes.iter()) {
        *dst = *src as u8;
    }
    let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (dst, src) in bytes.iter_mut().zip(value.to_le_bytes()) {
        *dst = src as libc::c_char;
    }
}

/// What the run loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    Continue,
    /// Needs the exit's details from kvm_run, which the borrow of the exit hides.
    InternalError,
    Stop(VmExitReason),
}

/// Ends the VM for `reason`, then reports an abnormal ending as an event. In that order: the
/// event can make the supervisor stop the VM (stop-vm), and the VM's own reason must already
/// be recorded by then, or the stop would take its place.
fn stop(io: &VcpuIo, reason: VmExitReason) {
    let event = match reason {
        VmExitReason::TripleFault { vcpu } => Some(Event::TripleFault {
            vcpu: vcpu_id(vcpu),
        }),
        VmExitReason::InternalError { vcpu, suberror } => Some(Event::EntryFailure {
            vcpu: vcpu_id(vcpu),
            internal: true,
            code: u64::from(suberror),
        }),
        VmExitReason::FailEntry { vcpu, reason } => Some(Event::EntryFailure {
            vcpu: vcpu_id(vcpu),
            internal: false,
            code: reason,
        }),
        _ => None,
    };
    if !reason.is_orderly() {
        io.reporter.region().count(VmCounter::VcpuFailures);
    }
    io.exit.request(reason);
    if let Some(event) = event {
        io.reporter.post(event);
    }
}

/// Which bus an access went to: it picks the counters and names the address in logs.
#[derive(Debug, Clone, Copy)]
enum Space {
    Port,
    Mmio,
}

impl Space {
    fn label(self) -> &'static str {
        match self {
            Space::Port => "port",
            Space::Mmio => "MMIO address",
        }
    }
}

/// The vCPU's number as events carry it (the MP table caps vCPUs far below 2^16).
fn vcpu_id(index: u32) -> u16 {
    u16::try_from(index).unwrap_or(u16::MAX)
}

/// The per-vCPU counter an exit belongs to.
fn exit_kind(exit: &VcpuExit<'_>) -> ExitKind {
    match exit {
        VcpuExit::IoIn(..) => ExitKind::IoIn,
        VcpuExit::IoOut(..) => ExitKind::IoOut,
        VcpuExit::MmioRead(..) => ExitKind::MmioRead,
        VcpuExit::MmioWrite(..) => ExitKind::MmioWrite,
        VcpuExit::X86Rdmsr(..) => ExitKind::MsrRead,
        VcpuExit::X86Wrmsr(..) => ExitKind::MsrWrite,
        VcpuExit::Hlt => ExitKind::Hlt,
        VcpuExit::Shutdown => ExitKind::Shutdown,
        VcpuExit::InternalError => ExitKind::InternalError,
        VcpuExit::FailEntry(..) => ExitKind::FailEntry,
        VcpuExit::SystemEvent(..) => ExitKind::SystemEvent,
        VcpuExit::Intr => ExitKind::Interrupted,
        _ => ExitKind::Other,
    }
}

fn count_access(
    io: &VcpuIo,
    vcpu: u32,
    access: BusAccess,
    space: Space,
    addr: u64,
    len: usize,
    is_write: bool,
) {
    let counter = match (access, space, is_write) {
        (BusAccess::Handled, ..) => return,
        (BusAccess::Refused, ..) => VmCounter::DeviceRefusedAccesses,
        (BusAccess::Unassigned, Space::Port, false) => VmCounter::PioUnassignedReads,
        (BusAccess::Unassigned, Space::Port, true) => VmCounter::PioUnassignedWrites,
        (BusAccess::Unassigned, Space::Mmio, false) => VmCounter::MmioUnassignedReads,
        (BusAccess::Unassigned, Space::Mmio, true) => VmCounter::MmioUnassignedWrites,
    };
    io.reporter.region().count(counter);
    if access == BusAccess::Unassigned {
        // Probes are the evidence scans and legacy-device rules look for.
        let (vcpu, size, write) = (vcpu_id(vcpu), u8::try_from(len).unwrap_or(0), is_write);
        io.reporter.post(match space {
            Space::Port => Event::UnassignedPio {
                vcpu,
                port: u16::try_from(addr).unwrap_or(u16::MAX),
                size,
                write,
            },
            Space::Mmio => Event::UnassignedMmio {
                vcpu,
                addr,
                size,
                write,
            },
        });
    }
    let dir = if is_write { "write to" } else { "read of" };
    let what = space.label();
    match access {
        BusAccess::Refused => warn_limited!("refused {len}-byte {dir} {what} {addr:#x}"),
        _ => debug_limited!("{len}-byte {dir} unassigned {what} {addr:#x}"),
    }
}

/// An MSR access outside the allow-list (KVM sends only those here): answered with #GP, as a
/// CPU answers an MSR it lacks, counted and reported.
fn refuse_msr(io: &VcpuIo, vcpu: u32, index: u32, write: bool, value: u64) {
    let counter = if write {
        VmCounter::MsrFilteredWrites
    } else {
        VmCounter::MsrFilteredReads
    };
    io.reporter.region().count(counter);
    io.reporter.post(Event::Msr {
        vcpu: vcpu_id(vcpu),
        index,
        write,
        value,
    });
    let dir = if write { "write to" } else { "read of" };
    debug_limited!("vCPU {vcpu}: #GP for a {dir} MSR {index:#x}");
}

/// Handles one exit. A free function over the exit and the buses so it can be tested without
/// KVM.
pub fn handle_exit(exit: VcpuExit<'_>, vcpu: u32, io: &VcpuIo) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            let access = io.pio.read(u64::from(port), data);
            count_access(
                io,
                vcpu,
                access,
                Space::Port,
                u64::from(port),
                data.len(),
                false,
            );
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            let access = io.pio.write(u64::from(port), data);
            count_access(
                io,
                vcpu,
                access,
                Space::Port,
                u64::from(port),
                data.len(),
                true,
            );
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            let access = io.mmio.read(addr, data);
            count_access(io, vcpu, access, Space::Mmio, addr, data.len(), false);
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            let access = io.mmio.write(addr, data);
            count_access(io, vcpu, access, Space::Mmio, addr, data.len(), true);
            ExitAction::Continue
        }
        VcpuExit::X86Rdmsr(msr) => {
            *msr.error = 1;
            *msr.data = 0;
            refuse_msr(io, vcpu, msr.index, false, 0);
            ExitAction::Continue
        }
        VcpuExit::X86Wrmsr(msr) => {
            *msr.error = 1;
            refuse_msr(io, vcpu, msr.index, true, msr.data);
            ExitAction::Continue
        }
        // A kick that landed while KVM was already on its way out.
        VcpuExit::Intr => ExitAction::Continue,
        // The user-space IOAPIC routes every pin edge-triggered, so KVM has no level-triggered
        // vector to report an EOI for; should one come, there is no remote IRR to clear.
        VcpuExit::IoapicEoi(_) => ExitAction::Continue,
        // Only reached without an in-kernel LAPIC; the halt watchdog covers the usual case.
        VcpuExit::Hlt => ExitAction::Stop(VmExitReason::AllHalted),
        VcpuExit::Shutdown => ExitAction::Stop(VmExitReason::TripleFault { vcpu }),
        VcpuExit::InternalError => ExitAction::InternalError,
        VcpuExit::FailEntry(reason, _cpu) => {
            ExitAction::Stop(VmExitReason::FailEntry { vcpu, reason })
        }
        VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_RESET => {
            ExitAction::Stop(VmExitReason::Reset(ResetVia::KvmSystemEvent))
        }
        VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_SHUTDOWN => {
            ExitAction::Stop(VmExitReason::PowerOff)
        }
        other => {
            let exit = format!("{other:?}");
            warn_limited!("vCPU {vcpu}: unhandled KVM exit {exit}");
            ExitAction::Stop(VmExitReason::UnhandledExit { vcpu, exit })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::legacy::{GuestExitPort, SerialPort};

    fn io() -> VcpuIo {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut pio = Bus::new();
        pio.insert(Arc::new(GuestExitPort(exit.clone())), 0xf4, 1)
            .unwrap();
        let serial = SerialPort::new(
            vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
            Box::new(std::io::sink()),
        );
        pio.insert(Arc::new(serial), 0x3f8, 8).unwrap();
        VcpuIo {
            pio: Arc::new(pio),
            mmio: Arc::new(Bus::new()),
            reporter: Reporter::detached().unwrap(),
            exit,
            pause: Arc::new(PauseGate::new(1)),
            msr_list: Arc::from(Vec::new()),
            coalesced: None,
        }
    }

    #[test]
    fn unassigned_port_read_is_all_ones_and_counted() {
        let io = io();
        let mut data = [0u8; 2];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x1234, &mut data), 0, &io),
            ExitAction::Continue
        );
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(
            io.reporter
                .region()
                .vm_counter(VmCounter::PioUnassignedReads),
            1
        );
    }

    #[test]
    fn unassigned_mmio_write_is_dropped_and_counted() {
        let io = io();
        assert_eq!(
            handle_exit(VcpuExit::MmioWrite(0xd000_0000, &[1, 2, 3, 4]), 0, &io),
            ExitAction::Continue
        );
        let mut data = [0u8; 8];
        handle_exit(VcpuExit::MmioRead(0xd000_0000, &mut data), 0, &io);
        assert_eq!(data, [0xff; 8]);
        let r = io.reporter.region();
        assert_eq!(
            (
                r.vm_counter(VmCounter::MmioUnassignedWrites),
                r.vm_counter(VmCounter::MmioUnassignedReads)
            ),
            (1, 1)
        );
    }

    #[test]
    fn guest_exit_port_write_requests_exit_with_its_status() {
        let io = io();
        handle_exit(VcpuExit::IoOut(0xf4, &[9]), 0, &io);
        assert_eq!(io.exit.reason(), Some(VmExitReason::GuestExit(9)));
    }

    #[test]
    fn refused_device_access_is_counted_separately() {
        let io = io();
        handle_exit(VcpuExit::IoOut(0x3f8, &[1, 2]), 0, &io);
        handle_exit(VcpuExit::IoOut(0xf4, &[1, 2, 3, 4]), 0, &io);
        assert_eq!(
            io.reporter
                .region()
                .vm_counter(VmCounter::DeviceRefusedAccesses),
            2
        );
        assert!(!io.exit.is_stopping());
    }

    #[test]
    fn abnormal_exits_each_stop_with_their_own_reason() {
        let io = io();
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, 2, &io),
            ExitAction::Stop(VmExitReason::TripleFault { vcpu: 2 })
        );
        assert_eq!(
            handle_exit(VcpuExit::InternalError, 0, &io),
            ExitAction::InternalError
        );
        assert_eq!(
            handle_exit(VcpuExit::FailEntry(0x1f, 0), 1, &io),
            ExitAction::Stop(VmExitReason::FailEntry {
                vcpu: 1,
                reason: 0x1f
            })
        );
        assert!(matches!(
            handle_exit(VcpuExit::Unknown, 0, &io),
            ExitAction::Stop(VmExitReason::UnhandledExit { .. })
        ));
        assert!(matches!(
            handle_exit(VcpuExit::Unsupported(999), 0, &io),
            ExitAction::Stop(VmExitReason::UnhandledExit { .. })
        ));
    }

    #[test]
    fn an_abnormal_ending_is_recorded_counted_and_reported() {
        let io = io();
        stop(&io, VmExitReason::TripleFault { vcpu: 0 });
        assert_eq!(
            io.exit.reason(),
            Some(VmExitReason::TripleFault { vcpu: 0 })
        );
        let region = io.reporter.region();
        assert_eq!(region.vm_counter(VmCounter::VcpuFailures), 1);
        let mut tail = 0;
        let raw = region.ring.pop(&mut tail).expect("no event");
        let limits = crate::telemetry::Limits {
            vcpus: 1,
            devices: 0,
        };
        assert_eq!(
            Event::decode(&raw, limits),
            Some(Event::TripleFault { vcpu: 0 })
        );
        // An orderly ending is neither counted as a failure nor reported.
        let io2 = self::io();
        stop(&io2, VmExitReason::GuestExit(0));
        assert_eq!(io2.reporter.region().vm_counter(VmCounter::VcpuFailures), 0);
        assert!(io2.reporter.region().ring.pop(&mut 0).is_none());
    }

    #[test]
    fn lvt_mode_is_set_without_touching_other_bits() {
        let mut regs = [0 as libc::c_char; 1024];
        regs[APIC_LVT_LINT0] = 0x30;
        regs[APIC_LVT_LINT0 + 2] = 0x01; // mask bit 16
        set_lvt_mode(&mut regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT_LINT0] as u8, 0x30);
        assert_eq!(regs[APIC_LVT_LINT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT_LINT0 + 2] as u8, 0x01);
    }
}
