//! Firecracker's metrics lines, made from bulkhead's: the API request counters Firecracker
//! keeps, and each line (Firecracker's layout, deltas since the previous line) built from the
//! supervisor's metrics file as the typed [`Exposition`] reads it, with bulkhead's own series
//! and new alerts under their own keys.

use std::fs::File;

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

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

/// A Firecracker `vcpu` group.
#[derive(Debug, Serialize)]
struct VcpuGroup {
    exit_io_in: u64,
    exit_io_out: u64,
    exit_mmio_read: u64,
    exit_mmio_write: u64,
    failures: u64,
}

/// A Firecracker `block` (or `block_<drive_id>`) group.
#[derive(Debug, Serialize)]
struct BlockGroup {
    read_bytes: u64,
    write_bytes: u64,
    invalid_reqs_count: u64,
    rate_limiter_throttled_events: u64,
}

/// A Firecracker `net` (or `net_<iface_id>`) group.
#[derive(Debug, Serialize)]
struct NetGroup {
    rx_bytes_count: u64,
    tx_bytes_count: u64,
    tx_spoofed_mac_count: u64,
}

#[derive(Debug, Serialize)]
struct VsockGroup {
    rx_bytes_count: u64,
    tx_bytes_count: u64,
}

#[derive(Debug, Serialize)]
struct SeccompGroup {
    num_faults: u64,
}

#[derive(Debug, Serialize)]
struct VmmGroup {
    panic_count: u64,
}

/// One device's own group.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum DeviceGroup {
    Block(BlockGroup),
    Net(NetGroup),
}

/// One metrics line: Firecracker's groups for what has a counterpart in bulkhead, then
/// bulkhead's own series and new alerts under their own keys.
#[derive(Debug, Serialize)]
struct Line {
    utc_timestamp_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    properties: Option<Value>,
    get_api_requests: BTreeMap<String, u64>,
    put_api_requests: BTreeMap<String, u64>,
    patch_api_requests: BTreeMap<String, u64>,
    /// `block_<drive_id>` and `net_<iface_id>`.
    #[serde(flatten)]
    devices: BTreeMap<String, DeviceGroup>,
    block: BlockGroup,
    net: NetGroup,
    vsock: VsockGroup,
    vcpu: VcpuGroup,
    seccomp: SeccompGroup,
    vmm: VmmGroup,
    bulkhead: BTreeMap<String, f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bulkhead_series_omitted: Option<u64>,
    bulkhead_alerts: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bulkhead_alerts_omitted: Option<u64>,
}

