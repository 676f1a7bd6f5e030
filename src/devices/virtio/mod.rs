//! Virtio devices over the virtio-mmio transport (version 2, modern only).
//!
//! Each device splits its register logic (the [`VirtioDevice`] implementation: features,
//! config space, activation) from its queue handling (on the VMM thread's event loop). The
//! transport in [`mmio`] enforces the driver's side of the protocol and counts every request
//! it refuses, by reason.

pub mod block;
pub mod chain;
pub mod context;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rate_limiter;
pub mod rng;
pub mod shared;
pub mod vhost_user;
pub mod vsock;
pub mod worker;

use crate::telemetry::TransportViolation;
pub use mmio::MmioTransport;
pub use shared::DeviceShared;
pub use worker::{HandlerState, QueueContext, QueueHandler, RequestError, VirtioWorker};

/// A virtqueue as the driver configured it, handed to the device when it is activated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueConfig {
    pub size: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// Copies `data.len()` bytes of `config` at `offset` into `data`; false (refused) when the
/// access reaches outside the config space.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) -> bool {
    let Some(src) = usize::try_from(offset)
        .ok()
        .and_then(|start| config.get(start..start.checked_add(data.len())?))
    else {
        return false;
    };
    data.copy_from_slice(src);
    true
}

/// Why a device refused to start at DRIVER_OK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ActivateError {
    /// The driver set DRIVER_OK without making this queue ready.
    #[error("queue {0} is not ready")]
    QueueNotReady(u16),
}

impl ActivateError {
    /// The refusal reason it is counted under, and the queue it names.
    pub fn violation(self) -> (TransportViolation, u16) {
        match self {
            ActivateError::QueueNotReady(q) => (TransportViolation::QueueNotReady, q),
        }
    }
}

/// The register side of a virtio device.
pub trait VirtioDevice: Send {
    /// The virtio device id (2 block, 1 net, 19 vsock, 4 entropy).
    fn device_type(&self) -> u32;
    /// Features offered; the transport adds VIRTIO_F_VERSION_1 itself.
    fn features(&self) -> u64;
    /// The largest size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device-specific config space. Returns false to refuse the access.
    fn read_config(&self, offset: u64, data: &mut [u8]) -> bool;
    /// Writes device-specific config space. Returns false to refuse the access.
    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool;
    /// Checks that the device can start with the negotiated features and the queues the
    /// driver made ready (indexed by queue number). An error is the driver's fault: the
    /// transport counts it as a violation and marks the device as needing a reset. The queues
    /// then go to the device's queue side. By default every queue must be ready.
    fn activate(
        &mut self,
        _features: u64,
        queues: &[Option<QueueConfig>],
    ) -> Result<(), ActivateError> {
        match queues.iter().position(Option::is_none) {
            Some(index) => Err(ActivateError::QueueNotReady(
                u16::try_from(index).unwrap_or(u16::MAX),
            )),
            None => Ok(()),
        }
    }
    /// Returns the register side to its initial state (the driver wrote 0 to Status).
    fn reset(&mut self) {}
}
