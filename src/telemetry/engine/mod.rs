//! The rule engine: turns what the VM process reports (events and counters, both untrusted)
//! and what the supervisor sees itself into classified alerts, each rule rate-limited by a
//! token bucket.
//!
//! Counters are the authority, events the evidence. An event that names no valid thing of
//! this VM is dropped and counted. A refusal or MSR counter that rises without its event (the
//! channel was full, or the VM process lied) still raises its rule's alert a tick later,
//! marked as having lost its evidence, so flooding the channel can not hide an attack. Every
//! event costs constant work, and an alert's text is only built when its bucket lets it out.

mod evidence;
mod ledger;
mod windows;

use super::expected;

use std::time::SystemTime;

use serde_json::{json, Value};

use super::alert::{hex, Alert};
use super::events::{Event, Limits};
use super::region::{violation_slot, Page};
use super::ring::RawEvent;
use super::vocabulary::{legacy_device, Rule, Violation, VmCounter};
use ledger::Ledger;
use windows::{ExitHistory, Scan, ScanWindow};

/// `pio_scan` and `mmio_scan`: this many distinct ports or pages within [`SCAN_WINDOW_NS`].
pub const SCAN_THRESHOLD: usize = 16;
pub const SCAN_WINDOW_NS: u64 = 1_000_000_000;
/// `exit_storm`: more user-space exits than this a second on one vCPU, over a window of
/// [`EXIT_STORM_WINDOW_NS`] (60,000 exits). Queue notifications and interrupts never exit, so
/// a working guest stays far below it, and a whole Linux boot with its console at full
/// verbosity was measured at 31,000 to 42,000 exits (docs/detection.md): no boot can reach
/// the window's allowance, however fast the host.
pub const EXIT_STORM_PER_SEC: u64 = 20_000;
pub const EXIT_STORM_WINDOW_NS: u64 = 3_000_000_000;
/// Alerts a rule may send at once, and how many more it earns per second.
pub const BUCKET_BURST: f64 = 10.0;
pub const BUCKET_REFILL_PER_SEC: f64 = 1.0;

/// An alert's evidence fields.
pub type Fields = Vec<(&'static str, Value)>;

/// What a rule firing came to: an alert to send, or one the rate limit held back.
#[derive(Debug, Clone, PartialEq)]
pub struct Firing {
    pub rule: Rule,
    pub alert: Option<Alert>,
}

#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    last_ns: u64,
    held: u64,
}

/// Ticks in a row a lost-event verdict may wait for events still in the ring (1 s).
pub const MAX_WAITS: u32 = 4;

/// How a reconcile judges the counters' ledgers.
#[derive(Debug, Clone, Copy)]
enum Judgement {
    /// A periodic tick, which may have to wait for events still in the ring.
    Tick { wait: bool },
    /// The last one: the VM process is gone and the ring drained.
    Close,
}

/// One VM's rule state.
#[derive(Debug)]
pub struct Engine {
    limits: Limits,
    devices: Vec<String>,
    buckets: Vec<Bucket>,
    sent: Vec<u64>,
    suppressed: Vec<u64>,
    pio: ScanWindow,
    mmio: ScanWindow,
    exits: Vec<ExitHistory>,
    /// Per device, per refusal reason.
    refusals: Vec<Vec<Ledger>>,
    /// MSR reads and writes outside the allow-list.
    msrs: Ledger,
    /// Ticks in a row that left events in the ring and so judged no ledger.
    waited: u32,
    /// Accesses to each range of expected ports, for those with a budget.
    expected_used: Vec<u32>,
    invalid_events: u64,
}

impl Engine {
    /// The engine for a VM with `limits.vcpus` vCPUs and the devices named `devices` (in slot
    /// order), started at `start_ns` (CLOCK_MONOTONIC).
    pub fn new(limits: Limits, devices: Vec<String>, start_ns: u64) -> Engine {
        let slots = Violation::all().count();
        Engine {
            limits,
            refusals: vec![vec![Ledger::default(); slots]; devices.len()],
            devices,
            buckets: vec![
                Bucket {
                    tokens: BUCKET_BURST,
                    last_ns: start_ns,
                    held: 0,
                };
                Rule::COUNT
            ],
            sent: vec![0; Rule::COUNT],
            suppressed: vec![0; Rule::COUNT],
            pio: ScanWindow::default(),
            mmio: ScanWindow::default(),
            exits: (0..limits.vcpus)
                .map(|_| ExitHistory::new(start_ns))
                .collect(),
            msrs: Ledger::default(),
            waited: 0,
            expected_used: vec![0; expected::PORTS.len()],
            invalid_events: 0,
        }
    }

