//! The Firecracker personality: `bulkhead firecracker ARGS` (or this binary invoked as
//! `firecracker`) speaks Firecracker's command line, config file and API, so Kata Containers,
//! firecracker-containerd and firecracker-go-sdk drive bulkhead unchanged.
//!
//! The process started as Firecracker becomes the VM process (see [`host`]: Kata looks for the
//! vCPU threads there); a child forked at once is the front end. It holds the API socket and
//! the settings, and at InstanceStart (or at once with `--config-file`) it starts a
//! `bulkhead run` supervisor of its own, the same supervisor `bulkhead run` and `bulkhead
//! serve` use, which hands the VM over to the first process. The supervisor dies with the front
//! end, the front end with the first process (PR_SET_PDEATHSIG), and the VM ends when its
//! supervisor is gone. SIGTERM stops the VM in order. Firecracker's metrics lines are made from
//! the supervisor's metrics.

mod error;
mod host;
pub mod model;
pub mod routes;
mod server;
pub mod state;

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::launch::{Launch, Supervisor};
use crate::control::{self, Answer, Request};
use crate::exit::status;
use crate::telemetry::metrics::{ByteDirection, Family, Label, ReadSample};
use crate::telemetry::{ExitKind, Exposition, RequestViolation, Violation};
pub use error::FcError;
use model::{ConfigFile, Logger, Metrics, PartialDrive};
use state::{Pending, Phase};

/// The command line, as Firecracker takes it.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub api_sock: Option<PathBuf>,
    pub config_file: Option<PathBuf>,
    pub no_api: bool,
    pub id: String,
    pub level: Option<String>,
    pub log_path: Option<PathBuf>,
    pub metrics_path: Option<PathBuf>,
    pub boot_timer: bool,
    pub no_seccomp: bool,
}

/// Where the `bulkhead run` this process starts finds its end of the control channel.
const CHILD_CONTROL_FD: i32 = 3;
/// Where it finds the socket to the VM's host process (see [`host`]).
const CHILD_HANDOVER_FD: i32 = 4;

/// The default API socket.
pub const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";
/// Firecracker writes a metrics line this often.
const METRICS_PERIOD: Duration = Duration::from_secs(60);

/// The personality's state, shared by the API and the process's own tasks.
pub struct Personality {
    pub id: String,
    pub phase: Phase,
    pub pending: Pending,
    seccomp: bool,
    cwd: PathBuf,
    work: PathBuf,
    exe: PathBuf,
    /// The supervisor, once started.
    pub(super) supervisor: Option<Supervisor>,
    /// The VM process, as it said when asked whether it runs.
    pub(super) vm_pid: Option<i32>,
    metrics: Option<MetricsSink>,
    /// The control channel to the running VM process (Ctrl-Alt-Del, disk swaps).
    control: Option<std::os::unix::net::UnixStream>,
    logger_set: bool,
    api_counts: ApiCounts,
    /// The front end's end of the hand-over socket: the supervisor gets a copy and hands the
    /// VM over to the process the orchestrator started (see [`host`]).
    handover_fd: std::os::fd::RawFd,
}

/// Firecracker's groups of API request counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum ApiGroup {
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
type ApiCounts = std::collections::BTreeMap<(ApiGroup, String), u64>;

