//! virtio-vsock (virtio 1.2 section 5.10) with a user-space back-end on Unix sockets.
//!
//! The host reaches a guest listener by connecting to the VM's socket `uds` and writing
//! `CONNECT <port>\n`; bulkhead answers `OK <host port>\n` once the guest accepts. A guest
//! connection to host port P goes to the socket `uds_P`. The guest may only speak as its own
//! CID and only to the host (CID 2): a tenant can not reach another VM this way. Each CID is
//! claimed for the VM's lifetime through an abstract socket, so two VMs in one network
//! namespace can not share it.

mod conn;
mod muxer;
mod packet;
pub mod sock;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

pub use muxer::{VsockQueues, CONN_BUFFER_BYTES};

/// The host-side buffers a VM's vsock device may hold by default: 32 MiB, or 102 connections
/// of [`CONN_BUFFER_BYTES`] each.
pub const DEFAULT_BUFFER_BUDGET: u64 = 32 << 20;

use super::{read_config_bytes, VirtioDevice};

const VIRTIO_ID_VSOCK: u32 = 19;
const QUEUE_SIZES: [u16; 3] = [256, 256, 256];

/// Errors setting up the back-end.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock CID {0} is in use by another VM on this host")]
    CidInUse(u64),
    #[error("cannot listen on vsock socket {path} (it must not exist yet): {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The sockets a vsock device needs, opened while the VM is built.
#[derive(Debug)]
pub struct VsockBackend {
    pub cid: u64,
    pub uds: PathBuf,
    listener: OwnedFd,
    /// Held for the VM's lifetime: the claim on the CID, unless CIDs are per VM.
    cid_claim: Option<OwnedFd>,
    /// Bytes the connections' buffers may take on the host's heap, all together.
    buffer_budget: u64,
    /// How a guest connection to host port P reaches the socket `uds_P`.
    connector: Connector,
}

/// How the device connects a guest's connection to host port P.
#[derive(Debug)]
pub enum Connector {
    /// Itself, to `uds_P` (tests and fuzzing: a process with `connect` in its filter).
    Direct,
    /// Through the supervisor, which connects and hands the socket over: the VM process's
    /// filter then has no `connect` at all.
    Broker(crate::broker::BrokerClient),
}

impl VsockBackend {
    /// Opens the VM's socket at `uds`. With `exclusive`, no other VM on the host may have
    /// `cid`; without (Firecracker's semantics, where Kata gives every pod CID 3), the CID is
    /// the VM's own business: the guest's packets are checked against it, nothing else.
    pub fn open(cid: u64, uds: &Path, exclusive: bool) -> Result<VsockBackend, VsockError> {
        let cid_claim = if exclusive {
            let claim = format!("\0bulkhead-vsock-cid-{cid}");
            Some(sock::listen(claim.as_bytes()).map_err(|_| VsockError::CidInUse(cid))?)
        } else {
            None
        };
        use std::os::unix::ffi::OsStrExt;
        let listener =
            sock::listen(uds.as_os_str().as_bytes()).map_err(|source| VsockError::Listen {
                path: uds.to_path_buf(),
                source,
            })?;
        Ok(VsockBackend {
            cid,
            uds: uds.to_path_buf(),
            listener,
            cid_claim,
            buffer_budget: DEFAULT_BUFFER_BUDGET,
            connector: Connector::Direct,
        })
    }

    /// Guest connections go through the supervisor's broker.
    pub fn with_broker(mut self, broker: crate::broker::BrokerClient) -> VsockBackend {
        self.connector = Connector::Broker(broker);
        self
    }

    /// Bounds the heap all connections together may pin: each reserves
    /// [`CONN_BUFFER_BYTES`], so `bytes` sets how many may be open (at least one).
    pub fn with_buffer_budget(mut self, bytes: u64) -> VsockBackend {
        self.buffer_budget = bytes;
        self
    }
}

/// The register side: the guest's CID in config space.
#[derive(Debug)]
pub struct Vsock {
    cid: u64,
}

impl Vsock {
    pub fn new(cid: u64) -> Vsock {
        Vsock { cid }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) -> bool {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data)
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
        false
    }
}
