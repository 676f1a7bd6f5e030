//! Firecracker's metrics lines, made from bulkhead's: the API request counters Firecracker
//! keeps, and each line (Firecracker's layout, deltas since the previous line) built from the
//! supervisor's metrics file as the typed [`Exposition`] reads it, with bulkhead's own series
//! and new alerts under their own keys.

use std::fs::File;

use serde_json::{json, Value};

use crate::telemetry::metrics::{ByteDirection, Family, Label, ReadSample};
use crate::telemetry::{ExitKind, Exposition, RequestViolation, Violation};

/// Firecracker's groups of API request counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum ApiGroup {
    Get,
    Put,
    Patch,
}

impl ApiGroup {
    const ALL: [ApiGroup; 3] = [ApiGroup::Get, ApiGroup::Put, ApiGroup::Patch];

    fn of_method(method: &str) -> Option<ApiGroup> {
        match method {
            "GET" => Some(ApiGroup::Get),
            "PUT" => Some(ApiGroup::Put),
            "PATCH" => Some(ApiGroup::Patch),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ApiGroup::Get => "get_api_requests",
            ApiGroup::Put => "put_api_requests",
            ApiGroup::Patch => "patch_api_requests",
        }
    }
}

/// Each API counter (its group and Firecracker's field name) and its total.
pub(super) type ApiCounts = std::collections::BTreeMap<(ApiGroup, String), u64>;

