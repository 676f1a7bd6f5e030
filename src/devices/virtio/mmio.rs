//! The virtio-mmio register block (virtio 1.2, section 4.2.2), version 2 only.
//!
//! The transport holds the driver's negotiation state and refuses anything the specification
//! does not allow at that point: status changes out of order, feature or queue writes after
//! FEATURES_OK or DRIVER_OK, a queue size above QueueNumMax or not a power of two, a queue made
//! ready with misaligned rings, a notify for a queue that does not exist, config writes before
//! the driver is ready, and any control register access that is not 32 bits wide and aligned.
//! Each refusal is counted per device by [`TransportViolation`]; none panics.
//!
//! DRIVER_OK hands the queues to the device's queue side through [`DeviceShared`]; writing 0
//! to Status takes them back. Queue notifications never come here: each queue's QueueNotify
//! value is an ioeventfd, so only a notify for a queue that does not exist causes an exit.

use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;

use super::chain::{check_rings, ChainViolation};
use super::queue::GuestQueue;
use super::shared::DeviceShared;
use super::{QueueConfig, VirtioDevice};
use crate::devices::BusDevice;
use crate::warn_limited;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// "BLKH": what the guest sees as the vendor.
const VENDOR_ID: u32 = 0x484b_4c42;
/// The register block, config space included.
pub const MMIO_LEN: u64 = 0x1000;
const CONFIG_START: u64 = VIRTIO_MMIO_CONFIG as u64;

/// Why the transport refused a driver request. One counter per reason per device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum TransportViolation {
    /// A control register access not 32 bits wide and aligned, or outside the block.
    BadAccess,
    /// A status write that skips or undoes a step of the initialisation sequence.
    BadStatusTransition,
    /// Driver features outside what the device offered, or without VIRTIO_F_VERSION_1.
    BadFeatures,
    /// A feature write outside the DRIVER..FEATURES_OK window.
    FeaturesReadOnly,
    /// A queue register write before FEATURES_OK or after DRIVER_OK.
    QueueReadOnly,
    /// QueueNum above QueueNumMax, zero, or not a power of two.
    BadQueueSize,
    /// QueueReady with a missing, misaligned or unset ring, or a bad size.
    BadQueueSetup,
    /// QueueSel or QueueNotify naming a queue that does not exist.
    NoSuchQueue,
    /// A config space write before DRIVER_OK, or one the device refused.
    ConfigWriteRefused,
    /// A read-only register written, or a write-only register read.
    WrongDirection,
    /// A queue notification before DRIVER_OK, or for a queue the driver did not make ready.
    NotifyNotReady,
}

const VIOLATION_KINDS: usize = 11;

impl TransportViolation {
    pub const ALL: [TransportViolation; VIOLATION_KINDS] = [
        TransportViolation::BadAccess,
        TransportViolation::BadStatusTransition,
        TransportViolation::BadFeatures,
        TransportViolation::FeaturesReadOnly,
        TransportViolation::QueueReadOnly,
        TransportViolation::BadQueueSize,
        TransportViolation::BadQueueSetup,
        TransportViolation::NoSuchQueue,
        TransportViolation::ConfigWriteRefused,
        TransportViolation::WrongDirection,
        TransportViolation::NotifyNotReady,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TransportViolation::BadAccess => "bad_access",
            TransportViolation::BadStatusTransition => "bad_status_transition",
            TransportViolation::BadFeatures => "bad_features",
            TransportViolation::FeaturesReadOnly => "features_read_only",
            TransportViolation::QueueReadOnly => "queue_read_only",
            TransportViolation::BadQueueSize => "bad_queue_size",
            TransportViolation::BadQueueSetup => "bad_queue_setup",
            TransportViolation::NoSuchQueue => "no_such_queue",
            TransportViolation::ConfigWriteRefused => "config_write_refused",
            TransportViolation::WrongDirection => "wrong_direction",
            TransportViolation::NotifyNotReady => "notify_not_ready",
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct QueueState {
    max_size: u16,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

impl QueueState {
    fn config(&self) -> QueueConfig {
        QueueConfig {
            size: self.size,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        }
    }

    /// Sizes and alignments from virtio 1.2, section 2.7 (split virtqueues).
    fn is_valid(&self) -> bool {
        self.size != 0
            && self.size <= self.max_size
            && self.size.is_power_of_two()
            && self.desc_table % 16 == 0
            && self.avail_ring % 2 == 0
            && self.used_ring % 4 == 0
    }
}

struct State {
    device: Box<dyn VirtioDevice>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueState>,
    config_generation: u32,
}

/// A virtio device behind its virtio-mmio register block.
pub struct MmioTransport {
    state: Mutex<State>,
    shared: Arc<DeviceShared>,
    mem: GuestMemoryMmap,
}

impl MmioTransport {
    /// The register block of `device`, whose queue side shares `shared`; `mem` is the guest
    /// RAM the driver's rings must lie in.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        shared: Arc<DeviceShared>,
        mem: GuestMemoryMmap,
    ) -> MmioTransport {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max_size| QueueState {
                max_size,
                ..Default::default()
            })
            .collect();
        MmioTransport {
            state: Mutex::new(State {
                device,
                status: 0,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                queue_sel: 0,
                queues,
                config_generation: 0,
            }),
            shared,
            mem,
        }
    }

    /// How often the driver was refused for `reason`.
    pub fn violations(&self, reason: TransportViolation) -> u64 {
        self.shared.counters.refusals(reason)
    }

    /// The driver status register as the guest sees it (NEEDS_RESET included).
    pub fn status(&self) -> u32 {
        self.status_of(&self.lock())
    }

    fn status_of(&self, state: &State) -> u32 {
        if self.shared.needs_reset() {
            state.status | VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            state.status
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refuse(&self, reason: TransportViolation, offset: u64) -> bool {
        self.shared.counters.refuse(reason);
        warn_limited!(
            "{}: refused {} at register {offset:#x}",
            self.shared.name(),
            reason.name()
        );
        false
    }

    fn device_features(state: &State) -> u64 {
        state.device.features() | (1u64 << VIRTIO_F_VERSION_1)
    }

    fn read_register(&self, state: &State, offset: u32) -> Option<u32> {
        let queue = state.queues.get(state.queue_sel as usize);
        let features = Self::device_features(state);
        Some(match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => state.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match state.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            // A queue that does not exist reads as size 0: the driver must not use it.
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size)),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.shared.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status_of(state),
            VIRTIO_MMIO_CONFIG_GENERATION => state.config_generation,
            // No shared memory regions: length all-ones means "none".
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_SHM_BASE_LOW | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            _ => return None,
        })
    }