    /// Alerts sent for `rule`.
    pub fn sent(&self, rule: Rule) -> u64 {
        self.sent.get(rule.index()).copied().unwrap_or(0)
    }

    /// Firings of `rule` the rate limit held back.
    pub fn suppressed(&self, rule: Rule) -> u64 {
        self.suppressed.get(rule.index()).copied().unwrap_or(0)
    }

    /// Events that named nothing valid of this VM.
    pub fn invalid_events(&self) -> u64 {
        self.invalid_events
    }

    /// Fires `rule` unless its bucket is empty; `alert` builds the sentence and evidence, and
    /// is only called when the alert goes out.
    fn fire(&mut self, rule: Rule, now: u64, alert: impl FnOnce() -> (String, Fields)) -> Firing {
        let i = rule.index();
        let Some(bucket) = self.buckets.get_mut(i) else {
            return Firing { rule, alert: None };
        };
        let elapsed = now.saturating_sub(bucket.last_ns) as f64 / 1e9;
        bucket.tokens = (bucket.tokens + elapsed * BUCKET_REFILL_PER_SEC).min(BUCKET_BURST);
        bucket.last_ns = bucket.last_ns.max(now);
        if bucket.tokens < 1.0 {
            bucket.held = bucket.held.saturating_add(1);
            if let Some(s) = self.suppressed.get_mut(i) {
                *s += 1;
            }
            return Firing { rule, alert: None };
        }
        bucket.tokens -= 1.0;
        let held = std::mem::take(&mut bucket.held);
        if let Some(s) = self.sent.get_mut(i) {
            *s += 1;
        }
        let (output, fields) = alert();
        Firing {
            rule,
            alert: Some(Alert {
                time: SystemTime::now(),
                rule,
                output,
                fields,
                suppressed: held,
            }),
        }
    }

    /// Raises a rule the supervisor decided itself (a seccomp kill seen in the wait status,
    /// an ending whose event never came). The event-fed rules fire from [`Engine::observe`]
    /// and [`Engine::tick`].
    pub fn raise(&mut self, rule: Rule, now: u64, output: String, fields: Fields) -> Firing {
        self.fire(rule, now, || (output, fields))
    }

    /// Classifies one event from the channel. Every rule is armed from the VM's first exit:
    /// what an honest boot touches without a device behind it is on the list in
    /// [`super::expected`], and nothing the guest says (such as its boot-complete report)
    /// changes what is judged.
    pub fn observe(&mut self, raw: &RawEvent, now: u64) -> Vec<Firing> {
        let Some(event) = Event::decode(raw, self.limits) else {
            self.invalid_events += 1;
            return Vec::new();
        };
        if let Event::Msr { .. } = event {
            self.msrs.matched();
        }
        match event {
            Event::Violation {
                device,
                violation,
                queue,
                a,
                b,
            } => self.violation(device, violation, queue, a, b, now),
            Event::UnassignedPio {
                vcpu,
                port,
                size,
                write,
            } => self.pio(vcpu, port, size, write, now),
            Event::UnassignedMmio { vcpu, addr, .. } => self.mmio(vcpu, addr, now),
            Event::Msr {
                vcpu,
                index,
                write,
                value,
            } => {
                vec![self.fire(Rule::MsrProbe, now, || {
                    let dir = if write { "write to" } else { "read of" };
                    let mut fields = vec![
                        ("vcpu", json!(vcpu)),
                        ("msr", hex(u64::from(index))),
                        ("direction", json!(if write { "write" } else { "read" })),
                    ];
                    if write {
                        fields.push(("value", hex(value)));
                    }
                    let output = format!(
                        "vCPU {vcpu}: {dir} MSR {index:#x}, outside the allow-list; answered with #GP"
                    );
                    (output, fields)
                })]
            }
            Event::TripleFault { vcpu } => vec![self.fire(Rule::TripleFault, now, || {
                (
                    format!("vCPU {vcpu} triple-faulted; the VM ends"),
                    vec![("vcpu", json!(vcpu))],
                )
            })],
            Event::EntryFailure {
                vcpu,
                internal,
                code,
            } => vec![self.fire(Rule::VcpuEntryFailure, now, || {
                let (what, field) = if internal {
                    ("KVM could not emulate an instruction", "suberror")
                } else {
                    ("the CPU refused to enter the guest", "hardware_reason")
                };
                let output = format!("vCPU {vcpu}: {what}; the VM ends");
                (output, vec![("vcpu", json!(vcpu)), (field, hex(code))])
            })],
        }
    }

