//! The VMM thread's own event sources: the exit request, the halt watchdog's timer and
//! console input. Virtio queue work is served by each device's worker on the same loop.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::console::ConsoleInput;
use super::control::Served;
use super::watchdog::{HaltWatchdog, BASE_TICK};
use crate::exit::{ExitSignal, VmExitReason};

/// The VMM thread's event sources.
pub(super) struct VmmEvents {
    pub(super) exit: Arc<ExitSignal>,
    pub(super) timer: TimerFd,
    pub(super) watchdog: HaltWatchdog,
    /// The timer's current period, in the watchdog's base ticks.
    pub(super) period: u32,
    pub(super) console: Option<ConsoleInput>,
    /// A signalfd for the supervisor's SIGTERM.
    pub(super) stop: Option<OwnedFd>,
    /// The front end's control channel.
    pub(super) control: Option<super::Control>,
    /// The read end of the supervisor's life pipe, for a VM process the supervisor did not
    /// fork (no death signal ties them): its hang-up means the supervisor is gone.
    pub(super) lifeline: Option<OwnedFd>,
    pub(super) finished: bool,
    /// The vCPUs' pause gate: the halt watchdog does not judge paused vCPUs.
    pub(super) pause: Arc<crate::vstate::pause::PauseGate>,
    /// The buses and KVM's ring of held-back port writes: a guest that writes its last byte
    /// and goes quiet (halted in KVM) makes no exit that would drain it, so a tick that finds
    /// writes waiting has the watchdog kick a vCPU, whose thread drains them (the console's
    /// writes stay off this thread, which a stalled console reader must not stop).
    pub(super) io: Arc<crate::vstate::vcpu::VcpuIo>,
}

const EV_EXIT: u32 = 1;
const EV_TIMER: u32 = 2;
const EV_CONSOLE: u32 = 3;
const EV_STOP: u32 = 4;
const EV_CONTROL: u32 = 5;
const EV_LIFELINE: u32 = 6;
/// A connection to the control socket.
const EV_CONTROL_PEER: u32 = 7;

