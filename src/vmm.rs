//! A built VM brought to life: vCPU threads, the VMM thread's event loop, and shutdown.
//!
//! Thread order matters for the seccomp invariant: vCPU threads are spawned first and each
//! installs its own filter before anything else; the VMM thread then opens the last files it
//! needs, installs its filter, and only then releases the vCPUs and serves guest I/O.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::config::TestHook;
use crate::devices::legacy::SerialPort;
use crate::devices::virtio::{DeviceShared, VirtioWorker};
use crate::exit::{ExitSignal, VmExitReason};
use crate::seccomp::{self, ThreadRole};
use crate::signal;
use crate::telemetry::{DeviceSnapshot, VmCounters};
use crate::vstate::vcpu::{Vcpu, VcpuIo, VcpuShared};
use crate::vstate::vm::Vm;

/// How often the halt watchdog looks at the vCPU threads.
const WATCHDOG_TICK: Duration = Duration::from_millis(50);
/// Ticks a vCPU thread must sleep in KVM before it is asked whether it is stuck.
const SLEEP_TICKS_BEFORE_CHECK: u32 = 2;
/// Longest back-off, in ticks, between checks of a vCPU that keeps sleeping but is not stuck
/// (an idle Linux guest): about 2 s.
const MAX_CHECK_BACKOFF: u32 = 40;
/// How long the VMM waits for vCPU threads to leave KVM_RUN at shutdown.
const VCPU_JOIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors starting or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("cannot start thread {name}: {source}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error("cannot create the halt watchdog timer: {0}")]
    Timer(#[source] vmm_sys_util::errno::Error),
}

/// Console input: where it comes from and which UART it feeds.
pub struct ConsoleInput {
    pub source: File,
    pub serial: Arc<SerialPort>,
}

/// Puts a terminal in raw mode so every keystroke (Ctrl-C included) reaches the guest, and
/// restores its settings when dropped.
pub struct RawTerminal {
    fd: libc::c_int,
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw mode on `fd`, or None when it is not a terminal.
    pub fn new(fd: libc::c_int) -> Option<RawTerminal> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: an all-zero termios is a valid buffer for tcgetattr to fill.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid, writable termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios derived from the terminal's own settings.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: `saved` holds the settings read from this same terminal.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// A VM ready to run: built by [`crate::builder::build_vm`].
pub struct Vmm {
    pub(crate) vm: Vm,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) io: Arc<VcpuIo>,
    pub(crate) serial: Arc<SerialPort>,
    pub(crate) virtio_devices: Vec<Arc<DeviceShared>>,
    pub(crate) virtio_workers: Vec<VirtioWorker>,
    pub(crate) console_input: Option<File>,
    pub(crate) raw_terminal: Option<RawTerminal>,
    pub(crate) seccomp: bool,
    pub(crate) test_hook: Option<TestHook>,
}

/// How the run ended.
#[derive(Debug)]
pub struct RunOutcome {
    pub reason: VmExitReason,
    pub counters: crate::telemetry::CounterSnapshot,
    /// Each virtio device's counters, in attach order.
    pub devices: Vec<DeviceSnapshot>,
}

struct VcpuThread {
    handle: thread::JoinHandle<()>,
    shared: Arc<VcpuShared>,
}

impl Vmm {
    pub fn counters(&self) -> &Arc<VmCounters> {
        &self.io.counters
    }

    /// Runs the VM until it ends, and says why.
    pub fn run(self) -> Result<RunOutcome, VmmError> {
        signal::install_handlers().map_err(VmmError::Signals)?;
        signal::set_thread_name(ThreadRole::Vmm.name());
        let Vmm {
            vm,
            vcpus,
            io,
            serial,
            virtio_devices,
            virtio_workers,
            console_input,
            raw_terminal,
            seccomp,
            test_hook,
        } = self;
        let exit = io.exit.clone();
        let vcpu_count = vcpus.len();
        let ready = Arc::new(Barrier::new(vcpu_count + 1));
        let go = Arc::new(Barrier::new(vcpu_count + 1));
        let (done_tx, done_rx) = mpsc::channel::<u32>();
        let mut threads = Vec::with_capacity(vcpu_count);
        for vcpu in vcpus {
            let name = format!("vcpu{}", vcpu.index());
            let shared = Arc::new(VcpuShared::default());
            let ctx = VcpuThreadCtx {
                io: io.clone(),
                shared: shared.clone(),
                ready: ready.clone(),
                go: go.clone(),
                done: done_tx.clone(),
                seccomp,
                test_hook,
            };
            let handle = thread::Builder::new()
                .name(name.clone())
                .spawn(move || vcpu_thread(vcpu, ctx))
                .map_err(|source| VmmError::Spawn { name, source })?;
            threads.push(VcpuThread { handle, shared });
        }
        drop(done_tx);

        // Every vCPU has installed its filter and published its thread id.
        ready.wait();
        let watchdog = HaltWatchdog::new(&threads);
        let mut event_manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
            .map_err(|e| VmmError::EventLoop(format!("cannot create the event manager: {e:?}")))?;
        let mut timer = TimerFd::new().map_err(VmmError::Timer)?;
        timer
            .reset(WATCHDOG_TICK, Some(WATCHDOG_TICK))
            .map_err(VmmError::Timer)?;
        let events = Arc::new(Mutex::new(VmmEvents {
            exit: exit.clone(),
            timer,
            watchdog,
            console: console_input.map(|source| ConsoleInput {
                source,
                serial: serial.clone(),
            }),
            finished: false,
        }));
        event_manager.add_subscriber(events.clone());
        for worker in virtio_workers {
            event_manager.add_subscriber(Arc::new(Mutex::new(worker)));
        }

        // INVARIANT: the VMM filter is in place before any guest I/O is served.
        if seccomp {
            seccomp::apply(ThreadRole::Vmm)?;
        }
        #[cfg(debug_assertions)]
        if test_hook == Some(TestHook::VmmForbiddenSyscall) {
            forbidden_syscall();
        }
        go.wait();

        loop {
            event_manager
                .run()
                .map_err(|e| VmmError::EventLoop(format!("{e:?}")))?;
            if events.lock().unwrap_or_else(|e| e.into_inner()).finished {
                break;
            }
        }

        // Stop every vCPU: the exit signal is set, so each leaves its loop once kicked.
        for t in &threads {
            kick(t.handle.as_pthread_t());
        }
        let mut remaining = vcpu_count;
        while remaining > 0 {
            match done_rx.recv_timeout(VCPU_JOIN_TIMEOUT) {
                Ok(_) => remaining -= 1,
                Err(_) => {
                    log::warn!("{remaining} vCPU thread(s) did not stop in time");
                    break;
                }
            }
        }
        serial.flush();
        drop(raw_terminal);
        drop(vm);
        let reason = exit.reason().unwrap_or(VmExitReason::VcpuFailed {
            vcpu: 0,
            error: "the VM stopped without a reason".to_string(),
        });
        Ok(RunOutcome {
            reason,
            counters: io.counters.snapshot(),
            devices: virtio_devices
                .iter()
                .map(|d| d.counters.snapshot(d.name()))
                .collect(),
        })
    }
}

struct VcpuThreadCtx {
    io: Arc<VcpuIo>,
    shared: Arc<VcpuShared>,
    ready: Arc<Barrier>,
    go: Arc<Barrier>,
    done: mpsc::Sender<u32>,
    seccomp: bool,
    test_hook: Option<TestHook>,
}

fn vcpu_thread(vcpu: Vcpu, ctx: VcpuThreadCtx) {
    let index = vcpu.index();
    signal::set_thread_name(&format!("vcpu{index}"));
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    ctx.shared.tid.store(tid, Ordering::Release);
    let filter = if ctx.seccomp {
        seccomp::apply(ThreadRole::Vcpu)
    } else {
        Ok(())
    };
    ctx.ready.wait();
    ctx.go.wait();
    match filter {
        Ok(()) => {
            #[cfg(debug_assertions)]
            if ctx.test_hook == Some(TestHook::VcpuForbiddenSyscall) {
                forbidden_syscall();
            }
            let _ = ctx.test_hook;
            let io = ctx.io.clone();
            let shared = ctx.shared.clone();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                vcpu.run(&io, &shared);
            }));
            if result.is_err() {
                ctx.io.exit.request(VmExitReason::VcpuFailed {
                    vcpu: index,
                    error: "the vCPU thread panicked".to_string(),
                });
            }
        }
        Err(e) => ctx.io.exit.request(VmExitReason::VcpuFailed {
            vcpu: index,
            error: e.to_string(),
        }),
    }
    let _ = ctx.done.send(index);
}

