//! The queue side of a device: runs on the VMM thread's event loop, woken by the queues'
//! notification eventfds and by activation and reset.
//!
//! A notification reaches the eventfd two ways: through the MMIO transport (an exit to user
//! space) until the driver first starts the device, then through an ioeventfd inside KVM,
//! which this worker attaches at that first activation. Attaching them at build time instead
//! cost every short-lived VM about 11 ms: each one queues an SRCU callback that KVM waits out
//! when it destroys the VM (`srcu_barrier` in `kvm_destroy_vm`).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::chain::Chain;
use super::queue::{GuestQueue, Popped};
use super::shared::{Activation, DeviceShared};
use crate::telemetry::{
    DeviceCounter, DeviceTelemetry, Evidence, RequestViolation, TransportViolation,
};
use crate::warn_limited;

/// The event data of the activation/reset eventfd; queue `n`'s notifications carry `n`, and
/// the handler's backend fds carry `BACKEND_EVENT + token`.
const STATE_EVENT: u32 = u32::MAX;
const BACKEND_EVENT: u32 = 0x1000_0000;

/// A change to the set of backend fds the worker watches.
#[derive(Debug)]
pub enum FdChange {
    /// Watch `fd` (edge-triggered, input and output) and report it as `token`.
    Add { fd: RawFd, token: u32 },
    /// Stop watching `fd`; `owner` is closed only after that.
    Remove {
        fd: RawFd,
        owner: Box<dyn std::fmt::Debug + Send>,
    },
}

/// A device's queue handling.
pub trait QueueHandler: Send {
    /// Serves what the driver made available on queue `queue`.
    fn process_queue(&mut self, ctx: &mut QueueContext<'_>, queue: usize);
    /// Called once per activation before any queue is served.
    fn activated(&mut self, _ctx: &mut QueueContext<'_>) {}
    /// Forgets everything tied to the last activation (the driver reset the device).
    fn reset(&mut self) {}
    /// Host-side file descriptors to watch for input (edge-triggered), each with a token.
    fn backend_fds(&self) -> Vec<(RawFd, u32)> {
        Vec::new()
    }
    /// Backend `token` has input. `ctx` is None while the driver has not started the device:
    /// the handler should then drain and drop what arrived.
    fn backend_ready(&mut self, _ctx: Option<&mut QueueContext<'_>>, _token: u32) {}
    /// Backend fds opened or closed since the last call (connections come and go).
    fn fd_changes(&mut self) -> Vec<FdChange> {
        Vec::new()
    }
}

/// A refused request: why, and two words of evidence whose names depend on the reason (see
/// `telemetry::request_evidence`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestError {
    pub reason: RequestViolation,
    pub a: u64,
    pub b: u64,
}

impl RequestError {
    pub fn new(reason: RequestViolation, a: u64, b: u64) -> RequestError {
        RequestError { reason, a, b }
    }
}

impl From<RequestViolation> for RequestError {
    fn from(reason: RequestViolation) -> RequestError {
        RequestError { reason, a: 0, b: 0 }
    }
}

/// What a handler works with while it serves a queue.
pub struct QueueContext<'a> {
    pub mem: &'a GuestMemoryMmap,
    queues: &'a mut [Option<GuestQueue>],
    shared: &'a DeviceShared,
    /// The queue being served, for evidence; None for backend work.
    queue: Option<u16>,
}

impl QueueContext<'_> {
    pub fn telemetry(&self) -> &DeviceTelemetry {
        &self.shared.telemetry
    }

    /// Counts `n` of `counter` for this device.
    pub fn add(&self, counter: DeviceCounter, n: u64) {
        self.shared.telemetry.add(counter, n);
    }

    pub fn device_name(&self) -> &str {
        self.shared.name()
    }

    /// Counts and reports a refused request (its chain was valid; the request in it was not).
    pub fn refuse(&self, error: impl Into<RequestError>) {
        let error = error.into();
        self.shared.violation(
            error.reason,
            Evidence {
                queue: self.queue,
                a: error.a,
                b: error.b,
            },
        );
        warn_limited!(
            "{}: refused a request: {}",
            self.shared.name(),
            error.reason.name()
        );
    }

    /// The next acceptable chain on `queue`, or None when there is none. Refused chains are
    /// counted and handed back to the driver unused; unusable rings mark the device as
    /// needing a reset and end the queue's service.
    pub fn next_chain(&mut self, queue: usize, max_bytes: u64) -> Option<Chain> {
        let index = u16::try_from(queue).ok();
        loop {
            if self.shared.needs_reset() {
                return None;
            }
            let q = self.queues.get_mut(queue)?.as_mut()?;
            match q.pop(self.mem, max_bytes)? {
                Popped::Chain(chain) => {
                    self.shared.telemetry.add(DeviceCounter::Requests, 1);
                    return Some(chain);
                }
                Popped::Refused { head, error } => {
                    self.shared.telemetry.add(DeviceCounter::Requests, 1);
                    // Handed back unused before the response, which may stop the device.
                    q.add_used(self.mem, head, 0);
                    self.shared.violation(error.reason, error.evidence(index));
                    warn_limited!(
                        "{}: refused a descriptor chain on queue {queue}: {}",
                        self.shared.name(),
                        error.reason.name()
                    );
                }
                Popped::Broken(error) => {
                    self.shared.violation(error.reason, error.evidence(index));
                    warn_limited!(
                        "{}: queue {queue} is unusable: {}",
                        self.shared.name(),
                        error.reason.name()
                    );
                    // Whatever the policy: the device can not use these rings.
                    self.shared.set_needs_reset();
                    return None;
                }
            }
        }
    }

