//! Taking a snapshot of a running VM, on the VMM thread, with the vCPUs paused: everything a
//! snapshot reads is named in [`Sources`], which the builder fills.

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{
    encode, write_memory, DevicesState, MemoryWritten, Pages, SnapshotError, SnapshotKind,
    VirtioState, VmState,
};
use crate::devices::legacy::{Ioapic, SerialPort, I8042};
use crate::devices::virtio::{MmioTransport, VirtioWorker};
use crate::vstate::pause::{PauseError, PauseGate};
use crate::vstate::vm::{Vm, VmError};

/// How long the VMM waits for the vCPUs to save their state: a base, and more per vCPU (each
/// saves on its own thread, but a nested or busy host schedules them slowly).
const COLLECT_BASE: Duration = Duration::from_secs(2);
const COLLECT_PER_VCPU: Duration = Duration::from_millis(100);

/// What a snapshot reads: the VM, its devices' register sides (the queue sides are the
/// workers, given separately), the vCPUs' pause gate, and the settings the VM was built with.
pub struct Sources {
    pub vm: Vm,
    pub serial: Arc<SerialPort>,
    pub i8042: Arc<I8042>,
    pub ioapic: Option<Arc<Ioapic>>,
    pub transports: Vec<Arc<MmioTransport>>,
    pub pause: Arc<PauseGate>,
    /// The machine settings, as JSON.
    pub machine: String,
    pub mem_bytes: u64,
    /// The VM has virtio-fs shares, whose backends' state no snapshot can hold.
    pub shares: bool,
}

/// Why a snapshot was not taken.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("the VM has virtio-fs shares: their backends hold state a snapshot can not")]
    Shares,
    #[error("the vCPUs: {0}")]
    Pause(#[from] PauseError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Encode(#[from] SnapshotError),
    #[error("the memory file is not empty ({0} bytes): it must be created or truncated for the snapshot")]
    MemoryFileNotEmpty(u64),
    #[error("cannot write the {what} file: {source}")]
    Write {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The size of the file behind `file`, asked of its descriptor (on the VMM thread).
fn fd_size(file: &File) -> std::io::Result<u64> {
    let st = crate::hostfile::fstat(file)?;
    Ok(u64::try_from(st.st_size).unwrap_or(0))
}

/// What a snapshot wrote.
#[derive(Debug, Clone)]
pub struct Created {
    pub state_bytes: u64,
    pub memory: MemoryWritten,
    /// The pages it took from the dirty log (a VM that tracks them), per memslot: until the
    /// front end says the files are kept, the caller holds them to give back
    /// ([`crate::vstate::vm::Vm::return_dirty_pages`]) should another snapshot come first.
    pub taken: Option<Vec<Vec<u64>>>,
}

/// Writes a snapshot of `kind` of the paused VM: its state into `state_file`, guest RAM (all of
/// it, or for a diff the pages changed since the last snapshot) into `mem_file` (which must be
/// empty). A VM that tracks dirty pages starts a new diff after either kind; a diff that was
/// not written leaves its pages for the next, and so must one the caller gives back.
pub fn create(
    sources: &Sources,
    workers: &[Arc<Mutex<VirtioWorker>>],
    state_file: &File,
    mem_file: &File,
    kind: SnapshotKind,
) -> Result<Created, CreateError> {
    use std::io::Write;
    if sources.shares {
        return Err(CreateError::Shares);
    }
    let mem_len = fd_size(mem_file).map_err(|source| CreateError::Write {
        what: "memory",
        source,
    })?;
    if mem_len != 0 {
        return Err(CreateError::MemoryFileNotEmpty(mem_len));
    }
    if kind == SnapshotKind::Diff && !sources.vm.tracks_dirty_pages() {
        return Err(CreateError::Vm(VmError::NotTracking));
    }
    let timeout = COLLECT_BASE + COLLECT_PER_VCPU * sources.pause.vcpus() as u32;
    let vcpus = sources.pause.collect(timeout)?;
    let vm = sources.vm.save_state()?;
    let virtio = sources
        .transports
        .iter()
        .zip(workers)
        .map(|(transport, worker)| {
            let worker = worker.lock().unwrap_or_else(|e| e.into_inner());
            let handler = worker.handler();
            let mut handler_state = handler.save_state();
            handler_state.live = worker.shared().active().is_some();
            VirtioState {
                name: worker.shared().name().to_string(),
                transport: transport.save(|q| handler.held_chains(q)),
                handler: handler_state,
            }
        })
        .collect();
    let state = VmState {
        machine: sources.machine.clone(),
        mem_bytes: sources.mem_bytes,
        vm,
        vcpus,
        devices: DevicesState {
            serial: sources.serial.save(),
            i8042: sources.i8042.save(),
            ioapic: sources.ioapic.as_ref().map(|i| i.save()),
            virtio,
        },
    };
    let bytes = encode(&state, kind)?;
    let write_err = |what| move |source| CreateError::Write { what, source };
    (&*state_file)
        .write_all(&bytes)
        .map_err(write_err("state"))?;
    // The logs are taken after the state is written and before memory is: the VM is paused,
    // so nothing writes guest RAM in between.
    let dirty = if sources.vm.tracks_dirty_pages() {
        Some(sources.vm.take_dirty_pages()?)
    } else {
        None
    };
    let pages = match (kind, &dirty) {
        (SnapshotKind::Diff, Some(dirty)) => Pages::Dirty(dirty),
        _ => Pages::All,
    };
    let memory = write_memory(sources.vm.memory(), mem_file, pages).map_err(|source| {
        if let Some(dirty) = &dirty {
            sources.vm.return_dirty_pages(dirty);
        }
        CreateError::Write {
            what: "memory",
            source,
        }
    })?;
    Ok(Created {
        state_bytes: bytes.len() as u64,
        memory,
        taken: dirty,
    })
}