/// Makes a system call no filter allows, to prove the filters work (debug builds only).
#[cfg(debug_assertions)]
fn forbidden_syscall() {
    // SAFETY: socket(2) with constant arguments touches no memory of ours; if it is somehow
    // allowed, the fd is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: `fd` was just returned to us and is not used elsewhere.
        unsafe { libc::close(fd) };
    }
}

/// Sends the kick signal to a vCPU thread, making it leave KVM_RUN.
///
/// Only call this for a vCPU thread of the running VM: [`Vmm::run`] holds every vCPU's
/// JoinHandle and joins none of them until after the last kick, so the pthread is alive.
fn kick(pthread: libc::pthread_t) {
    // SAFETY: the thread is alive (see above), and the kick signal has a handler installed for
    // the whole process, so it interrupts KVM_RUN instead of killing the process.
    unsafe { libc::pthread_kill(pthread, signal::kick_signal()) };
}

/// Finds VMs that can never run again: every vCPU asleep in KVM and each, when kicked and
/// asked, halted with interrupts disabled or waiting for a startup IPI. With an in-kernel
/// LAPIC a halting vCPU never exits to user space, so this is the only way to notice.
struct HaltWatchdog {
    vcpus: Vec<WatchedVcpu>,
    tick: u64,
}

struct WatchedVcpu {
    stat: Option<File>,
    pthread: libc::pthread_t,
    shared: Arc<VcpuShared>,
    sleeping_ticks: u32,
    next_check: u64,
    backoff: u32,
}