    fn violation(
        &mut self,
        device: u16,
        violation: Violation,
        queue: Option<u16>,
        a: u64,
        b: u64,
        now: u64,
    ) -> Vec<Firing> {
        if let Some(l) = self
            .refusals
            .get_mut(usize::from(device))
            .and_then(|d| d.get_mut(violation_slot(violation)))
        {
            l.matched();
        }
        let Some(rule) = violation.rule() else {
            return Vec::new();
        };
        let name = self
            .devices
            .get(usize::from(device))
            .cloned()
            .unwrap_or_default();
        vec![self.fire(rule, now, || {
            (
                evidence::violation_output(&name, violation, queue, rule),
                evidence::violation_fields(&name, violation, queue, a, b),
            )
        })]
    }

    fn pio(&mut self, vcpu: u16, port: u16, size: u8, write: bool, now: u64) -> Vec<Firing> {
        let mut out = Vec::new();
        if let Some(i) = expected::port(port) {
            // Counted in the metrics like any unhandled access; not a probe while the
            // range's budget lasts.
            let within = match expected::PORTS.get(i).and_then(|e| e.budget) {
                None => true,
                Some(budget) => self.expected_used.get_mut(i).is_some_and(|used| {
                    *used = used.saturating_add(1);
                    *used <= budget
                }),
            };
            if within {
                return out;
            }
        }
        if let Some(device) = legacy_device(port) {
            out.push(self.fire(Rule::LegacyDeviceProbe, now, || {
                let dir = if write { "write" } else { "read" };
                let output = format!(
                    "vCPU {vcpu}: {size}-byte {dir} of port {port:#x}, where a {device} controller would be; bulkhead emulates none"
                );
                let fields = vec![
                    ("vcpu", json!(vcpu)),
                    ("port", hex(u64::from(port))),
                    ("legacy_device", json!(device)),
                    ("direction", json!(dir)),
                ];
                (output, fields)
            }));
        }
        if let Some(scan) = self.pio.add(now, u64::from(port), vcpu) {
            out.push(self.scan(Rule::PioScan, "ports", scan, now));
        }
        out
    }

    fn mmio(&mut self, vcpu: u16, addr: u64, now: u64) -> Vec<Firing> {
        match self.mmio.add(now, addr >> 12, vcpu) {
            Some(mut scan) => {
                for page in &mut scan.keys {
                    *page <<= 12;
                }
                vec![self.scan(Rule::MmioScan, "pages", scan, now)]
            }
            None => Vec::new(),
        }
    }

    fn scan(&mut self, rule: Rule, what: &'static str, scan: Scan, now: u64) -> Firing {
        self.fire(rule, now, || {
            let (first, last) = (
                scan.keys.first().copied().unwrap_or(0),
                scan.keys.last().copied().unwrap_or(0),
            );
            let output = format!(
                "vCPU(s) {:?} touched {} distinct unhandled {what} within a second ({first:#x} to {last:#x})",
                scan.vcpus,
                scan.keys.len()
            );
            let fields = vec![
                ("vcpus", json!(scan.vcpus)),
                ("distinct", json!(scan.keys.len())),
                ("lowest", hex(first)),
                ("highest", hex(last)),
            ];
            (output, fields)
        })
    }

    /// The periodic look at the counters: exit storms, and refusals or MSR probes whose
    /// events never came.
    /// The periodic look at the counters, after a drain; `backlog` says the drain left events
    /// in the ring. Lost-event verdicts wait for those, but only for [`MAX_WAITS`] ticks in a
    /// row: a ring kept busy can delay them, not suppress them.
    pub fn tick(&mut self, page: &Page, now: u64, backlog: bool) -> Vec<Firing> {
        let mut out = Vec::new();
        let wait = backlog && self.waited < MAX_WAITS;
        self.waited = if wait { self.waited + 1 } else { 0 };
        self.reconcile(page, now, Judgement::Tick { wait }, &mut out);
        self.storms(page, now, &mut out);
        out
    }