/// A device's series, as the metrics line sums them.
enum Dev<'a> {
    /// Every device of a kind (`virtio-blk` is `virtio-blk0`, `virtio-blk1`, ...).
    Kind(&'static str),
    /// One device.
    One(&'a str),
}

/// Where Firecracker-layout metrics lines go, and the last values sent (Firecracker's
/// counters are deltas since the previous line).
pub(super) struct MetricsSink {
    pub(super) file: File,
    emit_id: bool,
    properties: Option<Value>,
    last: std::collections::BTreeMap<String, f64>,
    alerts_sent: usize,
}

impl MetricsSink {
    pub(super) fn new(file: File, emit_id: bool, properties: Option<Value>) -> MetricsSink {
        MetricsSink {
            file,
            emit_id,
            properties,
            last: Default::default(),
            alerts_sent: 0,
        }
    }
}

/// Counts a request as Firecracker's `*_api_requests` metrics do: `NAME_count` when it
/// arrives, `NAME_fails` when it fails.
pub(super) fn count_request(
    counts: &mut ApiCounts,
    method: &str,
    parts: &[&str],
    failed: Option<bool>,
) {
    let Some(group) = ApiGroup::of_method(method) else {
        return;
    };
    let name = match parts.first().copied().unwrap_or("") {
        "" => "instance_info",
        "machine-config" => "machine_cfg",
        "version" => "vmm_version",
        "boot-source" => "boot_source",
        "drives" => "drive",
        "network-interfaces" => "network",
        other => other,
    }
    .replace('-', "_");
    let field = match failed {
        None => format!("{name}_count"),
        Some(true) => format!("{name}_fails"),
        Some(false) => return,
    };
    *counts.entry((group, field)).or_insert(0) += 1;
}

/// One Firecracker-layout metrics line from bulkhead's Prometheus text.
/// The Firecracker ids of the VM's devices, in bulkhead's order (virtio-blkN, virtio-netN).
pub(super) struct Devices {
    pub(super) drives: Vec<String>,
    pub(super) nets: Vec<String>,
}

pub(super) fn metrics_line(
    sink: &mut MetricsSink,
    prom: &Exposition,
    alerts: &[Value],
    id: &str,
    api: &ApiCounts,
    devices: &Devices,
) -> Value {
    let mut delta = |key: &str, total: f64| -> u64 {
        let before = sink.last.insert(key.to_string(), total).unwrap_or(0.0);
        (total - before).max(0.0) as u64
    };
    // A device's series: every device of a kind (`virtio-blk`) or one (`virtio-blk0`).
    let of = |s: &ReadSample, dev: &Dev| -> bool {
        s.label(Label::Device).is_some_and(|d| match dev {
            Dev::Kind(kind) => d
                .strip_prefix(kind)
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())),
            Dev::One(name) => d == *name,
        })
    };
    let exits = |kind: ExitKind| {
        prom.sum(Family::VcpuExits, |s| {
            s.label(Label::Reason) == Some(kind.name())
        })
    };
    let vcpu = json!({
        "exit_io_in": delta("vcpu.io_in", exits(ExitKind::IoIn)),
        "exit_io_out": delta("vcpu.io_out", exits(ExitKind::IoOut)),
        "exit_mmio_read": delta("vcpu.mmio_read", exits(ExitKind::MmioRead)),
        "exit_mmio_write": delta("vcpu.mmio_write", exits(ExitKind::MmioWrite)),
        "failures": delta("vcpu.failures", prom.sum(Family::VcpuFailures, |_| true)),
    });
    let bytes = |dev: &Dev, dir: ByteDirection| -> f64 {
        prom.sum(Family::VirtioBytes, |s| {
            of(s, dev) && s.label(Label::Direction) == Some(dir.name())
        })
    };
    let refused = |dev: &Dev| prom.sum(Family::VirtioViolations, |s| of(s, dev));
    let throttled = |dev: &Dev| prom.sum(Family::VirtioThrottled, |s| of(s, dev));
    // Frames refused for a source MAC not the VM's.
    let spoofed = |dev: &Dev| -> f64 {
        let reason = Violation::from(RequestViolation::ForeignSourceMac).name();
        prom.sum(Family::VirtioViolations, |s| {
            of(s, dev) && s.label(Label::Reason) == Some(reason)
        })
    };
    let (blk, net, vsock) = (
        Dev::Kind("virtio-blk"),
        Dev::Kind("virtio-net"),
        Dev::Kind("virtio-vsock"),
    );
    let block = json!({
        "read_bytes": delta("block.read", bytes(&blk, ByteDirection::ToGuest)),
        "write_bytes": delta("block.write", bytes(&blk, ByteDirection::FromGuest)),
        "invalid_reqs_count": delta("block.refused", refused(&blk)),
        "rate_limiter_throttled_events": delta("block.throttled", throttled(&blk)),
    });
    let net_all = json!({
        "rx_bytes_count": delta("net.rx", bytes(&net, ByteDirection::ToGuest)),
        "tx_bytes_count": delta("net.tx", bytes(&net, ByteDirection::FromGuest)),
        "tx_spoofed_mac_count": delta("net.spoof", spoofed(&net)),
    });
    let vsock = json!({
        "rx_bytes_count": delta("vsock.rx", bytes(&vsock, ByteDirection::ToGuest)),
        "tx_bytes_count": delta("vsock.tx", bytes(&vsock, ByteDirection::FromGuest)),
    });
    // Per device, as Firecracker's `block_<drive_id>` and `net_<iface_id>`.
    let mut per_device = Vec::new();
    for (i, drive) in devices.drives.iter().enumerate() {
        let name = format!("virtio-blk{i}");
        let dev = Dev::One(&name);
        per_device.push((
            format!("block_{drive}"),
            json!({
                "read_bytes": delta(&format!("{name}.read"), bytes(&dev, ByteDirection::ToGuest)),
                "write_bytes": delta(&format!("{name}.write"), bytes(&dev, ByteDirection::FromGuest)),
                "rate_limiter_throttled_events": delta(&format!("{name}.throttled"), throttled(&dev)),
                "invalid_reqs_count": delta(&format!("{name}.refused"), refused(&dev)),
            }),
        ));
    }
    for (i, iface) in devices.nets.iter().enumerate() {
        let name = format!("virtio-net{i}");
        let dev = Dev::One(&name);
        per_device.push((
            format!("net_{iface}"),
            json!({
                "rx_bytes_count": delta(&format!("{name}.rx"), bytes(&dev, ByteDirection::ToGuest)),
                "tx_bytes_count": delta(&format!("{name}.tx"), bytes(&dev, ByteDirection::FromGuest)),
                "tx_spoofed_mac_count": delta(&format!("{name}.spoof"), spoofed(&dev)),
            }),
        ));
    }
    let vmm = json!({ "panic_count": delta("vmm.panics", prom.sum(Family::VmmPanics, |_| true)) });
    let seccomp_faults = prom.sum(Family::VmExit, |s| {
        s.label(Label::Reason) == Some(crate::supervisor::EXIT_SECCOMP_VIOLATION)
    });
    let mut line = serde_json::Map::new();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    line.insert("utc_timestamp_ms".into(), json!(now_ms));
    if sink.emit_id {
        line.insert("id".into(), json!(id));
    }
    if let Some(p) = &sink.properties {
        line.insert("properties".into(), p.clone());
    }
    for group in ApiGroup::ALL {
        let mut g = serde_json::Map::new();
        for ((_, field), &total) in api.iter().filter(|((g, _), _)| *g == group) {
            // Counts since the previous line, as Firecracker reports them.
            let key = format!("api.{}.{field}", group.name());
            let total = total as f64;
            let before = sink.last.insert(key, total).unwrap_or(0.0);
            g.insert(field.clone(), json!((total - before).max(0.0) as u64));
        }
        line.insert(group.name().into(), Value::Object(g));
    }
    for (key, group) in per_device {
        line.insert(key, group);
    }
    line.insert("block".into(), block);
    line.insert("net".into(), net_all);
    line.insert("vsock".into(), vsock);
    line.insert("vcpu".into(), vcpu);
    line.insert(
        "seccomp".into(),
        json!({ "num_faults": seccomp_faults as u64 }),
    );
    line.insert("vmm".into(), vmm);
    // bulkhead's own series that are not zero: all of them (every refusal reason of every
    // device) would not fit a line Kata's reader takes.
    // At most half a line of them (a guest can make many series non-zero); how many did
    // not fit is said.
    let mut series = serde_json::Map::new();
    let mut room = MAX_LINE / 2;
    let mut omitted = 0u64;
    for sample in prom.samples.iter().filter(|s| s.value != 0.0) {
        let key = sample.series();
        let len = key.len() + 32;
        if len > room {
            omitted += 1;
            continue;
        }
        room -= len;
        series.insert(key, json!(sample.value));
    }
    line.insert("bulkhead".into(), Value::Object(series));
    if omitted > 0 {
        line.insert("bulkhead_series_omitted".into(), json!(omitted));
    }
    // New alerts, as many as fit; the rest go in the next line. One too large for any line
    // is passed over (it is in the alerts file) and counted.
    let mut size = Value::Object(line.clone()).to_string().len();
    let mut new_alerts = Vec::new();
    let mut too_large = 0u64;
    for alert in alerts.iter().skip(sink.alerts_sent) {
        let len = alert.to_string().len() + 1;
        if len > MAX_LINE / 4 {
            too_large += 1;
            sink.alerts_sent += 1;
            continue;
        }
        if size + len > MAX_LINE - 128 {
            break;
        }
        size += len;
        sink.alerts_sent += 1;
        new_alerts.push(alert.clone());
    }
    line.insert("bulkhead_alerts".into(), json!(new_alerts));
    if too_large > 0 {
        line.insert("bulkhead_alerts_omitted".into(), json!(too_large));
    }
    Value::Object(line)
}

