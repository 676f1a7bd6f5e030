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

mod names;
mod read;

pub use names::{ByteDirection, Family, Kind, Label};
pub use read::{Exposition, ReadSample};

use super::devices::DeviceSnapshot;
use super::region::{DeviceCounter, Page};
use super::vocabulary::{ExitKind, Rule, VmCounter};

type Labels = Vec<(Label, String)>;

/// One sample: its labels and value.
#[derive(Debug, Clone)]
struct Sample {
    labels: Labels,
    value: u64,
}

/// Everything one write of the metrics file holds.
#[derive(Debug, Clone, Default)]
pub struct MetricsSnapshot {
    families: Vec<(Family, Vec<Sample>)>,
    float_gauges: Vec<(Family, f64)>,
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
    fn counter(&mut self, family: Family, samples: Vec<Sample>) {
        debug_assert_eq!(family.kind(), Kind::Counter, "{family:?}");
        self.families.push((family, samples));
    }

    fn gauge(&mut self, family: Family, samples: Vec<Sample>) {
        debug_assert_eq!(family.kind(), Kind::Gauge, "{family:?}");
        self.families.push((family, samples));
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
                    labels: vec![(Label::Direction, "read".into())],
                    value: page.vm_counter(read),
                },
                Sample {
                    labels: vec![(Label::Direction, "write".into())],
                    value: page.vm_counter(write),
                },
            ]
        };

        let mut exits = Vec::new();
        for vcpu in 0..facts.vcpus {
            let Some(row) = page.vcpu(vcpu) else { continue };
            for &kind in ExitKind::ALL {
                exits.push(Sample {
                    labels: vec![
                        (Label::Vcpu, vcpu.to_string()),
                        (Label::Reason, kind.name().into()),
                    ],
                    value: row.get(kind),
                });
            }
        }
        m.counter(Family::VcpuExits, exits);
        m.counter(
            Family::CoalescedPioWrites,
            one(page.vm_counter(VmCounter::CoalescedPioWrites)),
        );
        m.counter(
            Family::UnhandledPio,
            by_dir(
                VmCounter::PioUnassignedReads,
                VmCounter::PioUnassignedWrites,
            ),
        );
        m.counter(
            Family::UnhandledMmio,
            by_dir(
                VmCounter::MmioUnassignedReads,
                VmCounter::MmioUnassignedWrites,
            ),
        );
        m.counter(
            Family::MsrFiltered,
            by_dir(VmCounter::MsrFilteredReads, VmCounter::MsrFilteredWrites),
        );
        m.counter(
            Family::RefusedAccesses,
            one(page.vm_counter(VmCounter::DeviceRefusedAccesses)),
        );
        m.counter(
            Family::VcpuFailures,
            one(page.vm_counter(VmCounter::VcpuFailures)),
        );
        m.counter(
            Family::VmmPanics,
            one(page.vm_counter(VmCounter::VmmPanics)),
        );
        m.counter(
            Family::GuestPanics,
            vec![
                Sample {
                    labels: vec![(Label::Event, "panicked".into())],
                    value: page.vm_counter(VmCounter::GuestPanics),
                },
                Sample {
                    labels: vec![(Label::Event, "crash_loaded".into())],
                    value: page.vm_counter(VmCounter::GuestCrashLoaded),
                },
            ],
        );
        m.counter(
            Family::ConsoleDroppedBytes,
            one(page.vm_counter(VmCounter::ConsoleDroppedBytes)),
        );
        m.counter(
            Family::TelemetryEventsDropped,
            one(page.vm_counter(VmCounter::EventsDropped)),
        );
        m.counter(Family::TelemetryEventsInvalid, one(facts.events_invalid));

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
                    labels: vec![(Label::Device, d.device.clone())],
                    value: d.get(c),
                })
                .collect()
        };
        m.counter(Family::VirtioRequests, per_device(DeviceCounter::Requests));
        let mut bytes = Vec::new();
        for d in &devices {
            for (dir, c) in [
                (ByteDirection::FromGuest, DeviceCounter::BytesFromGuest),
                (ByteDirection::ToGuest, DeviceCounter::BytesToGuest),
            ] {
                bytes.push(Sample {
                    labels: vec![
                        (Label::Device, d.device.clone()),
                        (Label::Direction, dir.name().into()),
                    ],
                    value: d.get(c),
                });
            }
        }
        m.counter(Family::VirtioBytes, bytes);
        // The per-device counters with no label of their own, in exposition order.
        for (family, counter) in [
            (Family::VirtioInterrupts, DeviceCounter::Interrupts),
            (Family::VirtioDropped, DeviceCounter::Dropped),
            (Family::VirtioPolicyResets, DeviceCounter::PolicyResets),
            (Family::VirtioYields, DeviceCounter::Yields),
            (Family::VirtioThrottled, DeviceCounter::Throttled),
        ] {
            m.counter(family, per_device(counter));
        }
        let mut violations = Vec::new();
        for d in &devices {
            for (v, n) in &d.refusals {
                violations.push(Sample {
                    labels: vec![
                        (Label::Device, d.device.clone()),
                        (Label::Layer, v.layer().into()),
                        (Label::Reason, v.name().into()),
                    ],
                    value: *n,
                });
            }
        }
        m.counter(Family::VirtioViolations, violations);

        let lookup = |list: &[(Rule, u64)], rule: Rule| {
            list.iter().find(|(r, _)| *r == rule).map_or(0, |(_, n)| *n)
        };
        m.counter(
            Family::Alerts,
            Rule::ALL
                .iter()
                .map(|&r| Sample {
                    labels: vec![
                        (Label::Rule, r.name().into()),
                        (Label::Priority, r.priority().name().into()),
                    ],
                    value: lookup(&facts.alerts_sent, r),
                })
                .collect(),
        );
        m.counter(
            Family::AlertsSuppressed,
            Rule::ALL
                .iter()
                .map(|&r| Sample {
                    labels: vec![(Label::Rule, r.name().into())],
                    value: lookup(&facts.alerts_suppressed, r),
                })
                .collect(),
        );
        m.counter(
            Family::AlertDeliveries,
            vec![
                Sample {
                    labels: vec![(Label::Outcome, "sent".into())],
                    value: facts.deliveries_sent,
                },
                Sample {
                    labels: vec![(Label::Outcome, "dropped".into())],
                    value: facts.deliveries_dropped,
                },
            ],
        );

        m.gauge(Family::GuestMemoryBytes, one(facts.guest_memory_bytes));
        m.gauge(Family::Vcpus, one(facts.vcpus as u64));
        if let Some(n) = facts.seccomp_filtered_threads {
            m.gauge(Family::SeccompFilteredThreads, one(n));
        }
        if let Some(n) = facts.vm_process_threads {
            m.gauge(Family::VmProcessThreads, one(n));
        }
        m.gauge(Family::VmRunning, one(u64::from(facts.running)));
        if let Some((reason, status)) = facts.exit {
            m.gauge(
                Family::VmExit,
                vec![Sample {
                    labels: vec![(Label::Reason, reason.into())],
                    value: 1,
                }],
            );
            m.gauge(
                Family::VmExitStatus,
                one(u64::try_from(status).unwrap_or(0)),
            );
        }
        if let Some(rss) = facts.vm_process_peak_rss_bytes {
            m.gauge(Family::VmProcessPeakRssBytes, one(rss));
        }
        if let Some(rss) = facts.supervisor_peak_rss_bytes {
            m.gauge(Family::SupervisorPeakRssBytes, one(rss));
        }
        if let Some(s) = facts.boot_complete_seconds {
            m.float_gauges.push((Family::BootCompleteSeconds, s));
        }
        m.float_gauges
            .push((Family::VmStartTimeSeconds, facts.start_time_seconds));
        m
    }

    /// The Prometheus text (version 0.0.4), every series labelled with `vm_id` and `tenant`.
    pub fn encode(self, vm_id: &str, tenant: &str) -> Result<String, std::fmt::Error> {
        let labels = [
            (
                Cow::Borrowed(Label::VmId.name()),
                Cow::Owned(vm_id.to_string()),
            ),
            (
                Cow::Borrowed(Label::Tenant.name()),
                Cow::Owned(tenant.to_string()),
            ),
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
        for (family, samples) in &self.families {
            let kind = match family.kind() {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut metric = encoder.encode_descriptor(family.name(), family.help(), None, kind)?;
            for s in samples {
                let labels: Vec<(&str, &str)> = s
                    .labels
                    .iter()
                    .map(|(l, v)| (l.name(), v.as_str()))
                    .collect();
                let encoder = metric.encode_family(&labels)?;
                match family.kind() {
                    Kind::Counter => ConstCounter::new(s.value).encode(encoder)?,
                    Kind::Gauge => ConstGauge::new(i64::try_from(s.value).unwrap_or(i64::MAX))
                        .encode(encoder)?,
                }
            }
        }
        for (family, value) in &self.float_gauges {
            let metric =
                encoder.encode_descriptor(family.name(), family.help(), None, MetricType::Gauge)?;
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