pub(super) fn metrics_line(
    sink: &mut MetricsSink,
    prom: &Exposition,
    alerts: &[Value],
    id: &str,
    api: &ApiCounts,
    devices: &Devices,
) -> Value {
    let last = &mut sink.last;
    let mut delta = |key: &str, total: f64| -> u64 {
        let before = last.insert(key.to_string(), total).unwrap_or(0.0);
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
    // Each group's counters are deltas since the previous line, kept under `key`.
    let mut block_group = |key: &str, dev: &Dev| BlockGroup {
        read_bytes: delta(&format!("{key}.read"), bytes(dev, ByteDirection::ToGuest)),
        write_bytes: delta(
            &format!("{key}.write"),
            bytes(dev, ByteDirection::FromGuest),
        ),
        invalid_reqs_count: delta(&format!("{key}.refused"), refused(dev)),
        rate_limiter_throttled_events: delta(&format!("{key}.throttled"), throttled(dev)),
    };
    let mut groups = BTreeMap::new();
    let block = block_group("block", &Dev::Kind("virtio-blk"));
    for (i, drive) in devices.drives.iter().enumerate() {
        let name = format!("virtio-blk{i}");
        let group = block_group(&name, &Dev::One(&name));
        groups.insert(format!("block_{drive}"), DeviceGroup::Block(group));
    }
    let mut net_group = |key: &str, dev: &Dev| NetGroup {
        rx_bytes_count: delta(&format!("{key}.rx"), bytes(dev, ByteDirection::ToGuest)),
        tx_bytes_count: delta(&format!("{key}.tx"), bytes(dev, ByteDirection::FromGuest)),
        tx_spoofed_mac_count: delta(&format!("{key}.spoof"), spoofed(dev)),
    };
    let net = net_group("net", &Dev::Kind("virtio-net"));
    for (i, iface) in devices.nets.iter().enumerate() {
        let name = format!("virtio-net{i}");
        let group = net_group(&name, &Dev::One(&name));
        groups.insert(format!("net_{iface}"), DeviceGroup::Net(group));
    }
    let vsock_dev = Dev::Kind("virtio-vsock");
    let vsock = VsockGroup {
        rx_bytes_count: delta("vsock.rx", bytes(&vsock_dev, ByteDirection::ToGuest)),
        tx_bytes_count: delta("vsock.tx", bytes(&vsock_dev, ByteDirection::FromGuest)),
    };
    let vcpu = VcpuGroup {
        exit_io_in: delta("vcpu.io_in", exits(ExitKind::IoIn)),
        exit_io_out: delta("vcpu.io_out", exits(ExitKind::IoOut)),
        exit_mmio_read: delta("vcpu.mmio_read", exits(ExitKind::MmioRead)),
        exit_mmio_write: delta("vcpu.mmio_write", exits(ExitKind::MmioWrite)),
        failures: delta("vcpu.failures", prom.sum(Family::VcpuFailures, |_| true)),
    };
    let vmm = VmmGroup {
        panic_count: delta("vmm.panics", prom.sum(Family::VmmPanics, |_| true)),
    };
    let seccomp = SeccompGroup {
        num_faults: prom.sum(Family::VmExit, |s| {
            s.label(Label::Reason) == Some(crate::supervisor::EXIT_SECCOMP_VIOLATION)
        }) as u64,
    };
    let mut api_group = |group: ApiGroup| -> BTreeMap<String, u64> {
        api.iter()
            .filter(|((g, _), _)| *g == group)
            .map(|((_, field), &total)| {
                // Counts since the previous line, as Firecracker reports them.
                let key = format!("api.{}.{field}", group.name());
                (field.clone(), delta(&key, total as f64))
            })
            .collect()
    };
    let (get, put, patch) = (
        api_group(ApiGroup::Get),
        api_group(ApiGroup::Put),
        api_group(ApiGroup::Patch),
    );
    // bulkhead's own series that are not zero: all of them (every refusal reason of every
    // device) would not fit a line Kata's reader takes. At most half a line of them (a guest
    // can make many series non-zero); how many did not fit is said.
    let mut series = BTreeMap::new();
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
        series.insert(key, sample.value);
    }
    let mut line = Line {
        utc_timestamp_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        id: sink.emit_id.then(|| id.to_string()),
        properties: sink.properties.clone(),
        get_api_requests: get,
        put_api_requests: put,
        patch_api_requests: patch,
        devices: groups,
        block,
        net,
        vsock,
        vcpu,
        seccomp,
        vmm,
        bulkhead: series,
        bulkhead_series_omitted: (omitted > 0).then_some(omitted),
        bulkhead_alerts: Vec::new(),
        bulkhead_alerts_omitted: None,
    };
    // New alerts, as many as fit; the rest go in the next line. One too large for any line
    // is passed over (it is in the alerts file) and counted.
    let mut size = serde_json::to_string(&line).map_or(MAX_LINE, |t| t.len());
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
        line.bulkhead_alerts.push(alert.clone());
    }
    line.bulkhead_alerts_omitted = (too_large > 0).then_some(too_large);
    serde_json::to_value(&line).unwrap_or(Value::Null)
}

/// The longest metrics line written: Kata's Go runtime reads the metrics FIFO with a
/// bufio.Scanner, whose default limit is 64 KiB a line (a longer one stops its reader).
pub const MAX_LINE: usize = 60 << 10;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{MetricsSnapshot, Region, RequestViolation, SupervisorFacts, VmCounter};
    use serde_json::json;

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
        // Every group Firecracker's readers look for is there, and nothing is left empty.
        for key in [
            "utc_timestamp_ms",
            "get_api_requests",
            "put_api_requests",
            "patch_api_requests",
            "vsock",
            "bulkhead",
            "bulkhead_alerts",
        ] {
            assert!(line.get(key).is_some(), "no {key}: {line}");
        }
        assert_eq!(line["seccomp"]["num_faults"], 0, "{line}");
        assert_eq!(line["vsock"]["rx_bytes_count"], 0, "{line}");
        assert!(line.get("id").is_none(), "an id nobody asked for: {line}");
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