    fn write_status(&self, state: &mut State, value: u32, offset: u64) -> bool {
        if value == 0 {
            // Waits for an in-flight batch, so the device lets go of the rings first.
            self.shared.deactivate();
            state.device.reset();
            let queues = state.queues.iter().map(|q| QueueState {
                max_size: q.max_size,
                ..Default::default()
            });
            state.queues = queues.collect();
            state.status = 0;
            state.driver_features = 0;
            state.queue_sel = 0;
            return true;
        }
        let old = state.status;
        // Drivers write back what they read, which may include the device's NEEDS_RESET.
        let value = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        if value & VIRTIO_CONFIG_S_FAILED != 0 {
            state.status |= VIRTIO_CONFIG_S_FAILED;
            return true;
        }
        const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        const DRV: u32 = ACK | VIRTIO_CONFIG_S_DRIVER;
        const FOK: u32 = DRV | VIRTIO_CONFIG_S_FEATURES_OK;
        const DOK: u32 = FOK | VIRTIO_CONFIG_S_DRIVER_OK;
        let allowed = matches!(
            (old, value),
            (0, ACK) | (ACK, DRV) | (DRV, FOK) | (FOK, DOK)
        );
        if old == value {
            return true;
        }
        if !allowed || old & VIRTIO_CONFIG_S_FAILED != 0 {
            return self.refuse(TransportViolation::BadStatusTransition, offset);
        }
        if value == FOK {
            let offered = Self::device_features(state);
            let acked = state.driver_features;
            if acked & !offered != 0 || acked & (1u64 << VIRTIO_F_VERSION_1) == 0 {
                // FEATURES_OK stays clear, which tells the driver the negotiation failed.
                return self.refuse(TransportViolation::BadFeatures, offset);
            }
        }
        if value == DOK {
            if state.queues.iter().any(|q| q.ready && !q.is_valid()) {
                return self.refuse(TransportViolation::BadQueueSetup, offset);
            }
            let configs: Vec<Option<QueueConfig>> = state
                .queues
                .iter()
                .map(|q| q.ready.then(|| q.config()))
                .collect();
            let features = state.driver_features;
            state.status = value;
            if let Err(e) = state.device.activate(features, &configs) {
                warn_limited!("{}: device activation failed: {e}", self.shared.name());
                self.shared.set_needs_reset();
                return true;
            }
            let mut queues = Vec::with_capacity(configs.len());
            for config in configs {
                match config.map(|c| GuestQueue::new(&self.mem, c, features)) {
                    Some(Err(reason)) => {
                        // QueueReady checked the rings, so this is not expected; still refuse.
                        self.shared.counters.refuse(reason);
                        self.shared.set_needs_reset();
                        return true;
                    }
                    other => queues.push(other.and_then(Result::ok)),
                }
            }
            self.shared.activate(queues);
            return true;
        }
        state.status = value;
        true
    }