impl HaltWatchdog {
    fn new(threads: &[VcpuThread]) -> HaltWatchdog {
        let vcpus = threads
            .iter()
            .map(|t| {
                let tid = t.shared.tid.load(Ordering::Acquire);
                WatchedVcpu {
                    // Opened now, before the VMM's seccomp filter forbids open.
                    stat: File::open(format!("/proc/self/task/{tid}/stat")).ok(),
                    pthread: t.handle.as_pthread_t(),
                    shared: t.shared.clone(),
                    sleeping_ticks: 0,
                    next_check: 0,
                    backoff: 1,
                }
            })
            .collect();
        HaltWatchdog { vcpus, tick: 0 }
    }

    /// One look at every vCPU. Returns true when the whole VM is stuck.
    fn tick(&mut self) -> bool {
        self.tick += 1;
        let mut all_stuck = !self.vcpus.is_empty();
        for v in &mut self.vcpus {
            let asleep = v
                .stat
                .as_ref()
                .and_then(thread_state)
                .is_some_and(|s| s == b'S');
            if !asleep {
                v.sleeping_ticks = 0;
                v.backoff = 1;
                v.shared.stuck.store(false, Ordering::Relaxed);
                all_stuck = false;
                continue;
            }
            v.sleeping_ticks = v.sleeping_ticks.saturating_add(1);
            let stuck = v.shared.stuck.load(Ordering::Acquire);
            if !stuck && v.sleeping_ticks >= SLEEP_TICKS_BEFORE_CHECK && self.tick >= v.next_check {
                v.shared.check_halt.store(true, Ordering::Release);
                kick(v.pthread);
                v.next_check = self.tick + u64::from(v.backoff);
                v.backoff = (v.backoff * 2).min(MAX_CHECK_BACKOFF);
            }
            all_stuck &= stuck;
        }
        all_stuck
    }
}

/// The state letter from /proc/self/task/TID/stat ("R", "S", ...).
fn thread_state(stat: &File) -> Option<u8> {
    let mut buf = [0u8; 256];
    let n = stat.read_at(&mut buf, 0).ok()?;
    let text = buf.get(..n)?;
    // The command name is in parentheses and may contain spaces; the state follows the last ')'.
    let close = text.iter().rposition(|&b| b == b')')?;
    text.get(close + 2).copied()
}

/// The VMM thread's event sources.
struct VmmEvents {
    exit: Arc<ExitSignal>,
    timer: TimerFd,
    watchdog: HaltWatchdog,
    console: Option<ConsoleInput>,
    finished: bool,
}

const EV_EXIT: u32 = 1;
const EV_TIMER: u32 = 2;
const EV_CONSOLE: u32 = 3;

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
            EV_TIMER => {
                let _ = self.timer.wait();
                if self.watchdog.tick() {
                    self.exit.request(VmExitReason::AllHalted);
                }
            }
            EV_CONSOLE => self.console_input(events, ops),
            other => log::warn!("unexpected VMM event {other}"),
        }
    }
}

impl VmmEvents {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_state_is_read_after_the_command_name() {
        let me = File::open("/proc/thread-self/stat").unwrap();
        // The test thread is running while it reads its own state.
        assert_eq!(thread_state(&me), Some(b'R'));
    }
}