    /// The last look, once the VM process is gone and the channel drained: every increment
    /// still unexplained lost its event, the exits of the last moments are judged, and what
    /// the rate limit still held back is reported, so nothing waits past the VM's end.
    pub fn close(&mut self, page: &Page, now: u64) -> Vec<Firing> {
        let mut out = Vec::new();
        self.reconcile(page, now, Judgement::Close, &mut out);
        self.storms(page, now, &mut out);
        self.release_held(now, &mut out);
        out
    }

    /// One alert per rule whose rate limit held firings back that no later alert reported,
    /// past the limit: the VM has ended, so there will be no later alert.
    fn release_held(&mut self, now: u64, out: &mut Vec<Firing>) {
        for rule in Rule::ALL.iter().copied() {
            let Some(bucket) = self.buckets.get_mut(rule.index()) else {
                continue;
            };
            let held = std::mem::take(&mut bucket.held);
            if held == 0 {
                continue;
            }
            bucket.last_ns = bucket.last_ns.max(now);
            if let Some(s) = self.sent.get_mut(rule.index()) {
                *s += 1;
            }
            out.push(Firing {
                rule,
                alert: Some(Alert {
                    time: SystemTime::now(),
                    rule,
                    output: format!(
                        "{held} further {rule} firing(s) were held back by the rate limit before the VM ended: {}",
                        rule.description()
                    ),
                    fields: vec![("held", json!(held)), ("evidence", json!("rate_limited"))],
                    suppressed: held,
                }),
            });
        }
    }

    fn reconcile(&mut self, page: &Page, now: u64, judgement: Judgement, out: &mut Vec<Firing>) {
        let account = |l: &mut Ledger, current: u64| match judgement {
            Judgement::Close => l.close(current),
            Judgement::Tick { wait } => l.tick(current, wait),
        };
        let mut lost: Vec<(usize, Violation, u64)> = Vec::new();
        for (d, ledgers) in self.refusals.iter_mut().enumerate() {
            let Some(slot) = page.device(d) else { continue };
            for v in Violation::all() {
                if let Some(l) = ledgers.get_mut(violation_slot(v)) {
                    let n = account(l, slot.refusals(v));
                    if n > 0 {
                        lost.push((d, v, n));
                    }
                }
            }
        }
        for (d, v, count) in lost {
            let Some(rule) = v.rule() else { continue };
            let name = self.devices.get(d).cloned().unwrap_or_default();
            out.push(self.fire(rule, now, || {
                let output = format!(
                    "{name} refused {}.{} {count} time(s) with no evidence reported (the event channel was full): {}",
                    v.layer(),
                    v.name(),
                    rule.description()
                );
                let fields = vec![
                    ("device", json!(name)),
                    ("layer", json!(v.layer())),
                    ("reason", json!(v.name())),
                    ("count", json!(count)),
                    ("evidence", json!("lost")),
                ];
                (output, fields)
            }));
        }
        let msrs = page
            .vm_counter(VmCounter::MsrFilteredReads)
            .saturating_add(page.vm_counter(VmCounter::MsrFilteredWrites));
        let count = account(&mut self.msrs, msrs);
        if count > 0 {
            out.push(self.fire(Rule::MsrProbe, now, || {
                let output = format!(
                    "{count} MSR access(es) outside the allow-list with no evidence reported (the event channel was full)"
                );
                (output, vec![("count", json!(count)), ("evidence", json!("lost"))])
            }));
        }
    }

    fn storms(&mut self, page: &Page, now: u64, out: &mut Vec<Firing>) {
        let mut storming = Vec::new();
        for (vcpu, h) in self.exits.iter_mut().enumerate() {
            let Some(row) = page.vcpu(vcpu) else { continue };
            if let Some(rate) = h.sample(now, row.total()) {
                storming.push((vcpu, rate));
            }
        }
        for (vcpu, rate) in storming {
            out.push(self.fire(Rule::ExitStorm, now, || {
                let output = format!(
                    "vCPU {vcpu} exited to bulkhead {rate} times a second, above {EXIT_STORM_PER_SEC} over {} s",
                    EXIT_STORM_WINDOW_NS / 1_000_000_000
                );
                let fields = vec![
                    ("vcpu", json!(vcpu)),
                    ("exits_per_second", json!(rate)),
                    ("threshold", json!(EXIT_STORM_PER_SEC)),
                    ("window_seconds", json!(EXIT_STORM_WINDOW_NS / 1_000_000_000)),
                ];
                (output, fields)
            }));
        }
    }
}

#[cfg(test)]
mod tests;
