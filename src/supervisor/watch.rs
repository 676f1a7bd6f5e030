//! The supervisor's loop: wait for the VM process, drain its events, run the rules on a tick,
//! send alerts, write metrics, enforce the time limit and the stop-vm response, and conclude
//! how the VM ended.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, SystemTime};

use serde_json::json;

use super::ending::{StopCause, VmEnd};
use super::outputs::{initial_facts, Outputs};
use super::spawn::VmProcess;
use crate::config::VmConfig;
use crate::exit::{status, VmExitReason};
use crate::procfs::{self, ProcStatus};
use crate::signal;
use crate::telemetry::{
    monotonic_ns, AlertContext, DeviceSnapshot, Engine, Firing, MetricsSnapshot, Response, Rule,
    SupervisorFacts, VmCounter,
};

/// How often the rules look at the counters.
const TICK_NS: u64 = 250_000_000;
/// Ticks between metrics writes (one second).
const METRICS_EVERY: u64 = 4;
/// How long a stopped VM process gets to end in order before it is killed: longer than it
/// waits for its own vCPU threads (2 s), so a slow vCPU does not cost the console its last
/// lines.
const STOP_GRACE_NS: u64 = 3_000_000_000;
/// After a wake-up drain, further wake-ups are not listened to for this long: a VM process
/// that writes the eventfd without end can not make the supervisor spin (ticks still drain).
const WAKE_QUIET_NS: u64 = 1_000_000;
/// How often the kernel's view of the VM process's threads is taken again once all are
/// filtered (they are started once, at boot).
const PROC_SCAN_NS: u64 = 10_000_000_000;
/// Most events taken per drain, so a VM process that keeps refilling the ring can not hold
/// the loop.
const DRAIN_LIMIT: usize = 4096;
/// How long pending HTTP alerts may hold up the exit.
const HTTP_FLUSH: Duration = Duration::from_secs(2);

/// What the watch loop ends with.
pub struct Watched {
    pub end: VmEnd,
}

/// The supervisor's state for one VM.
pub struct Watch<'a> {
    pub config: &'a VmConfig,
    pub vm: VmProcess,
    pub outputs: Outputs,
    pub engine: Engine,
    pub ctx: AlertContext,
    pub signals: OwnedFd,
    pub start_ns: u64,
    pub start_wall: SystemTime,
    seq: u64,
    tail: u64,
    stop: Option<StopCause>,
    kill_at: Option<u64>,
    /// Set once the VM process is reaped: its pid may belong to someone else from then on.
    reaped: bool,
    peak_rss: Option<u64>,
    /// The last /proc view of the VM process's threads: (when, filtered, all).
    threads: Option<(u64, u64, u64)>,
}

