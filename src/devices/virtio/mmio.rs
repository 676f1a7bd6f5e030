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

use vmm_sys_util::eventfd::EventFd;

use crate::vstate::dirty::GuestMemoryMmap;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;

use super::chain::check_rings;
use super::queue::GuestQueue;
use super::shared::DeviceShared;
use super::{QueueConfig, VirtioDevice};
use crate::devices::BusDevice;
use crate::telemetry::{Evidence, TransportViolation};
use crate::warn_limited;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// "BLKH": what the guest sees as the vendor.
const VENDOR_ID: u32 = 0x484b_4c42;
/// The register block, config space included.
pub const MMIO_LEN: u64 = 0x1000;
const CONFIG_START: u64 = VIRTIO_MMIO_CONFIG as u64;

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

    /// What is wrong with the queue's size or ring alignment (virtio 1.2, section 2.7, split
    /// virtqueues), if anything.
    fn problem(&self) -> Option<TransportViolation> {
        if self.size == 0 || self.size > self.max_size || !self.size.is_power_of_two() {
            return Some(TransportViolation::BadQueueSetup);
        }
        if self.desc_table % 16 != 0 || self.avail_ring % 2 != 0 || self.used_ring % 4 != 0 {
            return Some(TransportViolation::MisalignedRing);
        }
        None
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
    /// Each queue's notification eventfd, for notifications that exit to user space (all of
    /// them until the worker attaches ioeventfds at the first DRIVER_OK).
    notify: Vec<EventFd>,
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
            notify: Vec::new(),
        }
    }

    /// Passes the driver's QUEUE_NOTIFY writes to `evts` (queue n's to `evts[n]`).
    pub fn notify_by(mut self, evts: Vec<EventFd>) -> MmioTransport {
        self.notify = evts;
        self
    }

    /// How often the driver was refused for `reason`.
    pub fn violations(&self, reason: TransportViolation) -> u64 {
        self.shared.telemetry.refusals(reason)
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

    /// Refuses an access to register `offset` (writing `value`, 0 for a read), counts it and
    /// reports it with its evidence. Always false, the bus's "refused".
    fn refuse(&self, reason: TransportViolation, offset: u64, value: u64) -> bool {
        self.refuse_on(reason, None, offset, value)
    }

    /// [`Self::refuse`] for an access that concerns queue `queue`.
    fn refuse_on(
        &self,
        reason: TransportViolation,
        queue: Option<u32>,
        offset: u64,
        value: u64,
    ) -> bool {
        let queue = queue.and_then(|q| u16::try_from(q).ok());
        self.shared.violation(
            reason,
            Evidence {
                queue,
                a: offset,
                b: value,
            },
        );
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
            VIRTIO_MMIO_CONFIG_GENERATION => state
                .config_generation
                .wrapping_add(self.shared.config_changes()),
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
            return self.refuse(
                TransportViolation::BadStatusTransition,
                offset,
                value.into(),
            );
        }
        if value == FOK {
            let offered = Self::device_features(state);
            let acked = state.driver_features;
            if acked & !offered != 0 || acked & (1u64 << VIRTIO_F_VERSION_1) == 0 {
                // FEATURES_OK stays clear, which tells the driver the negotiation failed.
                return self.refuse(TransportViolation::BadFeatures, offset, acked);
            }
        }
        if value == DOK {
            let broken = (0u32..)
                .zip(&state.queues)
                .find_map(|(i, q)| q.ready.then(|| q.problem()).flatten().map(|p| (i, p)));
            if let Some((queue, problem)) = broken {
                return self.refuse_on(problem, Some(queue), offset, value.into());
            }
            let configs: Vec<Option<QueueConfig>> = state
                .queues
                .iter()
                .map(|q| q.ready.then(|| q.config()))
                .collect();
            let features = state.driver_features;
            state.status = value;
            if let Err(e) = state.device.activate(features, &configs) {
                // The status write itself is taken (the driver sees DRIVER_OK with
                // NEEDS_RESET), whatever the response policy: the device can not run.
                let (reason, queue) = e.violation();
                self.refuse_on(reason, Some(queue.into()), offset, value.into());
                self.shared.set_needs_reset();
                return true;
            }
            let mut queues = Vec::with_capacity(configs.len());
            for config in configs {
                match config.map(|c| GuestQueue::new(&self.mem, c, features)) {
                    Some(Err(error)) => {
                        // QueueReady checked the rings, so this is not expected; still refuse.
                        self.shared.violation(error.reason, error.evidence(None));
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
        let v = u64::from(value);
        let status = state.status;
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => state.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => state.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                if status & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK) != 0 {
                    // Renegotiating under a device that has accepted its features.
                    return self.refuse(TransportViolation::FeaturesLocked, at, v);
                }
                if status & VIRTIO_CONFIG_S_DRIVER == 0 {
                    return self.refuse(TransportViolation::FeaturesEarly, at, v);
                }
                let shift = match state.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    sel => return self.refuse(TransportViolation::BadFeatures, at, sel.into()),
                };
                state.driver_features = (state.driver_features & !(0xffff_ffffu64 << shift))
                    | (u64::from(value) << shift);
            }
            // Selecting a queue changes nothing by itself, so it is allowed in any state
            // (Linux selects queues to tear them down after a reset).
            VIRTIO_MMIO_QUEUE_SEL => {
                if value as usize >= state.queues.len() {
                    return self.refuse_on(TransportViolation::NoSuchQueue, Some(value), at, v);
                }
                state.queue_sel = value;
            }
            // Disabling a queue of a device that is reset is what a driver tearing it down
            // does; there is nothing to disable.
            VIRTIO_MMIO_QUEUE_READY if value == 0 && status == 0 => {}
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => {
                let sel = Some(state.queue_sel);
                if status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
                    // The CVE-2026-5747 pattern: a live queue's layout rewritten.
                    return self.refuse_on(TransportViolation::QueueLocked, sel, at, v);
                }
                if status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                    return self.refuse_on(TransportViolation::QueueEarly, sel, at, v);
                }
                return self.write_queue_register(state, offset, value);
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Once the device has run, notifications arrive by ioeventfd and only those
                // for a queue that does not exist reach here. The queue side judges the rest
                // (a notification before DRIVER_OK is its violation to count).
                if value as usize >= state.queues.len() {
                    return self.refuse_on(TransportViolation::NoSuchQueue, Some(value), at, v);
                }
                if let Some(evt) = self.notify.get(value as usize) {
                    if let Err(e) = evt.write(1) {
                        warn_limited!(
                            "{}: cannot pass a queue notification on: {e}",
                            self.shared.name()
                        );
                    }
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.shared.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => return self.write_status(state, value, at),
            _ => return self.refuse(TransportViolation::WrongDirection, at, v),
        }
        true
    }

    fn write_queue_register(&self, state: &mut State, offset: u32, value: u32) -> bool {
        let at = u64::from(offset);
        let v = u64::from(value);
        let sel = Some(state.queue_sel);
        let Some(queue) = state.queues.get_mut(state.queue_sel as usize) else {
            return self.refuse_on(TransportViolation::NoSuchQueue, sel, at, v);
        };
        if queue.ready && offset != VIRTIO_MMIO_QUEUE_READY {
            // A ready queue's layout can not change under the device.
            return self.refuse_on(TransportViolation::QueueLocked, sel, at, v);
        }
        let set_low = |field: &mut u64| *field = (*field & !0xffff_ffff) | u64::from(value);
        let set_high = |field: &mut u64| *field = (*field & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            VIRTIO_MMIO_QUEUE_NUM => {
                let size = u16::try_from(value).unwrap_or(0);
                if size == 0 || size > queue.max_size || !size.is_power_of_two() {
                    return self.refuse_on(TransportViolation::BadQueueSize, sel, at, v);
                }
                queue.size = size;
            }
            VIRTIO_MMIO_QUEUE_READY => match value {
                0 => queue.ready = false,
                1 => {
                    if let Some(problem) = queue.problem() {
                        return self.refuse_on(problem, sel, at, v);
                    }
                    if let Err(error) = check_rings(&self.mem, &queue.config()) {
                        let queue = sel.and_then(|q| u16::try_from(q).ok());
                        self.shared.violation(error.reason, error.evidence(queue));
                        warn_limited!(
                            "{}: refused a queue whose rings are not in guest RAM",
                            self.shared.name()
                        );
                        return false;
                    }
                    queue.ready = true;
                }
                _ => return self.refuse_on(TransportViolation::BadQueueSetup, sel, at, v),
            },
            VIRTIO_MMIO_QUEUE_DESC_LOW => set_low(&mut queue.desc_table),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => set_high(&mut queue.desc_table),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => set_low(&mut queue.avail_ring),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => set_high(&mut queue.avail_ring),
            VIRTIO_MMIO_QUEUE_USED_LOW => set_low(&mut queue.used_ring),
            VIRTIO_MMIO_QUEUE_USED_HIGH => set_high(&mut queue.used_ring),
            _ => return self.refuse_on(TransportViolation::WrongDirection, sel, at, v),
        }
        true
    }
}

/// The first bytes of a written value as a little-endian number, for evidence.
fn word(data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    for (dst, src) in bytes.iter_mut().zip(data) {
        *dst = *src;
    }
    u64::from_le_bytes(bytes)
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
            return self.refuse(TransportViolation::BadAccess, offset, 0);
        };
        match self.read_register(&state, register) {
            Some(value) => {
                data.copy_from_slice(&value.to_le_bytes());
                true
            }
            None => {
                drop(state);
                self.refuse(TransportViolation::WrongDirection, offset, 0)
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
                return self.refuse(TransportViolation::ConfigWriteRefused, offset, word(data));
            }
            state.config_generation = state.config_generation.wrapping_add(1);
            return true;
        }
        let (Some(register), Ok(bytes)) = (
            control_register(offset, data.len()),
            <[u8; 4]>::try_from(data),
        ) else {
            drop(state);
            return self.refuse(TransportViolation::BadAccess, offset, word(data));
        };
        self.write_register(&mut state, register, u32::from_le_bytes(bytes))
    }
}

mod state;
pub use state::{QueueRegs, RingPosition, TransportState, TransportStateError};

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
