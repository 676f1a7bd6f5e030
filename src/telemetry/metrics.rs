//! Metrics in the Prometheus text format, through the Prometheus project's `prometheus-client`
//! crate. The supervisor copies the region's counters into a [`MetricsSnapshot`] and writes
//! it out; every series carries `vm_id` and `tenant`, and no address or port is ever a label.

use std::borrow::Cow;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::devices::DeviceSnapshot;
use super::region::{DeviceCounter, Page};
use super::vocabulary::{ExitKind, Rule, VmCounter};

type Labels = Vec<(&'static str, String)>;

/// One sample: its labels and value.
#[derive(Debug, Clone)]
struct Sample {
    labels: Labels,
    value: u64,
}

/// One metric family.
#[derive(Debug, Clone)]
struct Family {
    /// Without the `_total` a counter gets on output.
    name: &'static str,
    help: &'static str,
    counter: bool,
    samples: Vec<Sample>,
}

/// Everything one write of the metrics file holds.
#[derive(Debug, Clone, Default)]
pub struct MetricsSnapshot {
    families: Vec<Family>,
    float_gauges: Vec<(&'static str, &'static str, f64)>,
}

/// What the supervisor knows beyond the region.
#[derive(Debug, Clone, Default)]
pub struct SupervisorFacts {
    pub vcpus: usize,
    pub devices: Vec<String>,
    pub guest_memory_bytes: u64,
    /// Threads of the VM process whose seccomp mode is "filter", as /proc says.
    pub seccomp_filtered_threads: Option<u64>,
    pub vm_process_threads: Option<u64>,
    /// Seconds from `bulkhead run` to the guest's boot-complete report.
    pub boot_complete_seconds: Option<f64>,
    pub running: bool,
    /// Why and with which status the VM ended, once it has.
    pub exit: Option<(&'static str, i32)>,
    pub alerts_sent: Vec<(Rule, u64)>,
    pub alerts_suppressed: Vec<(Rule, u64)>,
    pub events_invalid: u64,
    pub deliveries_dropped: u64,
    pub deliveries_sent: u64,
    pub vm_process_peak_rss_bytes: Option<u64>,
    pub supervisor_peak_rss_bytes: Option<u64>,
    pub start_time_seconds: f64,
}

impl MetricsSnapshot {
    fn counter(&mut self, name: &'static str, help: &'static str, samples: Vec<Sample>) {
        self.families.push(Family {
            name,
            help,
            counter: true,
            samples,
        });
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, samples: Vec<Sample>) {
        self.families.push(Family {
            name,
            help,
            counter: false,
            samples,
        });
    }

    /// Copies the region's counters and the supervisor's facts.
    pub fn collect(page: &Page, facts: &SupervisorFacts) -> MetricsSnapshot {
        let mut m = MetricsSnapshot::default();
        let one = |value| {
            vec![Sample {
                labels: Vec::new(),
                value,
            }]
        };
        let by_dir = |read: VmCounter, write: VmCounter| {
            vec![
                Sample {
                    labels: vec![("direction", "read".into())],
                    value: page.vm_counter(read),
                },
                Sample {
                    labels: vec![("direction", "write".into())],
                    value: page.vm_counter(write),
                },
            ]
        };

        let mut exits = Vec::new();
        for vcpu in 0..facts.vcpus {
            let Some(row) = page.vcpu(vcpu) else { continue };
            for &kind in ExitKind::ALL {
                exits.push(Sample {
                    labels: vec![("vcpu", vcpu.to_string()), ("reason", kind.name().into())],
                    value: row.get(kind),
                });
            }
        }
        m.counter(
            "bulkhead_vcpu_exits",
            "vCPU exits to user space, by vCPU and reason",
            exits,
        );
        m.counter(
            "bulkhead_unhandled_pio",
            "port accesses no device claims (reads get all-ones, writes are dropped)",
            by_dir(
                VmCounter::PioUnassignedReads,
                VmCounter::PioUnassignedWrites,
            ),
        );
        m.counter(
            "bulkhead_unhandled_mmio",
            "MMIO accesses to addresses with neither RAM nor a device",
            by_dir(
                VmCounter::MmioUnassignedReads,
                VmCounter::MmioUnassignedWrites,
            ),
        );
        m.counter(
            "bulkhead_msr_filtered",
            "MSR accesses outside the allow-list, answered with #GP",
            by_dir(VmCounter::MsrFilteredReads, VmCounter::MsrFilteredWrites),
        );
        m.counter(
            "bulkhead_refused_accesses",
            "register accesses a device refused (bad size, offset or command)",
            one(page.vm_counter(VmCounter::DeviceRefusedAccesses)),
        );
        m.counter(
            "bulkhead_vcpu_failures",
            "abnormal vCPU exits: triple fault, internal error, failed entry, a panicked vCPU thread",
            one(page.vm_counter(VmCounter::VcpuFailures)),
        );
        m.counter(
            "bulkhead_vmm_panics",
            "panics in the VM process's own code, on any thread",
            one(page.vm_counter(VmCounter::VmmPanics)),
        );
        m.counter(
            "bulkhead_guest_panics",
            "guest kernel panics the pvpanic device reported, by what the kernel did next",
            vec![
                Sample {
                    labels: vec![("event", "panicked".into())],
                    value: page.vm_counter(VmCounter::GuestPanics),
                },
                Sample {
                    labels: vec![("event", "crash_loaded".into())],
                    value: page.vm_counter(VmCounter::GuestCrashLoaded),
                },
            ],
        );
        m.counter(
            "bulkhead_console_dropped_bytes",
            "console output bytes dropped past the console limit",
            one(page.vm_counter(VmCounter::ConsoleDroppedBytes)),
        );
        m.counter(
            "bulkhead_telemetry_events_dropped",
            "telemetry events dropped because the channel to the supervisor was full",
            one(page.vm_counter(VmCounter::EventsDropped)),
        );
        m.counter(
            "bulkhead_telemetry_events_invalid",
            "telemetry events the supervisor rejected as naming nothing of this VM",
            one(facts.events_invalid),
        );

        let devices: Vec<DeviceSnapshot> = facts
            .devices
            .iter()
            .enumerate()
            .filter_map(|(i, name)| Some(DeviceSnapshot::read(name, page.device(i)?)))
            .collect();
        let per_device = |c: DeviceCounter| -> Vec<Sample> {
            devices
                .iter()
                .map(|d| Sample {
                    labels: vec![("device", d.device.clone())],
                    value: d.get(c),
                })
                .collect()
        };
        m.counter(
            "bulkhead_virtio_requests",
            "requests (descriptor chains) a virtio device took, valid or not",
            per_device(DeviceCounter::Requests),
        );
        let mut bytes = Vec::new();
        for d in &devices {
            for (dir, c) in [
                ("from_guest", DeviceCounter::BytesFromGuest),
                ("to_guest", DeviceCounter::BytesToGuest),
            ] {
                bytes.push(Sample {
                    labels: vec![("device", d.device.clone()), ("direction", dir.into())],
                    value: d.get(c),
                });
            }
        }
        m.counter(
            "bulkhead_virtio_bytes",
            "bytes a virtio device moved, by direction",
            bytes,
        );
        // The per-device counters with no label of their own, in exposition order.
        for (name, help, counter) in [
            (
                "bulkhead_virtio_interrupts",
                "interrupts a virtio device raised",
                DeviceCounter::Interrupts,
            ),
            (
                "bulkhead_virtio_dropped",
                "host-side data a virtio device dropped (no guest buffer, or the backend full)",
                DeviceCounter::Dropped,
            ),
            (
                "bulkhead_virtio_policy_resets",
                "times a virtio device was put in NEEDS_RESET in response to a violation",
                DeviceCounter::PolicyResets,
            ),
            (
                "bulkhead_virtio_yields",
                "times a virtio device used its work budget for one wakeup and let other events run first",
                DeviceCounter::Yields,
            ),
            (
                "bulkhead_virtio_throttled",
                "times a rate limiter held a virtio queue back until its bucket refilled",
                DeviceCounter::Throttled,
            ),
        ] {
            m.counter(name, help, per_device(counter));
        }
        let mut violations = Vec::new();
        for d in &devices {
            for (v, n) in &d.refusals {
                violations.push(Sample {
                    labels: vec![
                        ("device", d.device.clone()),
                        ("layer", v.layer().into()),
                        ("reason", v.name().into()),
                    ],
                    value: *n,
                });
            }
        }
        m.counter(
            "bulkhead_virtio_violations",
            "guest requests a virtio device refused, by layer and reason",
            violations,
        );

        let lookup = |list: &[(Rule, u64)], rule: Rule| {
            list.iter().find(|(r, _)| *r == rule).map_or(0, |(_, n)| *n)
        };
        m.counter(
            "bulkhead_alerts",
            "alerts sent, by rule and priority",
            Rule::ALL
                .iter()
                .map(|&r| Sample {
                    labels: vec![
                        ("rule", r.name().into()),
                        ("priority", r.priority().name().into()),
                    ],
                    value: lookup(&facts.alerts_sent, r),
                })
                .collect(),
        );
        m.counter(
            "bulkhead_alerts_suppressed",
            "rule firings the per-rule rate limit held back",
            Rule::ALL
                .iter()
                .map(|&r| Sample {
                    labels: vec![("rule", r.name().into())],
                    value: lookup(&facts.alerts_suppressed, r),
                })
                .collect(),
        );
        m.counter(
            "bulkhead_alert_deliveries",
            "alerts POSTed to --alerts-http, by outcome",
            vec![
                Sample {
                    labels: vec![("outcome", "sent".into())],
                    value: facts.deliveries_sent,
                },
                Sample {
                    labels: vec![("outcome", "dropped".into())],
                    value: facts.deliveries_dropped,
                },
            ],
        );

        m.gauge(
            "bulkhead_guest_memory_bytes",
            "guest RAM",
            one(facts.guest_memory_bytes),
        );
        m.gauge(
            "bulkhead_vcpus",
            "vCPUs the VM has",
            one(facts.vcpus as u64),
        );
        if let Some(n) = facts.seccomp_filtered_threads {
            m.gauge(
                "bulkhead_seccomp_filtered_threads",
                "VM process threads running under a seccomp filter, as the kernel reports",
                one(n),
            );
        }
        if let Some(n) = facts.vm_process_threads {
            m.gauge(
                "bulkhead_vm_process_threads",
                "threads of the VM process",
                one(n),
            );
        }
        m.gauge(
            "bulkhead_vm_running",
            "1 while the VM process runs",
            one(u64::from(facts.running)),
        );
        if let Some((reason, status)) = facts.exit {
            m.gauge(
                "bulkhead_vm_exit",
                "why the VM ended: 1 for the reason",
                vec![Sample {
                    labels: vec![("reason", reason.into())],
                    value: 1,
                }],
            );
            m.gauge(
                "bulkhead_vm_exit_status",
                "the exit status of bulkhead run",
                one(u64::try_from(status).unwrap_or(0)),
            );
        }
        if let Some(rss) = facts.vm_process_peak_rss_bytes {
            m.gauge(
                "bulkhead_vm_process_peak_rss_bytes",
                "the VM process's peak resident set",
                one(rss),
            );
        }
        if let Some(rss) = facts.supervisor_peak_rss_bytes {
            m.gauge(
                "bulkhead_supervisor_peak_rss_bytes",
                "the supervisor's peak resident set",
                one(rss),
            );
        }
        if let Some(s) = facts.boot_complete_seconds {
            m.float_gauges.push((
                "bulkhead_boot_complete_seconds",
                "seconds from bulkhead run to the guest's boot-complete report",
                s,
            ));
        }
        m.float_gauges.push((
            "bulkhead_vm_start_time_seconds",
            "when bulkhead run started, in seconds since the Unix epoch",
            facts.start_time_seconds,
        ));
        m
    }

    /// The Prometheus text (version 0.0.4), every series labelled with `vm_id` and `tenant`.
    pub fn encode(self, vm_id: &str, tenant: &str) -> Result<String, std::fmt::Error> {
        let labels = [
            (Cow::Borrowed("vm_id"), Cow::Owned(vm_id.to_string())),
            (Cow::Borrowed("tenant"), Cow::Owned(tenant.to_string())),
        ];
        let mut registry = Registry::with_labels(labels.into_iter());
        registry.register_collector(Box::new(self));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
        Ok(text)
    }
}

impl Collector for MetricsSnapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.families {
            let kind = if f.counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            };
            let mut metric = encoder.encode_descriptor(f.name, f.help, None, kind)?;
            for s in &f.samples {
                let family = metric.encode_family(&s.labels)?;
                if f.counter {
                    ConstCounter::new(s.value).encode(family)?;
                } else {
                    ConstGauge::new(i64::try_from(s.value).unwrap_or(i64::MAX)).encode(family)?;
                }
            }
        }
        for (name, help, value) in &self.float_gauges {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(*value).encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::region::Region;
    use crate::telemetry::vocabulary::ChainViolation;

    #[test]
    fn every_series_is_labelled_with_the_vm_and_carries_the_counters() {
        let r = Region::anonymous().unwrap();
        r.vcpu(0).unwrap().count(ExitKind::IoOut);
        r.count(VmCounter::PioUnassignedReads);
        r.device(0).unwrap().refuse(ChainViolation::Loop.into());
        r.device(0).unwrap().add(DeviceCounter::BytesToGuest, 64);
        let facts = SupervisorFacts {
            vcpus: 1,
            devices: vec!["virtio-rng0".into()],
            guest_memory_bytes: 128 << 20,
            seccomp_filtered_threads: Some(2),
            exit: Some(("guest_exit", 3)),
            alerts_sent: vec![(Rule::VirtioBadChain, 1)],
            boot_complete_seconds: Some(0.25),
            ..Default::default()
        };
        let text = MetricsSnapshot::collect(&r, &facts)
            .encode("vm-1", "acme")
            .unwrap();
        let has = |line: &str| text.lines().any(|l| l == line);
        let l = r#"vm_id="vm-1",tenant="acme""#;
        assert!(
            has(&format!(
                r#"bulkhead_vcpu_exits_total{{{l},vcpu="0",reason="io_out"}} 1"#
            )),
            "{text}"
        );
        assert!(
            has(&format!(
                r#"bulkhead_unhandled_pio_total{{{l},direction="read"}} 1"#
            )),
            "{text}"
        );
        assert!(
            has(&format!(
                r#"bulkhead_virtio_violations_total{{{l},device="virtio-rng0",layer="chain",reason="loop"}} 1"#
            )),
            "{text}"
        );
        assert!(
            has(&format!(
                r#"bulkhead_virtio_bytes_total{{{l},device="virtio-rng0",direction="to_guest"}} 64"#
            )),
            "{text}"
        );
        assert!(
            has(&format!(
                r#"bulkhead_alerts_total{{{l},rule="virtio_bad_chain",priority="Error"}} 1"#
            )),
            "{text}"
        );
        assert!(
            has(&format!(r#"bulkhead_vm_exit{{{l},reason="guest_exit"}} 1"#)),
            "{text}"
        );
        assert!(
            has(&format!(r#"bulkhead_guest_memory_bytes{{{l}}} 134217728"#)),
            "{text}"
        );
        assert!(
            has(&format!(r#"bulkhead_seccomp_filtered_threads{{{l}}} 2"#)),
            "{text}"
        );
        assert!(
            has(&format!(r#"bulkhead_boot_complete_seconds{{{l}}} 0.25"#)),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.contains(l), "unlabelled series: {line}");
        }
    }
}