/// A device's series, as the metrics line sums them.
enum Dev<'a> {
    /// Every device of a kind (`virtio-blk` is `virtio-blk0`, `virtio-blk1`, ...).
    Kind(&'static str),
    /// One device.
    One(&'a str),
}

/// Where Firecracker-layout metrics lines go, and the last values sent (Firecracker's
/// counters are deltas since the previous line).
struct MetricsSink {
    file: File,
    emit_id: bool,
    properties: Option<Value>,
    last: std::collections::BTreeMap<String, f64>,
    alerts_sent: usize,
}

impl Personality {
    /// `path` as this process resolves it: relative to its working directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.cwd.join(path)
        }
    }

    fn vm_process(&self) -> Option<i32> {
        self.vm_pid
    }

    /// Counts a request as Firecracker's `*_api_requests` metrics do: `NAME_count` when it
    /// arrives, `NAME_fails` when it fails.
    pub fn count_request(&mut self, method: &str, parts: &[&str], failed: Option<bool>) {
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
        *self.api_counts.entry((group, field)).or_insert(0) += 1;
    }

    pub fn set_logger(&mut self, l: Logger) -> Result<(), FcError> {
        if let Some(level) = &l.level {
            let filter = level_filter(level).ok_or_else(|| FcError::LogLevel(level.clone()))?;
            log::set_max_level(filter);
        }
        if let Some(path) = &l.log_path {
            redirect_log(&self.resolve(path)).map_err(FcError::LogFile)?;
        }
        self.logger_set = true;
        Ok(())
    }

    pub fn set_metrics(&mut self, m: Metrics) -> Result<(), FcError> {
        if self.metrics.is_some() {
            return Err(FcError::MetricsAgain);
        }
        let file = open_output(&self.resolve(&m.metrics_path)).map_err(FcError::MetricsFile)?;
        self.metrics = Some(MetricsSink {
            file,
            emit_id: m.emit_id.unwrap_or(false),
            properties: m.properties.map(|p| json!(p)),
            last: Default::default(),
            alerts_sent: 0,
        });
        Ok(())
    }

    /// InstanceStart: starts the supervisor and waits until the VM runs (or failed).
    pub fn start(&mut self) -> Result<(), FcError> {
        if self.phase != Phase::NotStarted {
            return Err(FcError::Started);
        }
        let mut config = self
            .pending
            .to_bulkhead(&self.id, self.seccomp, &self.cwd)?;
        config.metrics_file = Some(self.work.join("metrics.prom"));
        // The VM process's end of the control channel reaches it as descriptor 3.
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(|source| FcError::Start {
                what: "make the control channel",
                source,
            })?;
        config.control_fd = Some(CHILD_CONTROL_FD);
        config.handover_fd = Some(CHILD_HANDOVER_FD);
        config.alerts = Some(self.work.join("alerts.jsonl").display().to_string());
        let path = self.work.join("config.json");
        std::fs::write(&path, config.to_json()).map_err(|source| FcError::Start {
            what: "write the VMM's settings",
            source,
        })?;
        let supervisor = Supervisor::start(Launch {
            exe: &self.exe,
            config: &path,
            log_level: Some(level_name(log::max_level())),
            // The settings file alone can not turn the filters off: the command line says so.
            no_seccomp: !self.seccomp,
            inherit: vec![
                (theirs.as_raw_fd(), CHILD_CONTROL_FD),
                (self.handover_fd, CHILD_HANDOVER_FD),
            ],
            output: None,
            own_group: false,
            dies_with_us: true,
        })
        .map_err(FcError::Launch)?;
        drop(theirs);
        ours.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|source| FcError::Start {
                what: "time the control channel",
                source,
            })?;
        self.control = Some(ours);
        // Running means the VMM serves its event loop (its vCPUs run): it answers a ping
        // then, with its pid.
        let vm_pid = match self.command(Request::Ping, None) {
            Ok(Answer::Running { pid }) => i32::try_from(pid).ok().filter(|p| *p > 0),
            _ => None,
        };
        if vm_pid.is_none() {
            self.control = None;
            supervisor.kill();
            return Err(FcError::DidNotStart);
        }
        // Reaped by the process's wait loop.
        self.supervisor = Some(supervisor);
        self.vm_pid = vm_pid;
        self.phase = Phase::Running;
        let _ = self.flush_metrics();
        Ok(())
    }

    pub fn pause(&mut self, pause: bool) -> Result<(), FcError> {
        let vm = self.vm_process().ok_or(FcError::NotRunning)?;
        let signal = if pause { libc::SIGSTOP } else { libc::SIGCONT };
        crate::process::signal(vm, signal).map_err(FcError::Signal)?;
        self.phase = if pause { Phase::Paused } else { Phase::Running };
        Ok(())
    }

    /// Swaps a running drive's backing file. A new rate limiter is accepted and logged: a
    /// running VM keeps the limits it started with.
    pub fn patch_drive(&mut self, d: PartialDrive) -> Result<(), FcError> {
        let found = self
            .pending
            .ordered_drives()
            .iter()
            .position(|o| o.drive_id == d.drive_id);
        let Some(index) = found else {
            return Err(FcError::NoSuchDrive);
        };
        if !model::RateLimiter::is_unlimited(&d.rate_limiter) {
            log::warn!(
                "PATCH /drives/{}: a running VM keeps the rate limiter it started with; the new one is not applied",
                d.drive_id
            );
        }
        let Some(path) = d.path_on_host else {
            if d.rate_limiter.is_some() {
                return Ok(());
            }
            return Err(FcError::NoBackingFile);
        };
        let read_only = self
            .pending
            .drives
            .iter()
            .find(|o| o.drive_id == d.drive_id)
            .and_then(|o| o.is_read_only)
            .unwrap_or(false);
        let host_path = self.resolve(&path);
        // Non-blocking, so a FIFO named here can not hang the API; the VMM refuses anything
        // that is not a disk.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NONBLOCK)
            .open(&host_path)
            .map_err(|source| FcError::BackingFile {
                path: host_path.clone(),
                source,
            })?;
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        let answer = self.command(Request::SwapDisk { index }, Some(&file))?;
        if answer != Answer::Done {
            return Err(FcError::SwapRefused {
                path: host_path,
                answer,
            });
        }
        if let Some(o) = self
            .pending
            .drives
            .iter_mut()
            .find(|o| o.drive_id == d.drive_id)
        {
            o.path_on_host = Some(path);
        }
        Ok(())
    }

    pub fn ctrl_alt_del(&mut self) -> Result<(), FcError> {
        if self.phase == Phase::NotStarted {
            return Err(FcError::NotStarted);
        }
        match self.command(Request::CtrlAltDel, None)? {
            Answer::Done => Ok(()),
            other => Err(FcError::CtrlAltDelRefused(other)),
        }
    }

    /// Sends one request on the control channel, with `file` passed along, and returns the
    /// VM process's answer.
    fn command(&mut self, request: Request, file: Option<&File>) -> Result<Answer, FcError> {
        if self.phase == Phase::Paused {
            // The VMM thread is stopped with the rest of the VM process: it could not answer.
            return Err(FcError::Paused);
        }
        let channel = self
            .control
            .as_ref()
            .ok_or(FcError::VmmGone(control::ControlError::Closed))?;
        control::ask(channel, request, file).map_err(|e| {
            // A request sent but not answered would leave its answer for the next one: the
            // channel is given up instead.
            self.control = None;
            FcError::VmmGone(e)
        })
    }

    /// Writes one metrics line, in Firecracker's layout for what has a counterpart in
    /// bulkhead, with bulkhead's own series and new alerts under their own keys.
    pub fn flush_metrics(&mut self) -> Result<(), FcError> {
        if self.phase == Phase::NotStarted {
            return Err(FcError::NotStarted);
        }
        let work = self.work.clone();
        let id = self.id.clone();
        let api = self.api_counts.clone();
        let drive_ids: Vec<String> = self
            .pending
            .ordered_drives()
            .iter()
            .map(|d| d.drive_id.clone())
            .collect();
        let net_ids: Vec<String> = self
            .pending
            .nets
            .iter()
            .map(|n| n.iface_id.clone())
            .collect();
        let Some(sink) = self.metrics.as_mut() else {
            return Ok(());
        };
        let text = std::fs::read_to_string(work.join("metrics.prom")).unwrap_or_default();
        let prom = Exposition::parse(&text);
        let alerts: Vec<Value> = std::fs::read_to_string(work.join("alerts.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let devices = Devices {
            drives: drive_ids,
            nets: net_ids,
        };
        let line = metrics_line(sink, &prom, &alerts, &id, &api, &devices);
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        sink.file.write_all(&bytes).map_err(FcError::MetricsWrite)
    }
}

