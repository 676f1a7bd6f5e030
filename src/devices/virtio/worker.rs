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
use std::time::{Duration, Instant};

use crate::vstate::dirty::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::context::Budget;
pub use super::context::{drain, QueueContext, RequestError, WAKEUP_BYTES, WAKEUP_CHAINS};
use super::rate_limiter::LimiterState;
use super::shared::{Activation, DeviceShared};
use crate::telemetry::{DeviceCounter, Evidence, TransportViolation};
use crate::warn_limited;

/// The event data of the activation/reset eventfd; queue `n`'s notifications carry `n`, and
/// the handler's backend fds carry `BACKEND_EVENT + token`.
const STATE_EVENT: u32 = u32::MAX;
/// The worker's own eventfd, written when a wakeup's budget ran out with work left.
const RESUME_EVENT: u32 = u32::MAX - 1;
/// The worker's timer, armed while a rate limiter holds a queue back.
const THROTTLE_EVENT: u32 = u32::MAX - 2;
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
    /// How many chains taken from `queue` this side still holds unanswered (parked by a rate
    /// limiter, or half done). A snapshot leaves them available in the ring, so a restored
    /// device takes them again; a handler holding any must have stopped taking chains from
    /// that queue until they are answered, so they are the last ones it took.
    fn held_chains(&self, _queue: usize) -> u16 {
        0
    }
    /// The queue side's own state for a snapshot: its rate limiters' buckets.
    fn save_state(&self) -> HandlerState {
        HandlerState::default()
    }
    /// Takes a saved state, before the device is restored live (see
    /// [`HandlerState::restored`]); false for one this side can not take.
    fn restore_state(&mut self, _state: &HandlerState) -> bool {
        true
    }
    /// Whether another process (a vhost-user backend) serves the queues: the worker then
    /// leaves the queues' eventfds to it, and the backend raises the device's interrupt
    /// through the irqfd itself.
    fn served_elsewhere(&self) -> bool {
        false
    }
    /// The queues' notification eventfds and the device's irqfd, given once when the device
    /// is attached, for a handler whose queues are served elsewhere.
    fn take_eventfds(&mut self, _queues: &[EventFd], _irq: &EventFd) -> std::io::Result<()> {
        Ok(())
    }
}

/// One device's queue side as an event-manager subscriber.
/// Where a device's queue notifications can be taken in the kernel: an ioeventfd per queue on
/// its QUEUE_NOTIFY register.
/// A queue side's state in a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HandlerState {
    /// The driver had started the device (set by the worker, not the handler).
    pub live: bool,
    /// Each rate limiter's buckets, in the order the handler lists them.
    pub limiters: Vec<Option<LimiterState>>,
}

impl HandlerState {
    /// The state of a queue side whose only state is `limiters`' buckets.
    pub fn of_limiters(limiters: &[&Option<super::rate_limiter::RateLimiter>]) -> HandlerState {
        HandlerState {
            live: false,
            limiters: limiters
                .iter()
                .map(|l| super::rate_limiter::save(l))
                .collect(),
        }
    }

    /// Gives each of `limiters` its saved buckets, in the order [`Self::of_limiters`] took them.
    pub fn restore_limiters(&self, limiters: &mut [&mut Option<super::rate_limiter::RateLimiter>]) {
        for (i, limiter) in limiters.iter_mut().enumerate() {
            super::rate_limiter::restore(limiter, self.limiters.get(i).and_then(Option::as_ref));
        }
    }
}

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
    /// Signalled to serve the queues in `resume` again, after the other events.
    resume_evt: EventFd,
    resume: u64,
    /// Fires when the first throttled queue may go on; `throttled` are the queues waiting.
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    throttled: u64,
}

impl VirtioWorker {
    pub fn new(
        shared: Arc<DeviceShared>,
        mem: GuestMemoryMmap,
        queue_evts: Vec<EventFd>,
        handler: Box<dyn QueueHandler>,
    ) -> Result<VirtioWorker, std::io::Error> {
        Ok(VirtioWorker {
            shared,
            mem,
            queue_evts,
            handler,
            generation: 0,
            notifiers: None,
            resume_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            resume: 0,
            timer: nonblocking_timer()?,
            timer_deadline: None,
            throttled: 0,
        })
    }

