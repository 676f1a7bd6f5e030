//! What a device's register side (on vCPU threads) and queue side (on the VMM thread) share.
//!
//! The data path takes no lock a vCPU holds: interrupt status and needs-reset are atomics,
//! notifications arrive by ioeventfd. Only the control path (DRIVER_OK, reset) takes the
//! `active` lock, so a reset waits for an in-flight batch to finish and the device never
//! touches rings the driver has already reclaimed.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use vmm_sys_util::eventfd::EventFd;

use super::queue::GuestQueue;
use crate::telemetry::{
    DeviceCounter, DeviceTelemetry, Evidence, OnViolation, RegionError, Response, Violation,
};
use crate::warn_limited;

/// The device's interrupt line (an irqfd) and the InterruptStatus register behind it.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irq: EventFd,
    /// A backend in another process signals the irqfd for used buffers and can not set the
    /// status bit: the register then always reports VRING, and the driver finds out from the
    /// rings themselves whether there is anything new (what it does anyway).
    raised_elsewhere: AtomicBool,
}

impl Interrupt {
    pub fn new(irq: EventFd) -> Interrupt {
        Interrupt {
            status: AtomicU32::new(0),
            irq,
            raised_elsewhere: AtomicBool::new(false),
        }
    }

    pub fn status(&self) -> u32 {
        let vring = if self.raised_elsewhere.load(Ordering::Acquire) {
            VIRTIO_MMIO_INT_VRING
        } else {
            0
        };
        self.status.load(Ordering::Acquire) | vring
    }

    /// Used-buffer interrupts come from a backend in another process, through the irqfd.
    pub fn set_raised_elsewhere(&self) {
        self.raised_elsewhere.store(true, Ordering::Release);
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    pub fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }

    /// The bits a driver has not acknowledged yet, without the ones a backend raises itself.
    pub fn pending(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Sets saved pending bits (a restore). The interrupt itself is not raised again: it was
    /// delivered when it was raised, and the interrupt controller's saved state holds it.
    pub fn restore(&self, bits: u32) {
        self.status.store(
            bits & (VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG),
            Ordering::Release,
        );
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        if let Err(e) = self.irq.write(1) {
            warn_limited!("virtio: cannot raise an interrupt: {e}");
        }
    }
}

/// A device the driver has started: the live queues (which carry the negotiated ring
/// features), indexed by queue number (None for a queue the driver left unused).
#[derive(Debug)]
pub struct Activation {
    pub queues: Vec<Option<GuestQueue>>,
    /// Distinguishes one activation from the next, so the queue side notices a reset even
    /// when it missed the moment in between.
    pub generation: u64,
}

/// Errors making a detached device's shared state.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("cannot create an eventfd for a detached device: {0}")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Telemetry(#[from] RegionError),
}

/// State shared by a device's two sides.
#[derive(Debug)]
pub struct DeviceShared {
    name: String,
    pub interrupt: Interrupt,
    pub telemetry: DeviceTelemetry,
    on_violation: OnViolation,
    needs_reset: AtomicBool,
    /// Written on activation and on reset, to wake the queue side.
    state_evt: EventFd,
    active: Mutex<Option<Activation>>,
    generations: AtomicU64,
    /// Configuration changes the host made (added to the driver-visible generation).
    config_changes: AtomicU32,
}

impl DeviceShared {
    pub fn new(
        name: String,
        irq: EventFd,
        state_evt: EventFd,
        telemetry: DeviceTelemetry,
        on_violation: OnViolation,
    ) -> DeviceShared {
        DeviceShared {
            name,
            interrupt: Interrupt::new(irq),
            telemetry,
            on_violation,
            needs_reset: AtomicBool::new(false),
            state_evt,
            active: Mutex::new(None),
            generations: AtomicU64::new(0),
            config_changes: AtomicU32::new(0),
        }
    }

    /// A device outside any VM: counters of its own and eventfds nobody else watches. For
    /// tests, benchmarks and fuzzing.
    pub fn detached(
        name: &str,
        on_violation: OnViolation,
    ) -> Result<Arc<DeviceShared>, SharedError> {
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(SharedError::EventFd);
        Ok(Arc::new(DeviceShared::new(
            name.to_string(),
            evt()?,
            evt()?,
            DeviceTelemetry::detached()?,
            on_violation,
        )))
    }

    /// The device's name in logs and counters, e.g. `virtio-blk0`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn state_evt(&self) -> &EventFd {
        &self.state_evt
    }

    /// Locks the activation (the queue side, and the control path).
    pub fn active(&self) -> MutexGuard<'_, Option<Activation>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the queue side with `queues`.
    pub fn activate(&self, queues: Vec<Option<GuestQueue>>) {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        *self.active() = Some(Activation { queues, generation });
        self.wake();
    }

    /// Stops the queue side (the driver reset the device). Waits for an in-flight batch.
    pub fn deactivate(&self) {
        *self.active() = None;
        self.needs_reset.store(false, Ordering::Release);
        self.interrupt.clear();
        self.wake();
    }

    fn wake(&self) {
        if let Err(e) = self.state_evt.write(1) {
            warn_limited!("{}: cannot wake the queue side: {e}", self.name);
        }
    }

    /// Tells the driver the device's configuration changed (a disk's new capacity): a new
    /// configuration generation, then the interrupt.
    pub fn config_changed(&self) {
        self.config_changes.fetch_add(1, Ordering::AcqRel);
        self.interrupt.raise(VIRTIO_MMIO_INT_CONFIG);
        self.telemetry.add(DeviceCounter::Interrupts, 1);
    }

    /// How many times the host changed the configuration.
    pub fn config_changes(&self) -> u32 {
        self.config_changes.load(Ordering::Acquire)
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// Sets a saved NEEDS_RESET without raising a configuration interrupt again (a restore).
    pub fn restore_needs_reset(&self, needs_reset: bool) {
        self.needs_reset.store(needs_reset, Ordering::Release);
    }

    /// The device can not go on until the driver resets it: say so through the status
    /// register and a configuration-change interrupt. True if it was not already so.
    pub fn set_needs_reset(&self) -> bool {
        if self.needs_reset.swap(true, Ordering::AcqRel) {
            return false;
        }
        warn_limited!("{}: device needs a reset", self.name);
        self.interrupt.raise(VIRTIO_MMIO_INT_CONFIG);
        self.telemetry.add(DeviceCounter::Interrupts, 1);
        true
    }

    /// Counts and reports a refusal, then responds as `--on-violation` says: by default a
    /// virtio protocol violation puts the device in NEEDS_RESET, so the driver must start it
    /// again before it serves anything more.
    pub fn violation(&self, v: impl Into<Violation>, evidence: Evidence) {
        let v = v.into();
        self.telemetry.refuse(v, evidence);
        let reset = v
            .rule()
            .is_some_and(|rule| self.on_violation.response(rule) == Response::ResetDevice);
        if reset && self.set_needs_reset() {
            self.telemetry.add(DeviceCounter::PolicyResets, 1);
        }
    }

    /// Signals used buffers to the driver.
    pub fn raise_used(&self) {
        self.interrupt.raise(VIRTIO_MMIO_INT_VRING);
        self.telemetry.add(DeviceCounter::Interrupts, 1);
    }
}