    /// Returns chain `head` to the driver with `len` bytes written into it.
    pub fn complete(&mut self, queue: usize, head: u16, len: u32) {
        if let Some(q) = self.queues.get_mut(queue).and_then(Option::as_mut) {
            q.add_used(self.mem, head, len);
        }
    }

    pub fn disable_notification(&mut self, queue: usize) {
        if let Some(q) = self.queues.get_mut(queue).and_then(Option::as_mut) {
            q.disable_notification(self.mem);
        }
    }

    /// Re-enables notifications; true when more chains arrived meanwhile.
    pub fn enable_notification(&mut self, queue: usize) -> bool {
        self.queues
            .get_mut(queue)
            .and_then(Option::as_mut)
            .is_some_and(|q| q.enable_notification(self.mem))
    }

    /// True when the driver made `queue` ready.
    pub fn queue_ready(&self, queue: usize) -> bool {
        self.queues.get(queue).is_some_and(Option::is_some)
    }

    fn raise_interrupts(&mut self) {
        let mut raise = false;
        for q in self.queues.iter_mut().flatten() {
            raise |= q.take_interrupt(self.mem);
        }
        if raise {
            self.shared.raise_used();
        }
    }
}

/// Runs `serve` over a request-style queue until the driver has nothing more, with
/// notifications off while draining (the usual virtio pattern, so no notification is lost).
pub fn drain(
    ctx: &mut QueueContext<'_>,
    queue: usize,
    mut serve: impl FnMut(&mut QueueContext<'_>),
) {
    loop {
        ctx.disable_notification(queue);
        serve(ctx);
        if !ctx.enable_notification(queue) || ctx.shared.needs_reset() {
            break;
        }
    }
}

/// One device's queue side as an event-manager subscriber.
/// Where a device's queue notifications can be taken in the kernel: an ioeventfd per queue on
/// its QUEUE_NOTIFY register.
pub trait QueueNotifiers: Send {
    /// Makes a driver's write of `queue` to QUEUE_NOTIFY signal `evt` without an exit.
    fn attach(&self, queue: u32, evt: &EventFd) -> Result<(), std::io::Error>;
}

pub struct VirtioWorker {
    shared: Arc<DeviceShared>,
    mem: GuestMemoryMmap,
    queue_evts: Vec<EventFd>,
    handler: Box<dyn QueueHandler>,
    generation: u64,
    /// Attached at the first activation, then dropped.
    notifiers: Option<Box<dyn QueueNotifiers>>,
}

impl VirtioWorker {
    pub fn new(
        shared: Arc<DeviceShared>,
        mem: GuestMemoryMmap,
        queue_evts: Vec<EventFd>,
        handler: Box<dyn QueueHandler>,
    ) -> VirtioWorker {
        VirtioWorker {
            shared,
            mem,
            queue_evts,
            handler,
            generation: 0,
            notifiers: None,
        }
    }

    /// Attaches the queues' eventfds to `notifiers` when the driver first starts the device.
    pub fn with_notifiers(mut self, notifiers: Box<dyn QueueNotifiers>) -> VirtioWorker {
        self.notifiers = Some(notifiers);
        self
    }

    fn attach_notifiers(&mut self) {
        let Some(notifiers) = self.notifiers.take() else {
            return;
        };
        for (queue, evt) in (0u32..).zip(&self.queue_evts) {
            if let Err(e) = notifiers.attach(queue, evt) {
                // Notifications still arrive through the transport, one exit each.
                warn_limited!(
                    "{}: queue {queue} notifications stay in user space: {e}",
                    self.shared.name()
                );
            }
        }
    }

    /// Runs `f` with the live queues; false (and `f` not run) when the device is stopped.
    fn with_context(
        &mut self,
        f: impl FnOnce(&mut dyn QueueHandler, &mut QueueContext<'_>),
    ) -> bool {
        let mut active = self.shared.active();
        let Some(Activation { queues, generation }) = active.as_mut() else {
            return false;
        };
        let mut ctx = QueueContext {
            mem: &self.mem,
            queues,
            shared: &self.shared,
            queue: None,
        };
        if *generation != self.generation {
            // A reset in between that the worker did not see still resets the handler.
            if self.generation != 0 {
                self.handler.reset();
            }
            self.generation = *generation;
            self.handler.activated(&mut ctx);
        }
        f(self.handler.as_mut(), &mut ctx);
        ctx.raise_interrupts();
        true
    }

    fn state_changed(&mut self) {
        let _ = self.shared.state_evt().read();
        let running = self.shared.active().is_some();
        if !running {
            if self.generation != 0 {
                self.generation = 0;
                self.handler.reset();
            }
            return;
        }
        self.attach_notifiers();
        // Serve whatever the driver queued before (or while) the device started.
        let queues = self.queue_evts.len();
        self.with_context(|handler, ctx| {
            for q in 0..queues {
                if ctx.queue_ready(q) {
                    ctx.queue = u16::try_from(q).ok();
                    handler.process_queue(ctx, q);
                }
            }
        });
    }

    fn notified(&mut self, queue: usize) {
        if let Some(evt) = self.queue_evts.get(queue) {
            let _ = evt.read();
        }
        let ready = self
            .shared
            .active()
            .as_ref()
            .is_some_and(|a| a.queues.get(queue).is_some_and(Option::is_some));
        if !ready {
            // Before DRIVER_OK, or for a queue the driver never made ready.
            let index = u16::try_from(queue).ok();
            let evidence = Evidence {
                queue: index,
                a: u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY),
                b: queue as u64,
            };
            self.shared
                .violation(TransportViolation::NotifyNotReady, evidence);
            warn_limited!(
                "{}: notify for queue {queue}, which is not live",
                self.shared.name()
            );
            return;
        }
        self.with_context(|handler, ctx| {
            ctx.queue = u16::try_from(queue).ok();
            handler.process_queue(ctx, queue);
        });
    }
}

impl MutEventSubscriber for VirtioWorker {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        let mut fds = vec![(self.shared.state_evt().as_raw_fd(), STATE_EVENT)];
        for (index, evt) in (0u32..).zip(&self.queue_evts) {
            fds.push((evt.as_raw_fd(), index));
        }
        let mut edge = Vec::new();
        for (fd, token) in self.handler.backend_fds() {
            edge.push((fd, BACKEND_EVENT + token));
        }
        let all = fds
            .into_iter()
            .map(|(fd, data)| (fd, data, EventSet::IN))
            .chain(
                edge.into_iter()
                    .map(|(fd, data)| (fd, data, EventSet::IN | EventSet::EDGE_TRIGGERED)),
            );
        for (fd, data, set) in all {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, set)) {
                log::error!("{}: cannot watch event {data}: {e:?}", self.shared.name());
                self.shared.set_needs_reset();
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps<'_>) {
        self.dispatch(events);
        for change in self.handler.fd_changes() {
            match change {
                FdChange::Add { fd, token } => {
                    let set = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
                    let data = BACKEND_EVENT + token;
                    if let Err(e) = ops.add(Events::with_data_raw(fd, data, set)) {
                        warn_limited!("{}: cannot watch fd {fd}: {e:?}", self.shared.name());
                    }
                }
                FdChange::Remove { fd, owner } => {
                    let _ = ops.remove(Events::empty_raw(fd));
                    drop(owner);
                }
            }
        }
    }
}

