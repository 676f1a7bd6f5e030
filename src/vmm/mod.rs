//! A built VM brought to life: vCPU threads, the VMM thread's event loop, and shutdown.
//!
//! Thread order matters for the seccomp invariant: vCPU threads are spawned first and each
//! installs its own filter before anything else; the VMM thread then opens the last files it
//! needs, installs its filter, and only then releases the vCPUs and serves guest I/O.

mod console;
pub mod control;
mod events;
mod watchdog;

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::timerfd::TimerFd;

pub use console::{ConsoleInput, RawTerminal};
pub use control::Control;
use events::VmmEvents;
use watchdog::HaltWatchdog;

use crate::devices::legacy::SerialPort;
use crate::devices::virtio::VirtioWorker;
use crate::exit::VmExitReason;
use crate::seccomp::{self, ThreadRole};
use crate::signal;
use crate::telemetry::VmCounter;
use crate::test_hooks::{self, Point, TestHook};
use crate::vstate::vcpu::{Vcpu, VcpuIo, VcpuShared};
use crate::vstate::vm::Vm;

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

/// A VM ready to run: built by [`crate::builder::build_vm`].
pub struct Vmm {
    pub(crate) vm: Vm,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) io: Arc<VcpuIo>,
    pub(crate) serial: Arc<SerialPort>,
    pub(crate) virtio_workers: Vec<VirtioWorker>,
    pub(crate) console_input: Option<File>,
    pub(crate) raw_terminal: Option<RawTerminal>,
    pub(crate) seccomp: bool,
    /// Firecracker's thread names (`fc_vcpu N`), which its orchestrators look for.
    pub(crate) firecracker_names: bool,
    /// The front end's control channel, if it has one.
    pub(crate) control: Option<Control>,
    /// What a snapshot reads.
    pub(crate) snapshot: crate::snapshot::Sources,
    pub(crate) test_hook: Option<TestHook>,
}

/// How the run ended.
#[derive(Debug)]
pub struct RunOutcome {
    pub reason: VmExitReason,
}

/// A running vCPU thread. Not joined: each reports its end on a channel ([`Vmm::run`] waits
/// for those with a timeout, which a join could not have), and is kicked by thread id.
pub(crate) struct VcpuThread {
    pub(crate) shared: Arc<VcpuShared>,
}