    fn write_register(&self, state: &mut State, offset: u32, value: u32) -> bool {
        let at = u64::from(offset);
        let features_open = state.status & VIRTIO_CONFIG_S_DRIVER != 0
            && state.status & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK) == 0;
        let queues_open = state.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && state.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => state.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => state.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                if !features_open {
                    return self.refuse(TransportViolation::FeaturesReadOnly, at);
                }
                let shift = match state.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return self.refuse(TransportViolation::BadFeatures, at),
                };
                state.driver_features = (state.driver_features & !(0xffff_ffffu64 << shift))
                    | (u64::from(value) << shift);
            }
            VIRTIO_MMIO_QUEUE_SEL => {
                if !queues_open {
                    return self.refuse(TransportViolation::QueueReadOnly, at);
                }
                if value as usize >= state.queues.len() {
                    return self.refuse(TransportViolation::NoSuchQueue, at);
                }
                state.queue_sel = value;
            }
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => {
                if !queues_open {
                    return self.refuse(TransportViolation::QueueReadOnly, at);
                }
                return self.write_queue_register(state, offset, value);
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Notifications normally arrive by ioeventfd and never reach here; one that
                // does is either for a queue that does not exist or sent before DRIVER_OK.
                if value as usize >= state.queues.len() {
                    return self.refuse(TransportViolation::NoSuchQueue, at);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.shared.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => return self.write_status(state, value, at),
            _ => return self.refuse(TransportViolation::WrongDirection, at),
        }
        true
    }

    fn write_queue_register(&self, state: &mut State, offset: u32, value: u32) -> bool {
        let at = u64::from(offset);
        let Some(queue) = state.queues.get_mut(state.queue_sel as usize) else {
            return self.refuse(TransportViolation::NoSuchQueue, at);
        };
        if queue.ready && offset != VIRTIO_MMIO_QUEUE_READY {
            // A live queue's layout can not change under the device.
            return self.refuse(TransportViolation::QueueReadOnly, at);
        }
        let set_low = |field: &mut u64| *field = (*field & !0xffff_ffff) | u64::from(value);
        let set_high = |field: &mut u64| *field = (*field & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            VIRTIO_MMIO_QUEUE_NUM => {
                let size = u16::try_from(value).unwrap_or(0);
                if size == 0 || size > queue.max_size || !size.is_power_of_two() {
                    return self.refuse(TransportViolation::BadQueueSize, at);
                }
                queue.size = size;
            }
            VIRTIO_MMIO_QUEUE_READY => match value {
                0 => queue.ready = false,
                1 => {
                    if !queue.is_valid() {
                        return self.refuse(TransportViolation::BadQueueSetup, at);
                    }
                    if check_rings(&self.mem, &queue.config()).is_err() {
                        self.shared.counters.refuse(ChainViolation::RingOutsideRam);
                        warn_limited!(
                            "{}: refused a queue whose rings are not in guest RAM",
                            self.shared.name()
                        );
                        return false;
                    }
                    queue.ready = true;
                }
                _ => return self.refuse(TransportViolation::BadQueueSetup, at),
            },
            VIRTIO_MMIO_QUEUE_DESC_LOW => set_low(&mut queue.desc_table),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => set_high(&mut queue.desc_table),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => set_low(&mut queue.avail_ring),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => set_high(&mut queue.avail_ring),
            VIRTIO_MMIO_QUEUE_USED_LOW => set_low(&mut queue.used_ring),
            VIRTIO_MMIO_QUEUE_USED_HIGH => set_high(&mut queue.used_ring),
            _ => return self.refuse(TransportViolation::WrongDirection, at),
        }
        true
    }
}

/// Splits an access into (register, value) when it is a 32-bit aligned control register access.
fn control_register(offset: u64, len: usize) -> Option<u32> {
    (offset < CONFIG_START && len == 4 && offset % 4 == 0).then_some(offset as u32)
}

impl BusDevice for MmioTransport {
    fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        let state = self.lock();
        if offset >= CONFIG_START {
            return state.device.read_config(offset - CONFIG_START, data);
        }
        let Some(register) = control_register(offset, data.len()) else {
            drop(state);
            return self.refuse(TransportViolation::BadAccess, offset);
        };
        match self.read_register(&state, register) {
            Some(value) => {
                data.copy_from_slice(&value.to_le_bytes());
                true
            }
            None => {
                drop(state);
                self.refuse(TransportViolation::WrongDirection, offset)
            }
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> bool {
        let mut state = self.lock();
        if offset >= CONFIG_START {
            if state.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
                || !state.device.write_config(offset - CONFIG_START, data)
            {
                drop(state);
                return self.refuse(TransportViolation::ConfigWriteRefused, offset);
            }
            state.config_generation = state.config_generation.wrapping_add(1);
            return true;
        }
        let (Some(register), Ok(bytes)) = (
            control_register(offset, data.len()),
            <[u8; 4]>::try_from(data),
        ) else {
            drop(state);
            return self.refuse(TransportViolation::BadAccess, offset);
        };
        self.write_register(&mut state, register, u32::from_le_bytes(bytes))
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