impl VirtioWorker {
    fn dispatch(&mut self, events: Events) {
        match events.data() {
            STATE_EVENT => self.state_changed(),
            token if token >= BACKEND_EVENT => {
                let token = token - BACKEND_EVENT;
                if !self.with_context(|handler, ctx| handler.backend_ready(Some(ctx), token)) {
                    self.handler.backend_ready(None, token);
                }
            }
            queue => self.notified(queue as usize),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::GuestAddress;

    use super::*;
    use crate::devices::virtio::QueueConfig;
    use crate::telemetry::OnViolation;

    struct Idle;
    impl QueueHandler for Idle {
        fn process_queue(&mut self, _: &mut QueueContext<'_>, _: usize) {}
    }

    struct Recorder(Arc<Mutex<Vec<u32>>>);
    impl QueueNotifiers for Recorder {
        fn attach(&self, queue: u32, _: &EventFd) -> Result<(), std::io::Error> {
            self.0.lock().unwrap().push(queue);
            Ok(())
        }
    }

    #[test]
    fn queue_notifiers_are_attached_at_the_first_activation_and_only_then() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let shared = Arc::new(DeviceShared::new(
            "virtio-test0".into(),
            evt(),
            evt(),
            DeviceTelemetry::detached().unwrap(),
            OnViolation::Log,
        ));
        let attached = Arc::new(Mutex::new(Vec::new()));
        let mut worker = VirtioWorker::new(
            shared.clone(),
            mem.clone(),
            vec![evt(), evt()],
            Box::new(Idle),
        )
        .with_notifiers(Box::new(Recorder(attached.clone())));
        // A reset before the driver ever started the device attaches nothing.
        worker.state_changed();
        assert!(attached.lock().unwrap().is_empty());
        let config = QueueConfig {
            size: 16,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        };
        let activate = || {
            let queue = GuestQueue::new(&mem, config, 0).unwrap();
            shared.activate(vec![Some(queue), None]);
        };
        activate();
        worker.state_changed();
        assert_eq!(*attached.lock().unwrap(), vec![0, 1]);
        // The driver resets and starts the device again: the ioeventfds are still there.
        shared.deactivate();
        worker.state_changed();
        activate();
        worker.state_changed();
        assert_eq!(*attached.lock().unwrap(), vec![0, 1]);
    }
}