/// The longest metrics line written: Kata's Go runtime reads the metrics FIFO with a
/// bufio.Scanner, whose default limit is 64 KiB a line (a longer one stops its reader).
pub const MAX_LINE: usize = 60 << 10;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{MetricsSnapshot, Region, RequestViolation, SupervisorFacts, VmCounter};

    /// A sink that writes nowhere and has sent nothing yet.
    fn test_sink() -> MetricsSink {
        MetricsSink {
            file: File::open("/dev/null").unwrap(),
            emit_id: false,
            properties: None,
            last: Default::default(),
            alerts_sent: 0,
        }
    }

    /// The supervisor's own metrics text, as the personality reads it.
    fn exposition(r: &Region) -> String {
        let facts = SupervisorFacts {
            vcpus: 1,
            devices: vec!["virtio-blk0".into(), "virtio-net0".into()],
            ..Default::default()
        };
        MetricsSnapshot::collect(r, &facts)
            .encode("vm-1", "default")
            .unwrap()
    }

    #[test]
    fn firecracker_failure_counters_follow_bulkheads_series_as_deltas() {
        let r = Region::anonymous().unwrap();
        r.device(0)
            .unwrap()
            .refuse(RequestViolation::BadHeader.into());
        r.device(1)
            .unwrap()
            .refuse(RequestViolation::ForeignSourceMac.into());
        r.device(1)
            .unwrap()
            .refuse(RequestViolation::ForeignSourceMac.into());
        r.count(VmCounter::VcpuFailures);
        r.count(VmCounter::VmmPanics);
        let mut sink = test_sink();
        let devices = Devices {
            drives: vec!["root".into()],
            nets: vec!["eth0".into()],
        };
        let text = Exposition::parse(&exposition(&r));
        let line = metrics_line(&mut sink, &text, &[], "vm-1", &ApiCounts::new(), &devices);
        assert_eq!(line["block"]["invalid_reqs_count"], 1, "{line}");
        assert_eq!(line["block_root"]["invalid_reqs_count"], 1, "{line}");
        assert_eq!(line["net"]["tx_spoofed_mac_count"], 2, "{line}");
        assert_eq!(line["net_eth0"]["tx_spoofed_mac_count"], 2, "{line}");
        assert_eq!(line["vcpu"]["failures"], 1, "{line}");
        assert_eq!(line["vmm"]["panic_count"], 1, "{line}");
        // Firecracker's counters are deltas: nothing new, all zero.
        let again = metrics_line(&mut sink, &text, &[], "vm-1", &ApiCounts::new(), &devices);
        assert_eq!(again["net"]["tx_spoofed_mac_count"], 0, "{again}");
        assert_eq!(again["vmm"]["panic_count"], 0, "{again}");
    }

    #[test]
    fn a_metrics_line_fits_kata_s_reader_and_alerts_that_do_not_fit_wait_for_the_next() {
        // A guest that made every refusal reason of every device, and every exit kind of
        // every vCPU, non-zero.
        let r = Region::anonymous().unwrap();
        for d in 0..16 {
            for v in crate::telemetry::Violation::all() {
                r.device(d).unwrap().refuse(v);
            }
        }
        for c in 0..32 {
            for k in crate::telemetry::ExitKind::ALL {
                r.vcpu(c).unwrap().count(*k);
            }
        }
        let facts = SupervisorFacts {
            vcpus: 32,
            devices: (0..16).map(|i| format!("virtio-blk{i}")).collect(),
            ..Default::default()
        };
        let text = MetricsSnapshot::collect(&r, &facts)
            .encode("vm-1", "default")
            .unwrap();
        assert!(
            text.len() > MAX_LINE,
            "the exposition alone is {}",
            text.len()
        );
        let read = Exposition::parse(&text);
        let mut sink = test_sink();
        let devices = Devices {
            drives: (0..16).map(|i| format!("drive{i}")).collect(),
            nets: vec![],
        };
        let mut alerts: Vec<Value> = (0..200)
            .map(|i| json!({"rule": "pio_scan", "output": "x".repeat(500), "seq": i}))
            .collect();
        // One alert no line could hold is passed over, not a block for those after it.
        alerts.insert(
            100,
            json!({"rule": "pio_scan", "output": "y".repeat(MAX_LINE), "seq": -1}),
        );
        let mut seen = 0;
        for _ in 0..10 {
            let line = metrics_line(
                &mut sink,
                &read,
                &alerts,
                "vm-1",
                &ApiCounts::new(),
                &devices,
            );
            assert!(
                line.to_string().len() <= MAX_LINE,
                "{}",
                line.to_string().len()
            );
            assert!(
                line.get("bulkhead_series_omitted").is_some(),
                "nothing omitted?"
            );
            let sent = line["bulkhead_alerts"].as_array().unwrap();
            assert_eq!(
                sent.first().map(|a| a["seq"].clone()),
                (seen < 200).then(|| json!(seen))
            );
            seen += sent.len();
        }
        assert_eq!(seen, 200);
    }
}
