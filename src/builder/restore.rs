//! Starting from a snapshot instead of a kernel: the state file is read and checked before
//! anything is built (a corrupt or foreign one is refused whole), guest RAM is the memory file
//! mapped copy-on-write, and once the devices are attached as for a boot, each takes its saved
//! state, then the vCPUs and the VM's clock and irqchip.

use std::fs::File;

use crate::boot::{BootError, BootFile};
use crate::config::{RestoreSpec, VmConfig};
use crate::devices::virtio::mmio::TransportStateError;
use crate::devices::virtio::VirtioWorker;
use crate::snapshot::{self, SnapshotError, Sources, VmState};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Open(#[from] BootError),
    #[error("snapshot {path}: {source}")]
    State {
        path: std::path::PathBuf,
        #[source]
        source: SnapshotError,
    },
    #[error("snapshot {path}: {what} differs from the settings it was started with (was the state file replaced?)")]
    Mismatch {
        path: std::path::PathBuf,
        what: &'static str,
    },
    #[error("snapshot memory {path}: {size} bytes, but the snapshot's RAM is {wanted}")]
    MemorySize {
        path: std::path::PathBuf,
        size: u64,
        wanted: u64,
    },
    #[error("snapshot: the {0} state is not one the device can be in")]
    Device(&'static str),
    #[error(
        "snapshot: device {device} is saved as {saved}; the settings do not make the same devices"
    )]
    DeviceOrder { device: String, saved: String },
    #[error("snapshot: device {0}'s queue side refused its saved state")]
    Handler(String),
    #[error("snapshot: device {device}: {source}")]
    Transport {
        device: String,
        #[source]
        source: TransportStateError,
    },
    #[error("snapshot: {0}")]
    Vcpu(#[source] VcpuError),
    #[error("snapshot: {0}")]
    Vm(#[source] VmError),
    #[error("no kernel was opened")]
    NoKernel,
}

impl RestoreError {
    /// A snapshot is host input: every refusal of it is the caller's to fix (status 2).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, RestoreError::NoKernel)
    }
}

/// A snapshot's files, opened and its state checked against the settings.
pub struct Opened {
    mem: File,
    state: VmState,
}

impl Opened {
    pub fn into_parts(self) -> (File, VmState) {
        (self.mem, self.state)
    }
}

/// Opens the snapshot's files (as the kernel would be: no symlinks when the settings say so)
/// and checks the state against the settings made from it.
pub fn open(spec: &RestoreSpec, config: &VmConfig) -> Result<Opened, RestoreError> {
    let no_follow = config.process.no_follow;
    let state_file = BootFile::open_with("snapshot state", &spec.state, no_follow)?;
    let state = snapshot::read(&state_file.file).map_err(|source| RestoreError::State {
        path: spec.state.clone(),
        source,
    })?;
    let mismatch = |what| RestoreError::Mismatch {
        path: spec.state.clone(),
        what,
    };
    if state.vcpus.len() != config.vm.vcpus as usize {
        return Err(mismatch("its vCPU count"));
    }
    if state.mem_bytes != config.vm.mem_bytes() {
        return Err(mismatch("its memory size"));
    }
    let mem = BootFile::open_with("snapshot memory", &spec.mem, no_follow)?.file;
    let size = mem.metadata().map(|m| m.len()).unwrap_or(0);
    if size != state.mem_bytes {
        return Err(RestoreError::MemorySize {
            path: spec.mem.clone(),
            size,
            wanted: state.mem_bytes,
        });
    }
    Ok(Opened { mem, state })
}

/// Gives every device, then the vCPUs (made here) and the VM, their saved state.
pub fn apply(
    vm: &Vm,
    sources: &Sources,
    workers: &mut [VirtioWorker],
    state: &VmState,
) -> Result<Vec<Vcpu>, RestoreError> {
    let devices = &state.devices;
    if !sources.i8042.restore(&devices.i8042) {
        return Err(RestoreError::Device("i8042"));
    }
    match (&sources.ioapic, &devices.ioapic) {
        (Some(ioapic), Some(saved)) if ioapic.restore(saved) => {}
        (None, None) => {}
        _ => return Err(RestoreError::Device("IOAPIC")),
    }
    if devices.virtio.len() != sources.transports.len() || workers.len() != devices.virtio.len() {
        return Err(RestoreError::Device("virtio device list"));
    }
    for ((saved, transport), worker) in devices
        .virtio
        .iter()
        .zip(&sources.transports)
        .zip(workers.iter_mut())
    {
        let name = worker.shared().name().to_string();
        if saved.name != name {
            return Err(RestoreError::DeviceOrder {
                device: name,
                saved: saved.name.clone(),
            });
        }
        if !worker.handler_mut().restore_state(&saved.handler) {
            return Err(RestoreError::Handler(name));
        }
        transport
            .restore(&saved.transport)
            .map_err(|source| RestoreError::Transport {
                device: name,
                source,
            })?;
    }
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (index, saved) in (0u32..).zip(&state.vcpus) {
        let vcpu = Vcpu::new(vm, index).map_err(RestoreError::Vcpu)?;
        vcpu.restore(saved).map_err(RestoreError::Vcpu)?;
        vcpus.push(vcpu);
    }
    vm.restore_state(&state.vm).map_err(RestoreError::Vm)?;
    log::debug!(
        "restored a VM of {} vCPU(s) and {} MiB from a snapshot",
        state.vcpus.len(),
        state.mem_bytes >> 20
    );
    Ok(vcpus)
}
