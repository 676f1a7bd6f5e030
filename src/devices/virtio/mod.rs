//! Virtio devices over the virtio-mmio transport (version 2, modern only).
//!
//! Each device splits its register logic (the [`VirtioDevice`] implementation: features,
//! config space, activation) from its queue handling (on the VMM thread's event loop). The
//! transport in [`mmio`] enforces the driver's side of the protocol and counts every request
//! it refuses, by reason.

pub mod chain;
pub mod mmio;

pub use mmio::{MmioTransport, TransportViolation};

/// A virtqueue as the driver configured it, handed to the device when it is activated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueConfig {
    pub size: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
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
    /// Starts the device with the negotiated features and configured queues. An error marks the
    /// device as needing a reset.
    fn activate(&mut self, features: u64, queues: &[QueueConfig]) -> Result<(), String>;
    /// Returns the device to its initial state (the driver wrote 0 to Status).
    fn reset(&mut self);
}
