//! A transport's state as a snapshot keeps it, and its checked restore. The saved state is host
//! input that a corrupted or crafted snapshot could bend: a restore refuses what the transport
//! itself would have refused the driver (a status out of sequence, features the device does not
//! offer, a queue whose rings are misplaced or outside RAM), so a restored device is never in a
//! state a running one could not reach.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
};

use super::{MmioTransport, QueueState};
use crate::devices::virtio::chain::check_rings;
use crate::devices::virtio::queue::GuestQueue;
use crate::devices::virtio::QueueConfig;

/// One queue's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// Where the device is in a live queue's rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingPosition {
    pub next_avail: u16,
    pub next_used: u16,
}

/// A virtio-mmio transport's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<QueueRegs>,
    /// The configuration generation the driver reads.
    pub config_generation: u32,
    /// Interrupt bits the driver has not acknowledged.
    pub interrupt_status: u32,
    pub needs_reset: bool,
    /// Each queue's position, when the device is live (after DRIVER_OK).
    pub rings: Option<Vec<Option<RingPosition>>>,
}

/// Why a saved transport state was refused: what no device of this kind could be in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportStateError {
    #[error("it is device type {saved}, not {actual}")]
    DeviceType { saved: u32, actual: u32 },
    #[error("it has {saved} queues, the device {actual}")]
    QueueCount { saved: usize, actual: usize },
    #[error("status {0:#x} is not one a driver can reach")]
    Status(u32),
    #[error("the driver's features {0:#x} are not all offered")]
    Features(u64),
    #[error("queue {0} is misplaced, the wrong size, or outside guest RAM")]
    Queue(usize),
    #[error("a live device's queue positions do not match its ready queues")]
    Rings,
}

const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRV: u32 = ACK | VIRTIO_CONFIG_S_DRIVER;
const FOK: u32 = DRV | VIRTIO_CONFIG_S_FEATURES_OK;
const DOK: u32 = FOK | VIRTIO_CONFIG_S_DRIVER_OK;

impl MmioTransport {
    /// The transport's state. `held(q)` is how many chains the queue side took from queue `q`
    /// and still holds unanswered (a request the rate limiter parked, one half done): the saved
    /// position leaves them available, so the restored device takes them again.
    pub fn save(&self, held: impl Fn(usize) -> u16) -> TransportState {
        let state = self.lock();
        let rings = self.shared.active().as_ref().map(|active| {
            active
                .queues
                .iter()
                .enumerate()
                .map(|(q, queue)| {
                    queue.as_ref().map(|queue| {
                        let (next_avail, next_used) = queue.position();
                        RingPosition {
                            next_avail: next_avail.wrapping_sub(held(q)),
                            next_used,
                        }
                    })
                })
                .collect()
        });
        TransportState {
            device_type: state.device.device_type(),
            status: state.status,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            queues: state
                .queues
                .iter()
                .map(|q| QueueRegs {
                    size: q.size,
                    ready: q.ready,
                    desc_table: q.desc_table,
                    avail_ring: q.avail_ring,
                    used_ring: q.used_ring,
                })
                .collect(),
            config_generation: state
                .config_generation
                .wrapping_add(self.shared.config_changes()),
            interrupt_status: self.shared.interrupt.pending(),
            needs_reset: self.shared.needs_reset(),
            rings,
        }
    }

    /// Puts a device that has not run yet in a saved state; a live one is handed to its queue
    /// side at the saved positions. Nothing changes when the state is refused.
    pub fn restore(&self, saved: &TransportState) -> Result<(), TransportStateError> {
        let mut state = self.lock();
        let actual = state.device.device_type();
        if saved.device_type != actual {
            return Err(TransportStateError::DeviceType {
                saved: saved.device_type,
                actual,
            });
        }
        if saved.queues.len() != state.queues.len() {
            return Err(TransportStateError::QueueCount {
                saved: saved.queues.len(),
                actual: state.queues.len(),
            });
        }
        let status = saved.status & !VIRTIO_CONFIG_S_FAILED;
        if !matches!(status, 0 | ACK | DRV | FOK | DOK) {
            return Err(TransportStateError::Status(saved.status));
        }
        // Before FEATURES_OK the driver may have written anything (the transport checks it at
        // FEATURES_OK); from then on the features are what the device accepted.
        let offered = Self::device_features(&state);
        if status & VIRTIO_CONFIG_S_FEATURES_OK != 0 && saved.driver_features & !offered != 0 {
            return Err(TransportStateError::Features(saved.driver_features));
        }
        let mut queues = Vec::with_capacity(saved.queues.len());
        for (i, (regs, current)) in saved.queues.iter().zip(&state.queues).enumerate() {
            let q = QueueState {
                max_size: current.max_size,
                size: regs.size,
                ready: regs.ready,
                desc_table: regs.desc_table,
                avail_ring: regs.avail_ring,
                used_ring: regs.used_ring,
            };
            if q.ready && (q.problem().is_some() || check_rings(&self.mem, &q.config()).is_err()) {
                return Err(TransportStateError::Queue(i));
            }
            queues.push(q);
        }
        // A device the driver started is live, unless its start failed (DRIVER_OK taken, but
        // NEEDS_RESET and no queues): that one waits for the driver's reset, as it did.
        let failed_start = status == DOK && saved.rings.is_none() && saved.needs_reset;
        let live = status == DOK && saved.status & VIRTIO_CONFIG_S_FAILED == 0 && !failed_start;
        let mut guest_queues = Vec::new();
        if live {
            let rings = saved.rings.as_ref().ok_or(TransportStateError::Rings)?;
            if rings.len() != queues.len() {
                return Err(TransportStateError::Rings);
            }
            for (i, (q, ring)) in queues.iter().zip(rings).enumerate() {
                guest_queues.push(match (q.ready, ring) {
                    (true, Some(pos)) => {
                        let mut queue =
                            GuestQueue::new(&self.mem, q.config(), saved.driver_features)
                                .map_err(|_| TransportStateError::Queue(i))?;
                        queue.set_position(pos.next_avail, pos.next_used);
                        Some(queue)
                    }
                    (false, None) => None,
                    _ => return Err(TransportStateError::Rings),
                });
            }
            let configs: Vec<Option<QueueConfig>> =
                queues.iter().map(|q| q.ready.then(|| q.config())).collect();
            if state
                .device
                .activate(saved.driver_features, &configs)
                .is_err()
            {
                return Err(TransportStateError::Rings);
            }
        }
        state.status = saved.status;
        state.device_features_sel = saved.device_features_sel;
        state.driver_features_sel = saved.driver_features_sel;
        state.driver_features = saved.driver_features;
        state.queue_sel = saved.queue_sel.min(queues.len().saturating_sub(1) as u32);
        state.queues = queues;
        state.config_generation = saved.config_generation;
        self.shared.interrupt.restore(saved.interrupt_status);
        self.shared.restore_needs_reset(saved.needs_reset);
        if live {
            self.shared.activate(guest_queues);
        }
        Ok(())
    }
}