impl<'a> Watch<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &'a VmConfig,
        vm: VmProcess,
        outputs: Outputs,
        engine: Engine,
        ctx: AlertContext,
        signals: OwnedFd,
        start_ns: u64,
        start_wall: SystemTime,
    ) -> Watch<'a> {
        Watch {
            config,
            vm,
            outputs,
            engine,
            ctx,
            signals,
            start_ns,
            start_wall,
            seq: 0,
            tail: 0,
            stop: None,
            kill_at: None,
            reaped: false,
            peak_rss: None,
            threads: None,
        }
    }

    fn pid(&self) -> libc::pid_t {
        self.vm.pid
    }

    /// Runs until the VM process is gone; returns how the VM ended.
    pub fn run(mut self) -> Watched {
        let mut deadline = self.config.process.supervision.timeout_secs.map(|s| {
            self.start_ns
                .saturating_add(s.saturating_mul(1_000_000_000))
        });
        let mut next_tick = monotonic_ns() + TICK_NS;
        let mut ticks = 0u64;
        let mut quiet_until = 0u64;
        let (exit, killed) = loop {
            // Signals first: a stop asked for just before the VM process ended is still ours.
            self.read_signals();
            if let Some(status) = self.reap() {
                break status;
            }
            let now = monotonic_ns();
            let listen = now >= quiet_until;
            let mut wake_at = next_tick;
            for t in [deadline, self.kill_at, (!listen).then_some(quiet_until)]
                .into_iter()
                .flatten()
            {
                wake_at = wake_at.min(t);
            }
            let timeout_ms = wake_at.saturating_sub(now).div_ceil(1_000_000).min(1000);
            let wake = poll(
                &self.signals,
                listen.then_some(&self.vm.wake),
                self.vm.alive.as_ref(),
                timeout_ms as i32,
            );
            if wake {
                let _ = self.vm.wake.read();
                self.drain();
                quiet_until = monotonic_ns() + WAKE_QUIET_NS;
            }
            let now = monotonic_ns();
            if now >= next_tick {
                let backlog = self.drain();
                let firings = self.engine.tick(&self.vm.region, now, backlog);
                self.handle(firings);
                ticks += 1;
                if ticks % METRICS_EVERY == 0 {
                    self.write_metrics(None);
                }
                next_tick = now + TICK_NS;
            }
            if deadline.is_some_and(|d| now >= d) {
                deadline = None;
                let secs = self.config.process.supervision.timeout_secs.unwrap_or(0);
                self.stop(StopCause::Timeout { secs });
            }
            if self.kill_at.is_some_and(|k| now >= k) {
                self.signal_vm(libc::SIGKILL);
                self.kill_at = None;
            }
        };
        self.finish(exit, killed)
    }

    /// Stops the VM on SIGTERM, SIGINT or SIGHUP to `bulkhead run`.
    fn read_signals(&mut self) {
        while let Some(sig) = signal::read_signal(&self.signals) {
            if matches!(sig, libc::SIGTERM | libc::SIGINT | libc::SIGHUP) {
                self.stop(StopCause::Signal { signal: sig });
            }
        }
    }

    /// The VM process's wait status if it has ended: (exit code, killing signal).
    fn reap(&mut self) -> Option<(Option<i32>, Option<i32>)> {
        if self.vm.alive.is_some() {
            return self.reap_handed();
        }
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid buffer for wait4 to fill.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `status` and `usage` are valid for writes; the pid is our own child, which
        // nothing else reaps.
        let rc = unsafe { libc::wait4(self.pid(), &mut status, libc::WNOHANG, &mut usage) };
        if rc != self.pid() {
            return None;
        }
        self.reaped = true;
        self.peak_rss = u64::try_from(usage.ru_maxrss).ok().map(|kib| kib * 1024);
        if libc::WIFEXITED(status) {
            Some((Some(libc::WEXITSTATUS(status)), None))
        } else if libc::WIFSIGNALED(status) {
            Some((None, Some(libc::WTERMSIG(status))))
        } else {
            None
        }
    }

    /// [`Watch::reap`] for a VM process this supervisor did not fork, which has no wait status
    /// here: its alive pipe says its exit status, or hangs up without one when it was killed.
    /// Which signal killed it only its parent learns: a seccomp record in the region means
    /// SIGSYS (the reporter writes it as the filter kills), anything else is taken as SIGKILL.
    fn reap_handed(&mut self) -> Option<(Option<i32>, Option<i32>)> {
        let said = crate::handover::read_alive(self.vm.alive.as_ref()?).ok()?;
        // The process is still there after an orderly end (it waits for the front end's
        // status): its peak from /proc.
        self.peak_rss = proc_peak_rss(self.pid());
        self.reaped = true;
        Some(match said {
            Some(code) => (Some(code), None),
            None if self.vm.region.seccomp.read().is_some() => (None, Some(libc::SIGSYS)),
            None => (None, Some(libc::SIGKILL)),
        })
    }

    fn signal_vm(&self, sig: libc::c_int) {
        if self.reaped {
            return;
        }
        // SAFETY: kill(2) on our own child, which is not yet reaped (checked above), so the
        // pid is still ours.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Ends the VM for `cause`: SIGTERM now (the VM process stops in order), SIGKILL if it
    /// has not ended within the grace period. Once the VM process is gone there is nothing to
    /// stop, and how it ended stands.
    fn stop(&mut self, cause: StopCause) {
        if self.stop.is_some() || self.reaped {
            return;
        }
        log::info!("VM {}: stopping: {}", self.ctx.vm_id, VmEnd::Stopped(cause));
        self.stop = Some(cause);
        self.signal_vm(libc::SIGTERM);
        self.kill_at = Some(monotonic_ns() + STOP_GRACE_NS);
    }

    /// Takes what the VM process posted; true when it left events in the ring (the drain
    /// limit, or a producer still filling the next cell).
    fn drain(&mut self) -> bool {
        self.vm.region.ring.clear_wake();
        let mut firings = Vec::new();
        for _ in 0..DRAIN_LIMIT {
            let Some(raw) = self.vm.region.ring.pop(&mut self.tail) else {
                break;
            };
            firings.extend(self.engine.observe(&raw, monotonic_ns()));
        }
        self.handle(firings);
        self.vm.region.ring.backlog(self.tail)
    }

    /// Sends the alerts and applies the stop-vm response.
    fn handle(&mut self, firings: Vec<Firing>) {
        for firing in firings {
            if let Some(alert) = &firing.alert {
                self.seq += 1;
                let line = alert.to_json(&self.ctx, self.seq).to_string();
                if let Some(sink) = &mut self.outputs.alerts {
                    sink.write(&line);
                }
                if let Some(http) = &self.outputs.http {
                    http.send(line);
                }
            }
            let response = self
                .config
                .process
                .supervision
                .on_violation
                .response(firing.rule);
            if response == Response::StopVm {
                self.stop(StopCause::Policy { rule: firing.rule });
            }
        }
    }

    /// The last drain and tick, the alerts only the ending can raise, the final metrics and
    /// the closing line.
    fn finish(mut self, exit: Option<i32>, signal: Option<i32>) -> Watched {
        self.read_signals();
        self.drain();
        let firings = self.engine.close(&self.vm.region, monotonic_ns());
        self.handle(firings);
        let record = self
            .vm
            .region
            .exit
            .read()
            .and_then(|(k, a, b)| VmExitReason::from_record(k, a, b));
        // A handed-over VM process is the one its orchestrator signals (Kata sends SIGTERM to
        // the pid it started): a stop it reports with the status a SIGTERM stop has is that
        // signal's, as if `bulkhead run` had got it.
        let stop = match (&self.vm.alive, exit, &record) {
            (Some(_), Some(status::TERMINATED), Some(VmExitReason::Stopped)) => {
                self.stop.or(Some(StopCause::Signal {
                    signal: libc::SIGTERM,
                }))
            }
            _ => self.stop,
        };
        let end = VmEnd::conclude(exit, signal, record, self.vm.region.seccomp.read(), stop);
        let firings = self.ending_alerts(&end);
        self.handle(firings);
        // Deliveries end first, so the final metrics count them.
        if let Some(http) = &mut self.outputs.http {
            http.finish(HTTP_FLUSH);
        }
        self.write_metrics(Some(&end));
        if log::log_enabled!(log::Level::Debug) {
            for line in self.debug_counters() {
                log::debug!("VM {} {line}", self.ctx.vm_id);
            }
        }
        Watched { end }
    }

    /// Alerts that follow from how the VM ended: a seccomp kill (which only the kernel's wait
    /// status shows), and a triple fault or failed entry whose event never came.
    fn ending_alerts(&mut self, end: &VmEnd) -> Vec<Firing> {
        let now = monotonic_ns();
        let seen = |e: &Engine, r: Rule| e.sent(r) + e.suppressed(r) > 0;
        match end {
            VmEnd::SeccompViolation { thread, syscall } => {
                let mut fields = vec![("signal", json!("SIGSYS"))];
                if let Some(t) = thread {
                    fields.push(("thread", json!(t)));
                }
                if let Some(n) = syscall {
                    fields.push(("syscall", json!(n)));
                }
                let output =
                    format!("bulkhead's VM process was killed by its seccomp filter: {end}");
                vec![self
                    .engine
                    .raise(Rule::SeccompViolation, now, output, fields)]
            }
            VmEnd::Vm(VmExitReason::TripleFault { vcpu })
                if !seen(&self.engine, Rule::TripleFault) =>
            {
                let output = format!("vCPU {vcpu} triple-faulted; the VM ended");
                vec![self
                    .engine
                    .raise(Rule::TripleFault, now, output, vec![("vcpu", json!(vcpu))])]
            }
            VmEnd::Vm(
                r @ (VmExitReason::InternalError { vcpu, .. }
                | VmExitReason::FailEntry { vcpu, .. }),
            ) if !seen(&self.engine, Rule::VcpuEntryFailure) => {
                let output = format!("{r}; the VM ended");
                vec![self.engine.raise(
                    Rule::VcpuEntryFailure,
                    now,
                    output,
                    vec![("vcpu", json!(vcpu))],
                )]
            }
            _ => Vec::new(),
        }
    }

    /// The kernel's view of the VM process's threads (filtered, all): read again while any
    /// thread is unfiltered (the VM is starting), then every [`PROC_SCAN_NS`].
    fn threads(&mut self, end: Option<&VmEnd>) -> (Option<u64>, Option<u64>) {
        if end.is_some() || self.reaped {
            return (None, None);
        }
        let now = monotonic_ns();
        let fresh = self.threads.filter(|&(at, filtered, all)| {
            filtered == all && now.saturating_sub(at) < PROC_SCAN_NS
        });
        let (_, filtered, all) = match fresh {
            Some(t) => t,
            None => match seccomp_threads(self.pid()) {
                Some((filtered, all)) => {
                    self.threads = Some((now, filtered, all));
                    (now, filtered, all)
                }
                None => return (None, None),
            },
        };
        (Some(filtered), Some(all))
    }

    fn facts(&mut self, end: Option<&VmEnd>) -> SupervisorFacts {
        let (filtered, threads) = self.threads(end);
        SupervisorFacts {
            seccomp_filtered_threads: filtered,
            vm_process_threads: threads,
            boot_complete_seconds: self
                .vm
                .region
                .boot_complete_ns()
                .filter(|&ns| ns >= self.start_ns)
                .map(|ns| (ns - self.start_ns) as f64 / 1e9),
            running: end.is_none(),
            exit: end.map(|e| (e.label(), e.status())),
            alerts_sent: Rule::ALL
                .iter()
                .map(|&r| (r, self.engine.sent(r)))
                .collect(),
            alerts_suppressed: Rule::ALL
                .iter()
                .map(|&r| (r, self.engine.suppressed(r)))
                .collect(),
            events_invalid: self.engine.invalid_events(),
            deliveries_sent: self.outputs.http.as_ref().map_or(0, |h| h.stats.sent()),
            deliveries_dropped: self.outputs.http.as_ref().map_or(0, |h| h.stats.dropped()),
            vm_process_peak_rss_bytes: end.and(self.peak_rss),
            supervisor_peak_rss_bytes: end.and_then(|_| own_peak_rss()),
            ..initial_facts(self.config, self.start_wall)
        }
    }

    fn write_metrics(&mut self, end: Option<&VmEnd>) {
        if self.outputs.metrics.is_none() {
            return;
        }
        let facts = self.facts(end);
        let Some(file) = &self.outputs.metrics else {
            return;
        };
        let snapshot = MetricsSnapshot::collect(&self.vm.region, &facts);
        match snapshot.encode(&self.ctx.vm_id, &self.ctx.tenant) {
            Ok(text) => {
                if let Err(e) = file.write(&text) {
                    crate::warn_limited!("{e}");
                }
            }
            Err(e) => crate::warn_limited!("cannot encode the metrics: {e}"),
        }
    }

    /// One line per device and one of VM counters, for `--log-level debug`.
    fn debug_counters(&self) -> Vec<String> {
        let region = &self.vm.region;
        let mut lines = Vec::new();
        let counters: Vec<String> = VmCounter::ALL
            .iter()
            .map(|&c| format!("{c}={}", region.vm_counter(c)))
            .collect();
        lines.push(format!("counters: {}", counters.join(" ")));
        for (i, name) in self.config.vm.device_names().iter().enumerate() {
            if let Some(slot) = region.device(i) {
                lines.push(format!("device {}", DeviceSnapshot::read(name, slot)));
            }
        }
        lines
    }
}

