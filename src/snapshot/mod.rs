//! Snapshots: a VM's state file and its memory file.
//!
//! The state file is a 32-byte header (magic `BLKHSNAP`, format version, kind, body length,
//! CRC32 of the body) and a body in postcard (serde): the VM's settings (machine part), the VM's
//! clock and irqchip, every vCPU's state, and every device's. The memory file is guest RAM, its
//! regions one after another in guest-address order, with pages that are all zero left as holes.
//! A restore maps it `MAP_PRIVATE`, so clones of one snapshot share its pages copy-on-write
//! through the page cache.
//!
//! A diff snapshot's memory file holds only the pages that changed since the snapshot before
//! (KVM's dirty log and the VMM's own, see [`crate::vstate::dirty`]); `bulkhead snapshot
//! rebase` lays it over that snapshot's memory file into a new full one ([`rebase`]), which
//! the diff's state file then loads with.
//!
//! A state file whose magic, version, length or CRC is wrong is refused with what was wrong,
//! before anything is built; nothing is half restored.

pub mod client;
mod memfile;
pub mod rebase;
mod save;
mod settings;

use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::devices::legacy::i8042::I8042State;
use crate::devices::legacy::ioapic::IoapicState;
use crate::devices::legacy::serial::SerialRegs;
use crate::devices::virtio::mmio::TransportState;
use crate::devices::virtio::HandlerState;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::VmArchState;

pub use memfile::{write_memory, MemoryWritten, Pages};
pub use save::{create, CreateError, Created, Sources};
pub use settings::{restore_settings, RestoreSettingsError};

/// The first bytes of every state file.
pub const MAGIC: [u8; 8] = *b"BLKHSNAP";
/// The state format this build writes and reads. Any change to a saved type bumps it.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 32;
/// A state file larger than this is not one bulkhead wrote (254 vCPUs' state is under 2 MiB).
pub const MAX_STATE_BYTES: u64 = 16 << 20;

/// Which pages a snapshot's memory file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotKind {
    /// All of guest RAM (zero pages as holes).
    #[default]
    Full,
    /// The pages that changed since the VM's last snapshot (or its start or restore), for
    /// `bulkhead snapshot rebase` to lay over that snapshot's memory file.
    Diff,
}

impl SnapshotKind {
    /// The kind's number in the state file's header and on the control channel.
    pub fn code(self) -> u32 {
        match self {
            SnapshotKind::Full => 0,
            SnapshotKind::Diff => 1,
        }
    }

    pub fn from_code(code: u32) -> Option<SnapshotKind> {
        match code {
            0 => Some(SnapshotKind::Full),
            1 => Some(SnapshotKind::Diff),
            _ => None,
        }
    }
}

/// What a snapshot holds besides memory.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// The settings the VM was built with, machine part only, as a settings file holds them.
    pub machine: String,
    /// Guest RAM in bytes: the memory file's size.
    pub mem_bytes: u64,
    pub vm: VmArchState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

/// Every device's state.
#[derive(Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialRegs,
    pub i8042: I8042State,
    /// bulkhead's own IOAPIC, for a split irqchip.
    pub ioapic: Option<IoapicState>,
    /// The virtio devices, in the order they were attached.
    pub virtio: Vec<VirtioState>,
}

/// One virtio device: its register side and queue side.
#[derive(Serialize, Deserialize)]
pub struct VirtioState {
    pub name: String,
    pub transport: TransportState,
    pub handler: HandlerState,
}

/// Why a state file was refused, or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0} bytes is too short for a snapshot state file")]
    TooShort(usize),
    #[error("this is not a bulkhead snapshot state file (its magic is {0:02x?})")]
    Magic([u8; 8]),
    #[error("the snapshot's format is version {found}; this bulkhead reads version {FORMAT_VERSION} only")]
    Version { found: u32 },
    #[error(
        "the state file's header names snapshot kind {0}, which is neither full (0) nor diff (1)"
    )]
    Kind(u32),
    #[error("the state file says its body is {said} bytes, but {found} follow the header")]
    Length { said: u64, found: usize },
    #[error(
        "the state file is corrupt: its CRC32 is {stored:#010x}, its body's is {computed:#010x}"
    )]
    Crc { stored: u32, computed: u32 },
    #[error("the state file's body does not decode: {0}")]
    Body(#[source] postcard::Error),
    #[error("the state file is larger than {MAX_STATE_BYTES} bytes")]
    TooLarge,
    #[error("cannot read the state file: {0}")]
    Read(#[source] std::io::Error),
    #[error("cannot encode the state: {0}")]
    Encode(#[source] postcard::Error),
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(src) = bytes.get(at..at + 4) {
        b.copy_from_slice(src);
    }
    u32::from_le_bytes(b)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(src) = bytes.get(at..at + 8) {
        b.copy_from_slice(src);
    }
    u64::from_le_bytes(b)
}

/// The state file's bytes for `state`, a snapshot of `kind`.
pub fn encode(state: &VmState, kind: SnapshotKind) -> Result<Vec<u8>, SnapshotError> {
    let body = postcard::to_stdvec(state).map_err(SnapshotError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&kind.code().to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Checks a state file's header and CRC and decodes its body.
pub fn decode(bytes: &[u8]) -> Result<VmState, SnapshotError> {
    let (header, body) = bytes
        .split_at_checked(HEADER_LEN)
        .ok_or(SnapshotError::TooShort(bytes.len()))?;
    let mut magic = [0u8; 8];
    magic.copy_from_slice(header.get(..8).unwrap_or(&[0; 8]));
    if magic != MAGIC {
        return Err(SnapshotError::Magic(magic));
    }
    let version = u32_at(header, 8);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version { found: version });
    }
    let kind = u32_at(header, 12);
    if SnapshotKind::from_code(kind).is_none() {
        return Err(SnapshotError::Kind(kind));
    }
    let said = u64_at(header, 16);
    if said != body.len() as u64 {
        return Err(SnapshotError::Length {
            said,
            found: body.len(),
        });
    }
    let stored = u32_at(header, 24);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(SnapshotError::Crc { stored, computed });
    }
    postcard::from_bytes(body).map_err(SnapshotError::Body)
}

/// Reads and decodes a state file from `file`, refusing one larger than any bulkhead writes.
pub fn read(file: &std::fs::File) -> Result<VmState, SnapshotError> {
    let mut bytes = Vec::new();
    file.take(MAX_STATE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(SnapshotError::Read)?;
    if bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(SnapshotError::TooLarge);
    }
    decode(&bytes)
}

#[cfg(test)]
mod tests;