impl MutEventSubscriber for VmmEvents {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        let exit_fd = self.exit.event_fd().as_raw_fd();
        let timer_fd = self.timer.as_raw_fd();
        let registrations = [
            Events::with_data_raw(exit_fd, EV_EXIT, EventSet::IN),
            Events::with_data_raw(timer_fd, EV_TIMER, EventSet::IN),
        ];
        for ev in registrations {
            if let Err(e) = ops.add(ev) {
                log::error!("cannot watch VMM event {}: {e:?}", ev.data());
                self.exit.request(VmExitReason::VcpuFailed {
                    vcpu: 0,
                    error: "event loop setup failed".into(),
                });
            }
        }
        if let Some(stop) = &self.stop {
            let ev = Events::with_data_raw(stop.as_raw_fd(), EV_STOP, EventSet::IN);
            if let Err(e) = ops.add(ev) {
                log::warn!("SIGTERM will end the VM at once: {e:?}");
            }
        }
        if let Some(control) = &self.control {
            let ev = Events::with_data_raw(control.fd(), EV_CONTROL, EventSet::IN);
            if let Err(e) = ops.add(ev) {
                log::warn!("the control channel is not served: {e:?}");
                self.control = None;
            }
        }
        if let Some(life) = &self.lifeline {
            let ev = Events::with_data_raw(life.as_raw_fd(), EV_LIFELINE, EventSet::IN);
            if let Err(e) = ops.add(ev) {
                // Unwatched, the VM would outlive its supervisor: end it now instead.
                log::error!("cannot watch the supervisor's life pipe: {e:?}");
                self.exit.request(VmExitReason::VcpuFailed {
                    vcpu: 0,
                    error: "event loop setup failed".into(),
                });
            }
        }
        if let Some(console) = &self.console {
            let ev = Events::with_data_raw(console.source.as_raw_fd(), EV_CONSOLE, EventSet::IN);
            if let Err(e) = ops.add(ev) {
                log::warn!("console input disabled: {e:?}");
                self.console = None;
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps<'_>) {
        match events.data() {
            EV_EXIT => {
                let _ = self.exit.event_fd().read();
                self.finished = true;
            }
            EV_TIMER if self.pause.is_paused() => {
                // Paused vCPUs sleep outside KVM: they are neither halted nor stuck.
                let _ = self.timer.wait();
            }
            EV_TIMER => {
                let expirations = self.timer.wait().unwrap_or(1);
                let output = self
                    .io
                    .coalesced
                    .as_ref()
                    .is_some_and(|ring| ring.holds_writes());
                let tick = self.watchdog.tick(expirations, output);
                if tick.all_stuck {
                    self.exit.request(VmExitReason::AllHalted);
                } else if tick.period != self.period {
                    self.period = tick.period;
                    let d = BASE_TICK * tick.period;
                    if let Err(e) = self.timer.reset(d, Some(d)) {
                        log::warn!("the halt watchdog keeps its last period: {e}");
                    }
                }
            }
            EV_CONSOLE => self.console_input(events, ops),
            EV_CONTROL | EV_CONTROL_PEER => self.control_event(events.fd(), ops),
            EV_STOP => {
                if let Some(stop) = &self.stop {
                    while crate::signal::read_signal(stop).is_some() {}
                }
                self.exit.request(VmExitReason::Stopped);
            }
            EV_LIFELINE => {
                // What PR_SET_PDEATHSIG does for a forked VM process: the supervisor is gone,
                // nobody watches this VM any more, and it ends at once.
                log::error!("the supervisor is gone; the VM ends");
                // What is free to take: a vCPU blocked writing the console must not keep
                // this VM alive.
                if let Some(ring) = &self.io.coalesced {
                    ring.try_drain(&self.io.pio);
                }
                // SAFETY: _exit has no preconditions.
                unsafe { libc::_exit(crate::exit::status::RUNTIME_ERROR) };
            }
            other => log::warn!("unexpected VMM event {other}"),
        }
    }
}

impl VmmEvents {
    fn control_event(&mut self, fd: std::os::fd::RawFd, ops: &mut EventOps<'_>) {
        let Some(control) = self.control.as_mut() else {
            return;
        };
        match control.serve(fd) {
            Served::Done => {}
            Served::Accepted(peer) => {
                let ev = Events::with_data_raw(peer, EV_CONTROL_PEER, EventSet::IN);
                if let Err(e) = ops.add(ev) {
                    log::warn!("a control connection is not served: {e:?}");
                }
            }
            Served::Closed(peer) => {
                let _ = ops.remove(Events::empty_raw(peer.as_raw_fd()));
                drop(peer);
            }
            Served::Gone => {
                // The front end is gone: the VM runs on, uncontrolled but for signals. A pause
                // it left behind is taken back, so the VM does not stay frozen for ever.
                self.pause.resume();
                if let Some(c) = self.control.take() {
                    let _ = ops.remove(Events::empty_raw(c.fd()));
                }
            }
        }
    }

    fn console_input(&mut self, events: Events, ops: &mut EventOps<'_>) {
        let Some(console) = self.console.as_mut() else {
            return;
        };
        let mut buf = [0u8; 64];
        let n = if events.event_set().contains(EventSet::IN) {
            console.source.read(&mut buf).unwrap_or(0)
        } else {
            0
        };
        if n == 0 {
            // EOF or hang-up: stop watching, the guest keeps running without input.
            let _ = ops.remove(Events::empty_raw(console.source.as_raw_fd()));
            self.console = None;
            return;
        }
        // A full receive FIFO drops the excess, as a real UART would.
        let _ = buf
            .get(..n)
            .map(|bytes| console.serial.enqueue_input(bytes));
    }
}