fn level_filter(level: &str) -> Option<log::LevelFilter> {
    Some(match level.to_ascii_lowercase().as_str() {
        "error" => log::LevelFilter::Error,
        "warning" | "warn" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        "off" => log::LevelFilter::Off,
        _ => return None,
    })
}

fn level_name(level: log::LevelFilter) -> &'static str {
    match level {
        log::LevelFilter::Off | log::LevelFilter::Error => "error",
        log::LevelFilter::Warn => "warn",
        log::LevelFilter::Info => "info",
        log::LevelFilter::Debug => "debug",
        log::LevelFilter::Trace => "trace",
    }
}

/// Opens a log or metrics destination as Firecracker does: a FIFO (its reader already
/// waiting) or a file, appended to.
fn open_output(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// Sends this process's log (its stderr), and the VMM's it starts later, to `path`.
fn redirect_log(path: &Path) -> std::io::Result<()> {
    let f = open_output(path)?;
    use std::os::fd::AsRawFd;
    // SAFETY: dup2 onto stderr of a descriptor this process owns.
    if unsafe { libc::dup2(f.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One Firecracker-layout metrics line from bulkhead's Prometheus text.
/// The Firecracker ids of the VM's devices, in bulkhead's order (virtio-blkN, virtio-netN).
struct Devices {
    drives: Vec<String>,
    nets: Vec<String>,
}

fn metrics_line(
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

/// Builds the settings from `--config-file`.
fn from_config_file(p: &mut Personality, path: &Path) -> Result<(), FcError> {
    let text = crate::hostfile::read_settings(path)?;
    let file: ConfigFile = serde_json::from_str(&text).map_err(FcError::Json)?;
    for (key, present) in [
        ("balloon", file.balloon.is_some()),
        ("cpu-config", file.cpu_config.is_some()),
        ("mmds-config", file.mmds_config.is_some()),
        (
            "pmem",
            file.pmem
                .as_ref()
                .is_some_and(|v| v.as_array().map_or(true, |a| !a.is_empty())),
        ),
        ("memory-hotplug", file.memory_hotplug.is_some()),
    ] {
        if present {
            return Err(FcError::Unsupported(key));
        }
    }
    if let Some(m) = file.machine_config {
        p.pending.set_machine(m)?;
    }
    p.pending.boot = Some(file.boot_source);
    for d in file.drives {
        p.pending.put_drive(d)?;
    }
    for n in file.network_interfaces {
        p.pending.put_net(n)?;
    }
    p.pending.vsock = file.vsock;
    p.pending.entropy = file.entropy;
    if let Some(l) = file.logger {
        p.set_logger(l)?;
    }
    if let Some(m) = file.metrics {
        p.set_metrics(m)?;
    }
    Ok(())
}

/// Runs the personality; returns the process's exit status.
pub fn run(opts: Options) -> i32 {
    if opts.no_api && opts.config_file.is_none() {
        eprintln!("Arguments parsing error: Argument 'config-file' required, but not found.");
        return 153;
    }
    if let Some(level) = &opts.level {
        match level_filter(level) {
            Some(f) => log::set_max_level(f),
            None => {
                eprintln!("Error: InvalidLogLevel({level:?})");
                return 152;
            }
        }
    }
    if let Some(path) = &opts.log_path {
        if let Err(e) = redirect_log(path) {
            eprintln!("cannot open the log {}: {e}", path.display());
            return status::RUNTIME_ERROR;
        }
    }
    // Its own directory for the VMM's settings and outputs, under a name nobody can guess: in
    // the temporary directory, or, in a jail that has none, in /run (the one place the jailer
    // lets it write; its root is root's), or in the working directory.
    let name = format!(
        "bulkhead-fc-{}",
        crate::config::random_vm_id().unwrap_or_else(|_| std::process::id().to_string())
    );
    let candidates = [
        std::env::temp_dir().join(&name),
        PathBuf::from("/run").join(&name),
        PathBuf::from(&name),
    ];
    let Some(work) = candidates
        .into_iter()
        .find(|dir| std::fs::DirBuilder::new().mode(0o700).create(dir).is_ok())
    else {
        log::error!("cannot create a working directory {name}");
        return status::RUNTIME_ERROR;
    };
    let work = std::env::current_dir()
        .map(|cwd| cwd.join(&work))
        .unwrap_or(work);
    // This process, the one the orchestrator started, keeps the vCPU threads, where Kata
    // looks for them; the API front end goes on in a child (see `host`).
    let front_end = match host::split(&work, opts.no_seccomp) {
        host::Split::FrontEnd(socket) => socket,
        host::Split::HostEnded(code) => return code,
    };
    // In a jail without /proc, the absolute path it was started by (the jailer's `/NAME`).
    let argv0 = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let exe = match std::env::current_exe().ok().or(argv0) {
        Some(e) => e,
        None => {
            log::error!("cannot find this program (no /proc, and not started by an absolute path)");
            return status::RUNTIME_ERROR;
        }
    };
    let mut personality = Personality {
        id: opts.id.clone(),
        phase: Phase::NotStarted,
        pending: Pending::default(),
        seccomp: !opts.no_seccomp,
        cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
        work: work.clone(),
        exe,
        supervisor: None,
        vm_pid: None,
        metrics: None,
        control: None,
        logger_set: false,
        api_counts: ApiCounts::new(),
        handover_fd: front_end.as_raw_fd(),
    };
    if opts.boot_timer {
        log::info!("--boot-timer: bulkhead logs the guest's boot time itself");
    }
    if let Some(path) = &opts.metrics_path {
        if let Err(e) = personality.set_metrics(Metrics {
            metrics_path: path.clone(),
            ..Metrics::default()
        }) {
            log::error!("{e}");
            return status::RUNTIME_ERROR;
        }
    }
    let personality = Arc::new(Mutex::new(personality));
    let code = server::serve(personality.clone(), &opts);
    let _ = std::fs::remove_dir_all(&work);
    // The host process exits with this status, the one Firecracker's process would have.
    if let Err(e) = crate::handover::send_status(&front_end, code) {
        log::debug!("the VM's host process did not take the status: {e}");
    }
    code
}

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
