//! A vCPU's architectural state, as a snapshot keeps it: saved on the vCPU's own thread while it
//! is paused outside KVM_RUN, and set on a fresh vCPU before its thread starts.
//!
//! What KVM holds for a vCPU and a guest can observe: general and system registers, the FPU and
//! extended state (XSAVE), XCRs, debug registers, the local APIC, every MSR KVM lists (the KVM
//! paravirtual range 0x4b564d00-ff among them: kvmclock, steal time, async PF), the MP state,
//! pending events (exceptions, NMIs, interrupts, SMM), CPUID, and the TSC frequency. The order
//! of the setters matters and follows KVM's dependencies: CPUID first (it decides which MSRs and
//! XSAVE features exist), system registers before MSRs (EFER), the LAPIC before the events that
//! may inject into it, MSRs before the TSC deadline could fire.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// A vCPU's state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    /// The guest's TSC frequency, when KVM can tell it.
    pub tsc_khz: Option<u32>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .field("mp_state", &self.mp_state.mp_state)
            .finish_non_exhaustive()
    }
}

/// Errors saving or setting a vCPU's state; `what` names the part.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("cannot read {what}: {source}")]
    Get {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot set {what}: {source}")]
    Set {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM took {set} of the {wanted} saved MSRs; MSR {index:#x} was refused")]
    Msrs {
        set: usize,
        wanted: usize,
        index: u32,
    },
    #[error("the saved {0} does not fit KVM's structure")]
    Size(&'static str),
}

/// How many CPUID entries a vCPU may have (KVM's own limit).
const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;
/// How many MSRs one KVM_GET_MSRS call reads.
const MSR_BATCH: usize = 64;

/// Reads the state of the vCPU behind `fd`. `msr_list` is KVM's MSR index list; an MSR KVM lists
/// but will not read for this vCPU (a feature its CPUID does not have) is left out.
pub fn save(fd: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState, VcpuStateError> {
    let get = |what| move |source| VcpuStateError::Get { what, source };
    let cpuid = fd
        .get_cpuid2(MAX_CPUID_ENTRIES)
        .map_err(get("CPUID"))?
        .as_slice()
        .to_vec();
    Ok(VcpuState {
        cpuid,
        msrs: save_msrs(fd, msr_list)?,
        regs: fd.get_regs().map_err(get("registers"))?,
        sregs: fd.get_sregs().map_err(get("system registers"))?,
        xsave: fd.get_xsave().map_err(get("XSAVE state"))?,
        xcrs: fd.get_xcrs().map_err(get("XCRs"))?,
        debug_regs: fd.get_debug_regs().map_err(get("debug registers"))?,
        lapic: fd.get_lapic().map_err(get("the local APIC"))?,
        mp_state: fd.get_mp_state().map_err(get("the MP state"))?,
        events: fd.get_vcpu_events().map_err(get("pending events"))?,
        tsc_khz: fd.get_tsc_khz().ok(),
    })
}

/// KVM_GET_MSRS stops at the first MSR it can not read and says how many it read: that one is
/// skipped and the batch goes on after it.
fn save_msrs(fd: &VcpuFd, msr_list: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut saved = Vec::with_capacity(msr_list.len());
    let mut rest = msr_list;
    while !rest.is_empty() {
        let batch = rest.get(..MSR_BATCH.min(rest.len())).unwrap_or(rest);
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::Size("MSRs"))?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(|source| VcpuStateError::Get {
                what: "MSRs",
                source,
            })?;
        saved.extend(msrs.as_slice().iter().take(read).copied());
        // A short read stopped at an MSR KVM would not read: skip that one, and go on after
        // it. A whole batch read goes on with the next.
        let next = if read < batch.len() { read + 1 } else { read };
        rest = rest.get(next..).unwrap_or(&[]);
    }
    Ok(saved)
}

/// Sets `state` on a fresh vCPU, before it ever runs.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), VcpuStateError> {
    let set = |what| move |source| VcpuStateError::Set { what, source };
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuStateError::Size("CPUID"))?;
    fd.set_cpuid2(&cpuid).map_err(set("CPUID"))?;
    if let Some(khz) = state.tsc_khz {
        // Only when it differs: setting the frequency needs TSC scaling, which not every host has.
        if fd.get_tsc_khz().ok() != Some(khz) {
            fd.set_tsc_khz(khz).map_err(set("the TSC frequency"))?;
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(set("the MP state"))?;
    fd.set_regs(&state.regs).map_err(set("registers"))?;
    fd.set_sregs(&state.sregs)
        .map_err(set("system registers"))?;
    // SAFETY: `state.xsave` is a whole kvm_xsave (4 KiB), which is what KVM_SET_XSAVE reads for a
    // vCPU whose CPUID (set above) enables no dynamically sized XSAVE feature.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(set("XSAVE state"))?;
    fd.set_xcrs(&state.xcrs).map_err(set("XCRs"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(set("debug registers"))?;
    fd.set_lapic(&state.lapic).map_err(set("the local APIC"))?;
    for batch in state.msrs.chunks(MSR_BATCH) {
        let msrs = Msrs::from_entries(batch).map_err(|_| VcpuStateError::Size("MSRs"))?;
        let taken = fd.set_msrs(&msrs).map_err(set("MSRs"))?;
        if taken != batch.len() {
            return Err(VcpuStateError::Msrs {
                set: taken,
                wanted: batch.len(),
                index: batch.get(taken).map_or(0, |e| e.index),
            });
        }
    }
    fd.set_vcpu_events(&state.events)
        .map_err(set("pending events"))?;
    Ok(())
}