impl Vmm {
    /// Runs the VM until it ends, and says why. A signal on `stop` (a signalfd) ends it in
    /// order, as [`VmExitReason::Stopped`]; a hang-up on `lifeline` (the supervisor's life
    /// pipe) ends the process at once.
    pub fn run(
        self,
        stop: Option<std::os::fd::OwnedFd>,
        lifeline: Option<std::os::fd::OwnedFd>,
    ) -> Result<RunOutcome, VmmError> {
        signal::install_handlers().map_err(VmmError::Signals)?;
        signal::set_thread_name(ThreadRole::Vmm.name());
        let Vmm {
            vm,
            vcpus,
            io,
            serial,
            virtio_workers,
            console_input,
            raw_terminal,
            seccomp,
            firecracker_names,
            mut control,
            snapshot,
            test_hook,
        } = self;
        let exit = io.exit.clone();
        let vcpu_count = vcpus.len();
        let ready = Arc::new(Barrier::new(vcpu_count + 1));
        let go = Arc::new(Barrier::new(vcpu_count + 1));
        let (done_tx, done_rx) = mpsc::channel::<u32>();
        let mut threads = Vec::with_capacity(vcpu_count);
        for vcpu in vcpus {
            let name = if firecracker_names {
                format!("fc_vcpu {}", vcpu.index())
            } else {
                format!("vcpu{}", vcpu.index())
            };
            let shared = Arc::new(VcpuShared::default());
            let ctx = VcpuThreadCtx {
                io: io.clone(),
                shared: shared.clone(),
                ready: ready.clone(),
                go: go.clone(),
                done: done_tx.clone(),
                seccomp,
                test_hook,
                name: name.clone(),
            };
            thread::Builder::new()
                .name(name.clone())
                .spawn(move || vcpu_thread(vcpu, ctx))
                .map_err(|source| VmmError::Spawn { name, source })?;
            threads.push(VcpuThread { shared });
        }
        drop(done_tx);

        // Every vCPU has installed its filter and published its thread id.
        ready.wait();
        let watchdog = HaltWatchdog::new(&threads);
        let mut event_manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
            .map_err(|e| VmmError::EventLoop(format!("cannot create the event manager: {e:?}")))?;
        let mut timer = TimerFd::new().map_err(VmmError::Timer)?;
        timer
            .reset(watchdog::BASE_TICK, Some(watchdog::BASE_TICK))
            .map_err(VmmError::Timer)?;
        let pause = io.pause.clone();
        let workers: Vec<Arc<Mutex<VirtioWorker>>> = virtio_workers
            .into_iter()
            .map(|w| Arc::new(Mutex::new(w)))
            .collect();
        if let Some(control) = control.as_mut() {
            control.running = Some(control::Running {
                sources: snapshot,
                workers: workers.clone(),
                vcpu_threads: threads
                    .iter()
                    .map(|t| t.shared.tid.load(Ordering::Acquire))
                    .collect(),
            });
        }
        let events = Arc::new(Mutex::new(VmmEvents {
            exit: exit.clone(),
            timer,
            watchdog,
            period: 1,
            console: console_input.map(|source| ConsoleInput {
                source,
                serial: serial.clone(),
            }),
            stop,
            control,
            lifeline,
            finished: false,
            pause: pause.clone(),
            io: io.clone(),
        }));
        event_manager.add_subscriber(events.clone());
        for worker in &workers {
            event_manager.add_subscriber(worker.clone());
        }

        // Building the VM is over: what it left in the heap and on this thread's stack would
        // stay resident for the VM's life. (The filter below allows no open of /proc.)
        crate::residency::trim_heap();
        crate::residency::release_spent_stack();
        // INVARIANT: the VMM filter is in place before any guest I/O is served.
        if seccomp {
            seccomp::apply(ThreadRole::Vmm)?;
        }
        test_hooks::fire(test_hook, Point::VmmStart);
        go.wait();

        loop {
            event_manager
                .run()
                .map_err(|e| VmmError::EventLoop(format!("{e:?}")))?;
            if events.lock().unwrap_or_else(|e| e.into_inner()).finished {
                break;
            }
        }

        // Stop every vCPU: the exit signal is set, so each leaves its loop once kicked (a paused
        // one once the gate lets it go).
        pause.resume();
        for t in &threads {
            kick(t.shared.tid.load(Ordering::Acquire));
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
        // The guest's last bytes, if it wrote them and ended without another exit.
        io.drain_coalesced();
        serial.flush();
        drop(raw_terminal);
        drop(vm);
        let reason = exit.reason().unwrap_or(VmExitReason::VcpuFailed {
            vcpu: 0,
            error: "the VM stopped without a reason".to_string(),
        });
        Ok(RunOutcome { reason })
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
    name: String,
}

/// A vCPU thread: runs its vCPU, reports its end, then waits for the process to end instead of
/// ending itself. A thread's end takes the C library's thread-list lock, which musl waits for
/// with a process-shared futex when two threads end at once (every vCPU at a VM's end), and the
/// vCPU and VMM filters allow process-private futexes only. The VM process ends them all with
/// exit_group once the VMM has heard from each.
fn vcpu_thread(vcpu: Vcpu, ctx: VcpuThreadCtx) {
    run_vcpu_thread(vcpu, ctx);
    loop {
        thread::park();
    }
}

fn run_vcpu_thread(vcpu: Vcpu, ctx: VcpuThreadCtx) {
    let index = vcpu.index();
    signal::set_thread_name(&ctx.name);
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    ctx.shared.tid.store(tid, Ordering::Release);
    let parent = test_hooks::parent_pid();
    let filter = if ctx.seccomp {
        seccomp::apply(ThreadRole::Vcpu)
    } else {
        Ok(())
    };
    ctx.ready.wait();
    ctx.go.wait();
    match filter {
        Ok(()) => {
            test_hooks::fire(ctx.test_hook, Point::VcpuStart { parent });
            let io = ctx.io.clone();
            let shared = ctx.shared.clone();
            let hook = ctx.test_hook;
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                test_hooks::fire(hook, Point::VcpuRun);
                vcpu.run(&io, &shared);
            }));
            if result.is_err() {
                ctx.io.reporter.region().count(VmCounter::VcpuFailures);
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

/// Sends the kick signal to a vCPU thread, making it leave KVM_RUN.
///
/// By thread id, with tgkill(2) on this process: what the VMM filter allows, whichever libc is
/// linked (musl's pthread_kill calls tkill). A vCPU thread never ends (it parks once done, see
/// [`vcpu_thread`]), so its id stays its own for the process's life; a kick to one that has
/// finished only wakes it from its park.
pub(super) fn kick(tid: libc::pid_t) {
    // SAFETY: tgkill with integer arguments touches no memory. It reaches this process
    // alone, whose kick signal has a handler installed for the whole process, so it
    // interrupts KVM_RUN instead of killing it.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, signal::kick_signal()) };
}