    /// Attaches the queues' eventfds to `notifiers` when the driver first starts the device.
    /// The device's register side and queue side: what a snapshot asks of each.
    pub fn shared(&self) -> &Arc<DeviceShared> {
        &self.shared
    }

    pub fn handler(&self) -> &dyn QueueHandler {
        self.handler.as_ref()
    }

    pub fn handler_mut(&mut self) -> &mut dyn QueueHandler {
        self.handler.as_mut()
    }

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
            budget: Budget::full(),
            come_back: 0,
            throttled: 0,
            wait: None,
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
        let (come_back, throttled, wait) = (ctx.come_back, ctx.throttled, ctx.wait);
        drop(active);
        if let (true, Some(wait)) = (throttled != 0, wait) {
            self.hold(throttled, wait);
        }
        if come_back != 0 {
            // Each queue that yielded counts once per wakeup.
            self.shared
                .telemetry
                .add(DeviceCounter::Yields, u64::from(come_back.count_ones()));
            self.resume |= come_back;
            if let Err(e) = self.resume_evt.write(1) {
                // Not expected (the counter can not overflow here). The queue waits with
                // notifications off, so nothing else would serve it: the device stops, and
                // the driver's reset starts it again.
                warn_limited!("{}: cannot schedule more work: {e}", self.shared.name());
                self.shared.set_needs_reset();
            }
        }
        true
    }

    /// Does what the event loop does for a notification of `queue`, then serves the queues
    /// that yielded their budget, up to `rounds` more times: the queue side without an event
    /// loop, for fuzzing. False when the device is not running.
    pub fn serve_now(&mut self, queue: usize, rounds: usize) -> bool {
        if self.shared.active().is_none() {
            return false;
        }
        // The driver's notification, as KVM would signal it.
        if let Some(evt) = self.queue_evts.get(queue) {
            let _ = evt.write(1);
        }
        self.notified(queue);
        for _ in 0..rounds {
            if self.resume == 0 {
                break;
            }
            self.resumed();
        }
        true
    }

    /// Holds `queues` back for `wait`: the timer fires at the earliest deadline asked.
    fn hold(&mut self, queues: u64, wait: Duration) {
        self.shared
            .telemetry
            .add(DeviceCounter::Throttled, u64::from(queues.count_ones()));
        self.throttled |= queues;
        let deadline = Instant::now() + wait;
        if self.timer_deadline.is_some_and(|d| d <= deadline) {
            return;
        }
        // A zero duration would disarm the timer: wait at least a microsecond.
        match self.timer.reset(wait.max(Duration::from_micros(1)), None) {
            Ok(()) => self.timer_deadline = Some(deadline),
            Err(e) => {
                // Not expected. The held queue has notifications off, so nothing else would
                // serve it: the device stops, and the driver's reset starts it again.
                warn_limited!(
                    "{}: cannot arm the rate-limit timer: {e}",
                    self.shared.name()
                );
                self.shared.set_needs_reset();
            }
        }
    }

    /// The rate-limit timer fired: serves the queues it held back.
    fn timer_fired(&mut self) {
        let _ = self.timer.wait();
        self.timer_deadline = None;
        let queues = std::mem::take(&mut self.throttled);
        self.serve_again(queues);
    }

    /// Serves again the queues whose last wakeup ran out of budget.
    fn resumed(&mut self) {
        let _ = self.resume_evt.read();
        let queues = std::mem::take(&mut self.resume);
        self.serve_again(queues);
    }

    /// Serves `queues` (bit n for queue n) that are still live.
    fn serve_again(&mut self, queues: u64) {
        let count = self.queue_evts.len();
        self.with_context(|handler, ctx| {
            for q in (0..count).filter(|&q| q < 64 && queues & (1 << q) != 0) {
                // A reset in between leaves nothing to come back to.
                if ctx.queue_ready(q) {
                    // Each queue its own budget: a busy queue 0 must not leave the others
                    // a spent one at every turn (they would never run again).
                    ctx.refill_budget();
                    ctx.queue = u16::try_from(q).ok();
                    handler.process_queue(ctx, q);
                }
            }
        });
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
                    ctx.refill_budget();
                    handler.process_queue(ctx, q);
                }
            }
        });
    }

    fn notified(&mut self, queue: usize) {
        let ready = {
            // Read under the lock a status change takes: the notification is judged against
            // one state of the device, not one that changes between the read and the look.
            let active = self.shared.active();
            let pending = self
                .queue_evts
                .get(queue)
                .is_some_and(|evt| evt.read().is_ok_and(|n| n > 0));
            if !pending {
                return;
            }
            active
                .as_ref()
                .is_some_and(|a| a.queues.get(queue).is_some_and(Option::is_some))
        };
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

/// A timerfd whose read never blocks the VMM thread, even if it is re-armed between epoll
/// reporting it and the read.
fn nonblocking_timer() -> Result<TimerFd, std::io::Error> {
    let timer = TimerFd::new().map_err(std::io::Error::from)?;
    let fd = timer.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(timer)
}

impl MutEventSubscriber for VirtioWorker {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        let mut fds = vec![
            (self.shared.state_evt().as_raw_fd(), STATE_EVENT),
            (self.resume_evt.as_raw_fd(), RESUME_EVENT),
            (self.timer.as_raw_fd(), THROTTLE_EVENT),
        ];
        // A backend in another process reads the queues' eventfds itself.
        if !self.handler.served_elsewhere() {
            for (index, evt) in (0u32..).zip(&self.queue_evts) {
                fds.push((evt.as_raw_fd(), index));
            }
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
            RESUME_EVENT => self.resumed(),
            THROTTLE_EVENT => self.timer_fired(),
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
    use crate::devices::virtio::queue::GuestQueue;
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

    /// Queue 0 always spends its whole budget and wants to come back; queue 1 records whether
    /// it found a budget to work with.
    struct Greedy(Arc<Mutex<Vec<(usize, bool)>>>);
    impl QueueHandler for Greedy {
        fn process_queue(&mut self, ctx: &mut QueueContext<'_>, queue: usize) {
            self.0.lock().unwrap().push((queue, !ctx.budget_spent()));
            if queue == 0 {
                ctx.add(DeviceCounter::BytesToGuest, WAKEUP_BYTES);
                ctx.come_back(0);
            }
        }
    }

    #[test]
    fn a_queue_that_always_has_work_does_not_starve_the_others_of_the_device() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let shared = DeviceShared::detached("virtio-test0", OnViolation::Log).unwrap();
        let config = |base: u64| QueueConfig {
            size: 16,
            desc_table: base,
            avail_ring: base + 0x1000,
            used_ring: base + 0x2000,
        };
        let q0 = GuestQueue::new(&mem, config(0), 0).unwrap();
        let q1 = GuestQueue::new(&mem, config(0x4000), 0).unwrap();
        shared.activate(vec![Some(q0), Some(q1)]);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut worker = VirtioWorker::new(
            shared.clone(),
            mem,
            vec![evt(), evt()],
            Box::new(Greedy(seen.clone())),
        )
        .unwrap();
        // Both queues yielded last time; queue 0 goes first and spends everything again.
        worker.serve_again(0b11);
        assert_eq!(*seen.lock().unwrap(), vec![(0, true), (1, true)]);
        assert_eq!(worker.resume, 0b01, "queue 0 comes back again");
    }

    #[test]
    fn queue_notifiers_are_attached_at_the_first_activation_and_only_then() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let shared = DeviceShared::detached("virtio-test0", OnViolation::Log).unwrap();
        let attached = Arc::new(Mutex::new(Vec::new()));
        let mut worker = VirtioWorker::new(
            shared.clone(),
            mem.clone(),
            vec![evt(), evt()],
            Box::new(Idle),
        )
        .unwrap()
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
