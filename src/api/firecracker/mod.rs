//! The Firecracker personality: `bulkhead firecracker ARGS` (or this binary invoked as
//! `firecracker`) speaks Firecracker's command line, config file and API, so Kata Containers,
//! firecracker-containerd and firecracker-go-sdk drive bulkhead unchanged.
//!
//! The process started as Firecracker becomes the VM process (see [`host`]: Kata looks for the
//! vCPU threads there); a child forked at once is the front end. It holds the API socket and
//! the settings, and at InstanceStart (or at once with `--config-file`) it forks a supervisor
//! of its own (the same supervisor `bulkhead run` and `bulkhead serve` use), which hands the VM
//! over to the first process. The supervisor dies with the front
//! end, the front end with the first process (PR_SET_PDEATHSIG), and the VM ends when its
//! supervisor is gone. SIGTERM stops the VM in order. Firecracker's metrics lines are made from
//! the supervisor's metrics.

mod error;
mod host;
mod metrics;
pub mod model;
pub mod routes;
mod server;
pub mod state;
mod workdir;

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::launch::{Launch, Supervisor};
use crate::control::{self, Answer, Request};
use crate::exit::status;
use crate::snapshot::client::NewFile;
use crate::telemetry::Exposition;
pub use error::FcError;
use metrics::{metrics_line, ApiCounts, Devices, MetricsSink};
use model::{
    ConfigFile, Logger, MemoryBackendType, Metrics, PartialDrive, SnapshotCreateParams,
    SnapshotLoadParams,
};
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
        metrics::count_request(&mut self.api_counts, method, parts, failed);
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
        self.metrics = Some(MetricsSink::new(
            file,
            m.emit_id.unwrap_or(false),
            m.properties.map(|p| json!(p)),
        ));
        Ok(())
    }

    /// InstanceStart: starts the supervisor and waits until the VM runs (or failed).
    pub fn start(&mut self) -> Result<(), FcError> {
        if self.phase != Phase::NotStarted {
            return Err(FcError::Started);
        }
        let config = self
            .pending
            .to_bulkhead(&self.id, self.seccomp, &self.cwd)?;
        self.launch(config, Phase::Running)
    }

    /// Starts a supervisor with `config` (and this process's outputs and channels) and waits
    /// until its VMM serves its event loop; the VM is then in `phase`.
    fn launch(&mut self, mut config: crate::RawConfig, phase: Phase) -> Result<(), FcError> {
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
        let inherit = vec![
            (theirs.as_raw_fd(), CHILD_CONTROL_FD),
            (self.handover_fd, CHILD_HANDOVER_FD),
        ];
        // The host reads the file; the supervisor is forked with the settings in hand (this
        // process has one thread), or else started as `bulkhead run --config`. The fork saves
        // a program start and shares this process's pages (on a clone loaded from a snapshot,
        // PUT /snapshot/load answered about 1 ms sooner and each clone held less memory).
        let mut settings = config;
        if !self.seccomp {
            settings.seccomp = Some(false);
        }
        let supervisor = match Supervisor::fork(settings, &inherit).map_err(FcError::Launch)? {
            Some(forked) => forked,
            None => Supervisor::start(Launch {
                exe: &self.exe,
                config: &path,
                log_level: Some(level_name(log::max_level())),
                // The settings file alone can not turn the filters off: the command line
                // says so.
                no_seccomp: !self.seccomp,
                inherit,
                output: None,
                own_group: false,
                dies_with_us: true,
            })
            .map_err(FcError::Launch)?,
        };
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
        self.phase = phase;
        let _ = self.flush_metrics();

        // The settings and the start are done with: their freed memory goes back rather than
        // staying with this process for the VM's life.
        crate::residency::trim_heap();
        Ok(())
    }

    /// `PATCH /vm`: the vCPUs park outside KVM_RUN (or run again); the VMM thread goes on
    /// serving the control channel, so a paused VM can be snapshotted.
    pub fn pause(&mut self, pause: bool) -> Result<(), FcError> {
        if self.vm_process().is_none() {
            return Err(FcError::NotRunning);
        }
        let (request, what) = if pause {
            (Request::Pause, "pause")
        } else {
            (Request::Resume, "resume")
        };
        match self.command(request, None)? {
            Answer::Done => {
                self.phase = if pause { Phase::Paused } else { Phase::Running };
                Ok(())
            }
            other => Err(FcError::PauseRefused(what, other)),
        }
    }

    /// `PUT /snapshot/create`: of a paused VM, into files this process creates (0600).
    pub fn snapshot_create(&mut self, params: SnapshotCreateParams) -> Result<(), FcError> {
        if self.phase != Phase::Paused {
            return Err(FcError::SnapshotNotPaused);
        }
        let create = |what, path: &Path| {
            let path = self.resolve(path);
            NewFile::create(&path).map_err(|source| FcError::SnapshotFile { what, path, source })
        };
        let state = create("snapshot", &params.snapshot_path)?;
        let mem = create("memory", &params.mem_file_path)?;
        let channel = self
            .control
            .as_ref()
            .ok_or(FcError::VmmGone(control::ControlError::Closed))?;
        // A snapshot of a large VM takes as long as writing its RAM does: no time limit (the
        // VMM answers, or the channel closes with it).
        let _ = channel.set_read_timeout(None);
        let request = Request::Snapshot {
            kind: params.snapshot_type.kind(),
        };
        let answer = control::ask_with(channel, request, &[state.file(), mem.file()]);
        let _ = channel.set_read_timeout(Some(Duration::from_secs(10)));
        match answer {
            Ok(Answer::Done) => {}
            Ok(Answer::NotTracking) => return Err(FcError::DiffUntracked),
            Ok(other) => return Err(FcError::SnapshotFailed(other)),
            Err(e) => {
                self.control = None;
                return Err(FcError::VmmGone(e));
            }
        }
        for (what, file) in [("snapshot", state), ("memory", mem)] {
            file.commit()
                .map_err(|source| FcError::SnapshotCommit { what, source })?;
        }
        // Only now may the VM forget the pages this snapshot took (a diff whose files were
        // not kept leaves them to the next). Not told, it writes them again in the next diff.
        match self.command(Request::SnapshotKept, None) {
            Ok(Answer::Done) => {}
            other => log::warn!("the snapshot is kept, but the VM was not told so ({other:?}): its next diff snapshot writes this one's pages again"),
        }
        Ok(())
    }

    /// `PUT /snapshot/load`: starts the VM from a snapshot, paused unless `resume_vm`.
    pub fn snapshot_load(&mut self, params: SnapshotLoadParams) -> Result<(), FcError> {
        if self.phase != Phase::NotStarted {
            return Err(FcError::Started);
        }
        if self.pending.configured() {
            return Err(FcError::LoadNotAllowed);
        }
        let mem = match (&params.mem_file_path, &params.mem_backend) {
            (Some(path), None) => path.clone(),
            (None, Some(b)) if b.backend_type == MemoryBackendType::File => b.backend_path.clone(),
            (None, Some(_)) => {
                return Err(FcError::LoadParams(
                    "a Uffd memory backend is not supported by bulkhead yet",
                ))
            }
            _ => {
                return Err(FcError::LoadParams(
                    "exactly one of mem_file_path and mem_backend must be given",
                ))
            }
        };
        // enable_diff_snapshots is the field's deprecated name.
        let track_dirty_pages = params.track_dirty_pages.or(params.enable_diff_snapshots);
        let state_path = self.resolve(&params.snapshot_path);
        let mut config = crate::RawConfig {
            restore: Some(crate::config::RawRestore {
                state: state_path.clone(),
                mem: self.resolve(&mem),
            }),
            vm_id: Some(self.id.clone()),
            console: Some(crate::config::ConsoleConfig::Stdio.to_string()),
            seccomp: Some(self.seccomp),
            thread_names: Some(crate::config::ThreadNames::Firecracker),
            vsock_cid_shared: Some(true),
            start_paused: Some(!params.resume_vm),
            track_dirty_pages,
            ..crate::RawConfig::default()
        };
        let overrides = params.network_overrides.unwrap_or_default();
        if params.vsock_override.is_some() || !overrides.is_empty() {
            let file = File::open(&state_path)
                .map_err(|e| FcError::LoadState(crate::snapshot::SnapshotError::Read(e)))?;
            let saved = crate::snapshot::read(&file).map_err(FcError::LoadState)?;
            let machine = crate::RawConfig::from_json(&saved.machine)
                .map_err(|_| FcError::LoadParams("the snapshot's settings do not parse"))?;
            if let Some(o) = &params.vsock_override {
                // The CID stays the snapshot's: only the socket moves.
                let Some(mut vsock) = machine.vsock.clone() else {
                    return Err(FcError::LoadParams("the snapshot has no vsock device"));
                };
                vsock.uds = self.resolve(&o.uds_path);
                config.vsock = Some(vsock);
            }
            if !overrides.is_empty() {
                config.nets = Some(moved_taps(machine.nets.unwrap_or_default(), &overrides)?);
            }
        }
        let phase = if params.resume_vm {
            Phase::Running
        } else {
            Phase::Paused
        };
        self.launch(config, phase)
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
    /// VM process's answer. A paused VM answers too: only its vCPUs are stopped.
    fn command(&mut self, request: Request, file: Option<&File>) -> Result<Answer, FcError> {
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
    // Its own directory for the VMM's settings and outputs (see `workdir`), locked by this
    // process and, once forked, its front end.
    let Some(workdir) = workdir::WorkDir::create() else {
        return status::RUNTIME_ERROR;
    };
    let work = workdir.path.clone();
    // This process, the one the orchestrator started, keeps the vCPU threads, where Kata
    // looks for them; the API front end goes on in a child (see `host`).
    let front_end = match host::split(&work, opts.no_seccomp) {
        host::Split::FrontEnd(socket) => socket,
        host::Split::HostEnded(code) => {
            // The lock is the front end's to hold now: the host closed every descriptor but
            // the VM's when it became the VM process, its copy of the lock's among them.
            std::mem::forget(workdir);
            return code;
        }
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

/// The snapshot's network devices, each named by its tap alone (the restore keeps its MAC and
/// limits), with the taps `overrides` move by `iface_id`.
fn moved_taps(
    saved: Vec<crate::config::RawNet>,
    overrides: &[model::NetworkOverride],
) -> Result<Vec<crate::config::RawNet>, FcError> {
    if let Some(unknown) = overrides
        .iter()
        .find(|o| !saved.iter().any(|n| n.id.as_deref() == Some(&o.iface_id)))
    {
        return Err(FcError::NoSuchIface(unknown.iface_id.clone()));
    }
    Ok(saved
        .into_iter()
        .map(|n| {
            let moved = overrides
                .iter()
                .rev()
                .find(|o| n.id.as_deref() == Some(&o.iface_id));
            crate::config::RawNet {
                tap: moved.map_or(n.tap, |o| o.host_dev_name.clone()),
                id: n.id,
                ..crate::config::RawNet::default()
            }
        })
        .collect())
}
