//! What a device's queue handler works with while it serves: guest memory, the live queues,
//! the device's telemetry, and one wakeup's work budget and rate-limit holds.

use std::cell::Cell;
use std::time::Duration;

use crate::vstate::dirty::GuestMemoryMmap;

use super::chain::Chain;
use super::queue::{GuestQueue, Popped};
use super::rate_limiter::{self, RateLimiter};
use super::shared::DeviceShared;
use crate::telemetry::{DeviceCounter, DeviceTelemetry, Evidence, RequestViolation};
use crate::warn_limited;

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

/// Chains one wakeup may take from a queue before the worker lets the other events run. A
/// larger batch (Linux may post up to the queue's size at once) is served over several
/// wakeups, a few microseconds apart.
pub const WAKEUP_CHAINS: u32 = 16;
/// Guest bytes one wakeup may move (as counted in bytes_from_guest and bytes_to_guest).
pub const WAKEUP_BYTES: u64 = 256 << 10;

/// What is left of one wakeup's work budget. A guest that keeps re-posting chains would
/// otherwise hold the VMM thread forever: other devices, the exit request and the watchdog
/// would wait behind it.
/// (Bytes are a Cell: handlers count them through a shared context.)
#[derive(Debug)]
pub(super) struct Budget {
    chains: u32,
    bytes: Cell<u64>,
}

impl Budget {
    pub(super) fn full() -> Budget {
        Budget {
            chains: WAKEUP_CHAINS,
            bytes: Cell::new(WAKEUP_BYTES),
        }
    }

    fn spent(&self) -> bool {
        self.chains == 0 || self.bytes.get() == 0
    }
}

/// What a handler works with while it serves a queue.
pub struct QueueContext<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub(super) queues: &'a mut [Option<GuestQueue>],
    pub(super) shared: &'a DeviceShared,
    /// The queue being served, for evidence; None for backend work.
    pub(super) queue: Option<u16>,
    pub(super) budget: Budget,
    /// Queues (bit n for queue n) to serve again at the next turn of the event loop.
    pub(super) come_back: u64,
    /// Queues a rate limiter holds back, and the shortest wait among them.
    pub(super) throttled: u64,
    pub(super) wait: Option<Duration>,
}

impl QueueContext<'_> {
    pub fn telemetry(&self) -> &DeviceTelemetry {
        &self.shared.telemetry
    }

    /// Counts `n` of `counter` for this device. Bytes moved count against the wakeup's
    /// budget.
    pub fn add(&self, counter: DeviceCounter, n: u64) {
        if matches!(
            counter,
            DeviceCounter::BytesFromGuest | DeviceCounter::BytesToGuest
        ) {
            let bytes = &self.budget.bytes;
            bytes.set(bytes.get().saturating_sub(n));
        }
        self.shared.telemetry.add(counter, n);
    }

    /// Gives the next queue served in this wakeup a full budget of its own.
    pub(super) fn refill_budget(&mut self) {
        self.budget = Budget::full();
    }

    /// Bytes this wakeup may still move.
    pub fn bytes_left(&self) -> u64 {
        self.budget.bytes.get()
    }

    /// True when this wakeup's work budget is used up: the handler should stop and, if it
    /// has more to do, ask to [`come back`](Self::come_back).
    pub fn budget_spent(&self) -> bool {
        self.budget.spent()
    }

    /// Asks the worker to serve `queue` again after the other pending events.
    pub fn come_back(&mut self, queue: usize) {
        if queue < 64 {
            self.come_back |= 1 << queue;
        }
    }

    /// Asks the worker to serve `queue` again in `wait`, when its rate limiter allows more.
    pub fn throttle(&mut self, queue: usize, wait: Duration) {
        if queue < 64 {
            self.throttled |= 1 << queue;
            self.wait = Some(self.wait.map_or(wait, |w| w.min(wait)));
        }
    }

    /// True when `queue` is to be served later (budget spent or throttled), not now.
    fn held(&self, queue: usize) -> bool {
        queue < 64 && (self.come_back | self.throttled) & (1 << queue) != 0
    }

    /// [`next_chain`](Self::next_chain) under a rate limiter: `cost` is what a chain takes
    /// from its bytes bucket. A chain the limiter holds back waits in `parked` (it is the
    /// next one served) while the queue waits on the worker's timer.
    pub fn next_limited_chain(
        &mut self,
        queue: usize,
        max_bytes: u64,
        limiter: &mut Option<RateLimiter>,
        parked: &mut Option<Chain>,
        cost: impl Fn(&Chain) -> u64,
    ) -> Option<Chain> {
        let chain = match parked.take() {
            Some(chain) if self.budget.spent() => {
                *parked = Some(chain);
                self.come_back(queue);
                return None;
            }
            Some(chain) => chain,
            None => self.next_chain(queue, max_bytes)?,
        };
        match rate_limiter::take(limiter, cost(&chain)) {
            Ok(()) => Some(chain),
            Err(wait) => {
                *parked = Some(chain);
                self.throttle(queue, wait);
                None
            }
        }
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
            if self.budget.spent() {
                // Whatever is left waits for the next turn of the event loop.
                self.come_back(queue);
                return None;
            }
            let q = self.queues.get_mut(queue)?.as_mut()?;
            let popped = q.pop(self.mem, max_bytes)?;
            // Refused chains cost work too: a guest posting them in a loop must yield.
            self.budget.chains = self.budget.chains.saturating_sub(1);
            match popped {
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

    pub(super) fn raise_interrupts(&mut self) {
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
/// notifications off while draining (the usual virtio pattern, so no notification is lost),
/// or until the wakeup's budget is spent: the worker then comes back to the queue after the
/// other pending events.
pub fn drain(
    ctx: &mut QueueContext<'_>,
    queue: usize,
    mut serve: impl FnMut(&mut QueueContext<'_>),
) {
    loop {
        ctx.disable_notification(queue);
        serve(ctx);
        if ctx.held(queue) {
            // A throttled queue waits for its timer; notifications stay off meanwhile.
            break;
        }
        if ctx.budget_spent() {
            ctx.come_back(queue);
            break;
        }
        if !ctx.enable_notification(queue) || ctx.shared.needs_reset() {
            break;
        }
    }
}
