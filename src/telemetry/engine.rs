//! The rule engine: turns what the VM process reports (events and counters, both untrusted)
//! and what the supervisor sees itself into classified alerts, each rule rate-limited by a
//! token bucket.
//!
//! Counters are the authority, events the evidence. An event that names no valid thing of
//! this VM is dropped and counted. A refusal counter that rises without its event (the
//! channel was full, or the VM process lied) still raises its rule's alert a tick later,
//! without evidence, so flooding the channel can not hide an attack.

use std::collections::VecDeque;
use std::time::SystemTime;

use serde_json::{json, Value};

use super::alert::{hex, mac, Alert};
use super::events::{request_evidence, Event, Limits};
use super::region::{violation_slot, Page};
use super::ring::RawEvent;
use super::vocabulary::{ImageFormat, Rule, Violation};

/// Rules that wait for the boot to settle start at the guest's boot-complete report, or this
/// long after the start when it never reports.
pub const BOOT_GRACE_NS: u64 = 20_000_000_000;
/// `pio_scan` and `mmio_scan`: this many distinct ports or pages within [`SCAN_WINDOW_NS`].
pub const SCAN_THRESHOLD: usize = 16;
pub const SCAN_WINDOW_NS: u64 = 1_000_000_000;
/// `exit_storm`: user-space exits per second on one vCPU, sustained over a second. Queue
/// notifications and interrupts never exit, so a settled guest stays far below this.
pub const EXIT_STORM_PER_SEC: u64 = 20_000;
/// Alerts a rule may send at once, and how many more it earns per second.
pub const BUCKET_BURST: f64 = 10.0;
pub const BUCKET_REFILL_PER_SEC: f64 = 1.0;

/// Ports of devices bulkhead never emulates, by what a guest would expect there.
const LEGACY_PORTS: &[(u16, u16, &str)] = &[
    (0x0000, 0x000f, "isa-dma"),
    (0x00c0, 0x00df, "isa-dma"),
    (0x0170, 0x0177, "ide-secondary"),
    (0x01f0, 0x01f7, "ide-primary"),
    (0x0278, 0x027f, "parallel"),
    (0x0376, 0x0376, "ide-secondary"),
    (0x0378, 0x037f, "parallel"),
    (0x03b0, 0x03df, "vga"),
    (0x03f0, 0x03f7, "floppy"),
    (0x0cf8, 0x0cff, "pci-config"),
];

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

/// Distinct keys (ports or pages) seen within a sliding window.
#[derive(Debug, Default)]
struct ScanWindow {
    seen: VecDeque<(u64, u64)>,
}

impl ScanWindow {
    /// Most entries kept: a window never needs more than a threshold's worth of distinct keys,
    /// but repeated keys also land here.
    const CAP: usize = 4096;

    /// Adds `key` at `now`; returns the distinct keys in the window once there are enough,
    /// and starts a new window.
    fn add(&mut self, now: u64, key: u64) -> Option<Vec<u64>> {
        while self
            .seen
            .front()
            .is_some_and(|&(t, _)| now.saturating_sub(t) > SCAN_WINDOW_NS)
        {
            self.seen.pop_front();
        }
        if self.seen.len() >= Self::CAP {
            self.seen.pop_front();
        }
        self.seen.push_back((now, key));
        let mut keys: Vec<u64> = self.seen.iter().map(|&(_, k)| k).collect();
        keys.sort_unstable();
        keys.dedup();
        if keys.len() < SCAN_THRESHOLD {
            return None;
        }
        self.seen.clear();
        Some(keys)
    }
}

#[derive(Debug, Default)]
struct ExitHistory {
    samples: VecDeque<(u64, u64)>,
    storming: bool,
}

/// Counter increments of one (device, violation) not yet matched by an event.
#[derive(Debug, Default, Clone, Copy)]
struct Ledger {
    last: u64,
    owed: u64,
    matched: u64,
}

/// One VM's rule state.
#[derive(Debug)]
pub struct Engine {
    limits: Limits,
    devices: Vec<String>,
    start_ns: u64,
    boot_ns: Option<u64>,
    buckets: Vec<Bucket>,
    sent: Vec<u64>,
    suppressed: Vec<u64>,
    pio: ScanWindow,
    mmio: ScanWindow,
    exits: Vec<ExitHistory>,
    ledgers: Vec<Vec<Ledger>>,
    invalid_events: u64,
}