/// The supervisor's own peak resident set, in bytes.
fn own_peak_rss() -> Option<u64> {
    // SAFETY: an all-zero rusage is a valid buffer for getrusage to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is valid for writes.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    u64::try_from(usage.ru_maxrss).ok().map(|kib| kib * 1024)
}

/// Polls the signalfd, the wake eventfd when given and a handed-over VM's alive pipe: true
/// when the eventfd is readable.
fn poll(
    signals: &OwnedFd,
    wake: Option<&vmm_sys_util::eventfd::EventFd>,
    alive: Option<&OwnedFd>,
    timeout_ms: i32,
) -> bool {
    let fd = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds = [
        fd(signals.as_raw_fd()),
        fd(wake.map_or(-1, AsRawFd::as_raw_fd)),
        fd(alive.map_or(-1, AsRawFd::as_raw_fd)),
    ];
    // SAFETY: `fds` is a valid array of three pollfd structs for the kernel to fill; a
    // negative fd is ignored.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, timeout_ms) };
    let [_, w, _] = fds;
    n > 0 && w.revents & libc::POLLIN != 0
}

/// Process `pid`'s peak resident set (VmHWM), in bytes.
fn proc_peak_rss(pid: libc::pid_t) -> Option<u64> {
    ProcStatus::of_process(pid).ok()?.bytes("VmHWM")
}

/// (threads under a seccomp filter, threads) of process `pid`, as /proc says; None when
/// /proc can not be read.
fn seccomp_threads(pid: libc::pid_t) -> Option<(u64, u64)> {
    let (mut filtered, mut threads) = (0u64, 0u64);
    for tid in procfs::threads(pid).ok()? {
        let Ok(status) = ProcStatus::of_thread(pid, tid) else {
            continue;
        };
        threads += 1;
        filtered += u64::from(status.seccomp_filtered());
    }
    Some((filtered, threads))
}