impl Engine {
    /// The engine for a VM with `limits.vcpus` vCPUs and the devices named `devices` (in slot
    /// order), started at `start_ns` (CLOCK_MONOTONIC).
    pub fn new(limits: Limits, devices: Vec<String>, start_ns: u64) -> Engine {
        let slots = Violation::all().count();
        Engine {
            limits,
            ledgers: vec![vec![Ledger::default(); slots]; devices.len()],
            devices,
            start_ns,
            boot_ns: None,
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
            exits: (0..limits.vcpus).map(|_| ExitHistory::default()).collect(),
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

    /// When rules that wait for the boot may fire.
    fn settle_ns(&self) -> u64 {
        let grace = self.start_ns.saturating_add(BOOT_GRACE_NS);
        self.boot_ns.map_or(grace, |b| b.min(grace))
    }

    /// Notes the guest's boot-complete report, read from the region.
    pub fn set_boot_complete(&mut self, ns: Option<u64>) {
        if self.boot_ns.is_none() {
            self.boot_ns = ns;
        }
    }

    /// Fires `rule` unless its bucket is empty. The rules fed by events fire from
    /// [`Engine::observe`] and [`Engine::tick`]; the supervisor raises the ones it decides
    /// itself (a seccomp kill seen in the wait status, an ending whose event never came).
    pub fn raise(
        &mut self,
        rule: Rule,
        now: u64,
        output: String,
        fields: Vec<(&'static str, Value)>,
    ) -> Firing {
        let i = rule.index();
        let Some(bucket) = self.buckets.get_mut(i) else {
            return Firing { rule, alert: None };
        };
        let elapsed = now.saturating_sub(bucket.last_ns) as f64 / 1e9;
        bucket.tokens = (bucket.tokens + elapsed * BUCKET_REFILL_PER_SEC).min(BUCKET_BURST);
        bucket.last_ns = bucket.last_ns.max(now);
        if bucket.tokens < 1.0 {
            bucket.held += 1;
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

    /// Classifies one event from the channel.
    pub fn observe(&mut self, raw: &RawEvent, now: u64) -> Vec<Firing> {
        let Some(event) = Event::decode(raw, self.limits) else {
            self.invalid_events += 1;
            return Vec::new();
        };
        let settled = raw.time_ns >= self.settle_ns() && now >= self.settle_ns();
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
            } if settled => self.pio(vcpu, port, size, write, now),
            Event::UnassignedMmio {
                vcpu,
                addr,
                size,
                write,
            } if settled => self.mmio_probe(vcpu, addr, size, write, now),
            Event::Msr {
                vcpu,
                index,
                write,
                value,
            } if settled => {
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
                vec![self.raise(Rule::MsrProbe, now, output, fields)]
            }
            Event::TripleFault { vcpu } => {
                let output = format!("vCPU {vcpu} triple-faulted; the VM ends");
                vec![self.raise(Rule::TripleFault, now, output, vec![("vcpu", json!(vcpu))])]
            }
            Event::EntryFailure {
                vcpu,
                internal,
                code,
            } => {
                let (what, field) = if internal {
                    ("KVM could not emulate an instruction", "suberror")
                } else {
                    ("the CPU refused to enter the guest", "hardware_reason")
                };
                let output = format!("vCPU {vcpu}: {what}; the VM ends");
                let fields = vec![("vcpu", json!(vcpu)), (field, hex(code))];
                vec![self.raise(Rule::VcpuEntryFailure, now, output, fields)]
            }
            // Probes during boot: counted, not alerted.
            _ => Vec::new(),
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
            .ledgers
            .get_mut(usize::from(device))
            .and_then(|d| d.get_mut(violation_slot(violation)))
        {
            l.matched += 1;
        }
        let Some(rule) = violation.rule() else {
            return Vec::new();
        };
        let name = self
            .devices
            .get(usize::from(device))
            .cloned()
            .unwrap_or_default();
        let mut fields = vec![
            ("device", json!(name)),
            ("layer", json!(violation.layer())),
            ("reason", json!(violation.name())),
        ];
        if let Some(q) = queue {
            fields.push(("queue", json!(q)));
        }
        match violation {
            Violation::Transport(_) => {
                fields.push(("register", hex(a)));
                fields.push(("value", hex(b)));
            }
            Violation::Chain(_) => {
                fields.push(("guest_address", hex(a)));
                fields.push(("length", json!(b)));
            }
            Violation::Request(r) => {
                let (ka, kb) = request_evidence(r);
                let va = match ka {
                    "source_mac" => mac(a),
                    "format" => {
                        json!(ImageFormat::from_index(a as usize).map_or("unknown", |f| f.name()))
                    }
                    _ => json!(a),
                };
                fields.push((ka, va));
                fields.push((kb, json!(b)));
            }
        }
        let on_queue = queue.map(|q| format!(" on queue {q}")).unwrap_or_default();
        let output = format!(
            "{name} refused {}.{}{on_queue}: {}",
            violation.layer(),
            violation.name(),
            rule.description()
        );
        vec![self.raise(rule, now, output, fields)]
    }

    fn pio(&mut self, vcpu: u16, port: u16, size: u8, write: bool, now: u64) -> Vec<Firing> {
        let mut out = Vec::new();
        let dir = if write { "write" } else { "read" };
        if let Some(&(_, _, device)) = LEGACY_PORTS
            .iter()
            .find(|&&(lo, hi, _)| (lo..=hi).contains(&port))
        {
            let output = format!(
                "vCPU {vcpu}: {size}-byte {dir} of port {port:#x}, where a {device} controller would be; bulkhead emulates none"
            );
            let fields = vec![
                ("vcpu", json!(vcpu)),
                ("port", hex(u64::from(port))),
                ("legacy_device", json!(device)),
                ("direction", json!(dir)),
            ];
            out.push(self.raise(Rule::LegacyDeviceProbe, now, output, fields));
        }
        if let Some(ports) = self.pio.add(now, u64::from(port)) {
            out.push(self.scan(Rule::PioScan, vcpu, "ports", &ports, now));
        }
        out
    }

    fn mmio_probe(
        &mut self,
        vcpu: u16,
        addr: u64,
        _size: u8,
        _write: bool,
        now: u64,
    ) -> Vec<Firing> {
        match self.mmio.add(now, addr >> 12) {
            Some(pages) => {
                let addrs: Vec<u64> = pages.iter().map(|p| p << 12).collect();
                vec![self.scan(Rule::MmioScan, vcpu, "pages", &addrs, now)]
            }
            None => Vec::new(),
        }
    }

    fn scan(&mut self, rule: Rule, vcpu: u16, what: &str, keys: &[u64], now: u64) -> Firing {
        let (first, last) = (
            keys.first().copied().unwrap_or(0),
            keys.last().copied().unwrap_or(0),
        );
        let output = format!(
            "vCPU {vcpu} touched {} distinct unhandled {what} within a second ({first:#x} to {last:#x})",
            keys.len()
        );
        let fields = vec![
            ("vcpu", json!(vcpu)),
            ("distinct", json!(keys.len())),
            ("lowest", hex(first)),
            ("highest", hex(last)),
        ];
        self.raise(rule, now, output, fields)
    }

    /// The periodic look at the counters: exit storms, and refusals whose events never came.
    pub fn tick(&mut self, page: &Page, now: u64) -> Vec<Firing> {
        self.set_boot_complete(page.boot_complete_ns());
        let mut out = Vec::new();
        self.reconcile(page, now, &mut out);
        self.storms(page, now, &mut out);
        out
    }

    fn reconcile(&mut self, page: &Page, now: u64, out: &mut Vec<Firing>) {
        let mut lost: Vec<(usize, Violation, u64)> = Vec::new();
        for (d, ledgers) in self.ledgers.iter_mut().enumerate() {
            let Some(slot) = page.device(d) else { continue };
            for v in Violation::all() {
                let Some(l) = ledgers.get_mut(violation_slot(v)) else {
                    continue;
                };
                let cur = slot.refusals(v);
                // A counter that goes backwards is a lie; start again from where it is.
                let delta = cur.saturating_sub(l.last);
                l.last = cur;
                // Events first explain increments owed since the last tick, then new ones.
                let stale = l.owed.saturating_sub(l.matched);
                let spare = l.matched.saturating_sub(l.owed);
                l.owed = delta.saturating_sub(spare);
                l.matched = 0;
                if stale > 0 {
                    lost.push((d, v, stale));
                }
            }
        }
        for (d, v, count) in lost {
            let Some(rule) = v.rule() else { continue };
            let name = self.devices.get(d).cloned().unwrap_or_default();
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
            out.push(self.raise(rule, now, output, fields));
        }
    }

    fn storms(&mut self, page: &Page, now: u64, out: &mut Vec<Firing>) {
        let settle = self.settle_ns();
        let mut storming = Vec::new();
        for (vcpu, h) in self.exits.iter_mut().enumerate() {
            let Some(row) = page.vcpu(vcpu) else { continue };
            let total = row.total();
            h.samples.push_back((now, total));
            while h
                .samples
                .get(1)
                .is_some_and(|&(t, _)| now.saturating_sub(t) >= 1_000_000_000)
            {
                h.samples.pop_front();
            }
            let Some(&(t0, n0)) = h.samples.front() else {
                continue;
            };
            let dt = now.saturating_sub(t0);
            if dt < 1_000_000_000 || t0 < settle {
                continue;
            }
            let rate = total.saturating_sub(n0).saturating_mul(1_000_000_000) / dt;
            if rate > EXIT_STORM_PER_SEC && !h.storming {
                h.storming = true;
                storming.push((vcpu, rate));
            } else if rate < EXIT_STORM_PER_SEC / 2 {
                h.storming = false;
            }
        }
        for (vcpu, rate) in storming {
            let output = format!(
                "vCPU {vcpu} exited to bulkhead {rate} times a second, above {EXIT_STORM_PER_SEC}"
            );
            let fields = vec![
                ("vcpu", json!(vcpu)),
                ("exits_per_second", json!(rate)),
                ("threshold", json!(EXIT_STORM_PER_SEC)),
            ];
            out.push(self.raise(Rule::ExitStorm, now, output, fields));
        }
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
