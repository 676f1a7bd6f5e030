//! Command-line parsing. Turns flags into a [`RawConfig`] laid over the config file's.

use std::path::PathBuf;

use bulkhead::config::{RateLimiterConfig, RawDisk, RawJail, RawNet, RawShare, RawVsock};
use bulkhead::test_hooks::TestHook;
use bulkhead::RawConfig;
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead",
    version,
    about = "A minimal KVM VMM: one tenant microVM per process"
)]
pub struct Cli {
    /// Log level for messages on stderr.
    #[arg(long, value_enum, default_value_t = LogLevel::Info, global = true)]
    pub log_level: LogLevel,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl From<LogLevel> for log::LevelFilter {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

// Parsed once at start-up; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot one VM and wait for it to end; exits with the guest's status.
    Run(RunArgs),
    /// Run a command in a fresh VM that sees the host's files (its `/` read-only, writable
    /// tmpfs on /tmp and /run, an overlay on /var), in this directory as this user; its
    /// stdout and stderr come back separately and its status is this command's.
    Exec(ExecArgs),
    /// Work with the management plane's audit log.
    #[command(subcommand)]
    AuditLog(AuditLogCommand),
    /// Run the management daemon: tenants' VMs, jailed, behind per-tenant sockets (as root).
    Serve {
        /// The daemon's settings (docs/serve.example.json).
        #[arg(long, value_name = "serve.json")]
        config: PathBuf,
    },
    /// Talk to the management daemon.
    Ctl(CtlArgs),
    /// Snapshots of a running `bulkhead run --control-socket PATH`.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Firecracker's command line, config file and API (also what this binary does when
    /// invoked as `firecracker`).
    Firecracker(FcArgs),
    /// Firecracker's jailer: the same flags, chroot layout and pid file, then the VMM
    /// (normally the Firecracker personality) exec'd inside.
    Jailer(JailerArgs),
    /// Run the cross-tenant isolation checks on this host (against a daemon started for the
    /// purpose, with two synthetic tenants) and write the evidence bundle (as root). Exits 0
    /// when every check passes, 1 when one fails.
    Audit {
        /// Where the bundle goes: audit.json, audit.md and the run's audit log.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The test guests (built by `make -C guest-images`) [default: guest-images next to
        /// this program's directory, as cargo builds them].
        #[arg(long, value_name = "DIR")]
        guests: Option<PathBuf>,
    },
}

// Parsed once at start-up; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Pause the VM, write its state and memory, and resume it (or leave it paused, or end it).
    Create {
        /// The VM's control socket (`bulkhead run --control-socket`).
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        /// The state file to write (created mode 0600, replaced if it exists).
        #[arg(long, value_name = "PATH")]
        state: PathBuf,
        /// The memory file to write (created mode 0600, replaced if it exists).
        #[arg(long, value_name = "PATH")]
        mem: PathBuf,
        /// Leave the VM paused afterwards (`bulkhead snapshot resume` lets it go on).
        #[arg(long)]
        keep_paused: bool,
        /// Write only the pages changed since the VM's last snapshot (or its start or
        /// restore): the VM must run with --track-dirty-pages, and `bulkhead snapshot rebase`
        /// lays the memory file over the last snapshot's before a load.
        #[arg(long)]
        diff: bool,
    },
    /// Lay a diff snapshot's memory file over the memory file of the snapshot it follows,
    /// into a new full memory file (neither input is written; --out may name the base).
    Rebase {
        /// The memory file of the snapshot the diff was taken after (full, or itself rebased).
        #[arg(long, value_name = "PATH")]
        base: PathBuf,
        /// The diff snapshot's memory file.
        #[arg(long, value_name = "PATH")]
        diff: PathBuf,
        /// The memory file to write (created mode 0600, replaced if it exists).
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
    /// Pause a running VM.
    Pause {
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
    },
    /// Resume a paused VM.
    Resume {
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
    },
    /// Start a VM from a snapshot and wait for it to end: `bulkhead run --restore STATE
    /// --restore-mem MEM` (`--state` and `--mem` name them here), with the same flags.
    Load(RunArgs),
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The daemon's socket [default: your tenant's socket under --run-dir, or the admin
    /// socket as root].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The daemon's run_dir, where the default socket is looked for.
    #[arg(long, value_name = "DIR", default_value = "/run/bulkhead")]
    pub run_dir: PathBuf,
    /// Why an admin acts on a tenant's VM (required then; audited, and alerted on).
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Start a VM from a `bulkhead run --config` file; prints its id.
    Create {
        #[arg(long, value_name = "FILE.json")]
        config: PathBuf,
    },
    /// List the VMs you may see.
    List,
    /// One VM: state, pids, start time, exit reason, settings.
    Get { id: String },
    /// Stop a VM (SIGTERM to its supervisor: an orderly end).
    Stop { id: String },
    /// Pause a running VM.
    Pause { id: String },
    /// Resume a paused VM.
    Resume { id: String },
    /// Forget an ended VM and remove its files.
    Delete { id: String },
    /// The VM's Prometheus metrics.
    Metrics { id: String },
    /// The VM's alerts, as JSON lines.
    Alerts { id: String },
    /// The VM's isolation report.
    Report {
        id: String,
        /// Markdown instead of JSON.
        #[arg(long)]
        markdown: bool,
    },
    /// The audit log (admins).
    AuditLog,
    /// Any request, as `curl --unix-socket` would send it (the Firecracker personality's API
    /// too).
    Request {
        method: String,
        path: String,
        /// The body, from a file.
        #[arg(long, value_name = "FILE")]
        body_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditLogCommand {
    /// Check the log's hash chain: exits 0 when it holds (and prints the head hash to compare
    /// with one kept elsewhere), 1 naming the first line that breaks it, 2 when it can not be
    /// read.
    Verify {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// A head kept elsewhere (from `GET /v1/audit-log/head` or the daemon's log): the
        /// chain must hold a line with this hash, or the log was cut or rewritten before it
        /// (exit 1).
        #[arg(long, value_name = "HASH")]
        head: Option<String>,
    },
}

/// `bulkhead exec`'s flags.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The guest kernel (vmlinux or bzImage) with virtio-mmio, vsock and virtio-fs built in
    /// (`scripts/kernel-config` prints a fragment), or as modules with --modules.
    #[arg(long, env = "BULKHEAD_KERNEL", value_name = "PATH")]
    pub kernel: PathBuf,
    /// The kernel's modules directory (/lib/modules/VERSION, the host's or from the kernel's
    /// package): the ones the VM needs are put in its initramfs and loaded first [default:
    /// the host's /lib/modules/VERSION when the kernel is a bzImage of that version].
    #[arg(long, value_name = "DIR")]
    pub modules: Option<PathBuf>,
    /// Also share this host directory read-write at the same path (repeatable).
    #[arg(long = "share", value_name = "DIR")]
    pub shares: Vec<PathBuf>,
    /// Guest RAM in MiB (only what the guest touches is used).
    #[arg(long, default_value_t = 512)]
    pub mem_mib: u64,
    /// vCPUs [default: this host's CPUs, at most 4].
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Seconds the command may run; then the VM is stopped and the status is 124.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// More kernel command-line parameters.
    #[arg(long, value_name = "PARAMS")]
    pub cmdline: Option<String>,
    /// The virtiofsd program [default: virtiofsd on PATH, then /usr/libexec/virtiofsd].
    #[arg(long, value_name = "PATH")]
    pub virtiofsd: Option<PathBuf>,
    /// Turn the seccomp filters off (debugging only).
    #[arg(long)]
    pub no_seccomp: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Settings as JSON (same names as the flags, with underscores); flags override it.
    #[arg(long, value_name = "FILE.json")]
    pub config: Option<PathBuf>,
    /// Kernel: an ELF vmlinux (or any static ELF64 with a 64-bit entry) or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line, added after bulkhead's own arguments; `-- ARGS` go to init.
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// Guest RAM in MiB [default: 128].
    #[arg(long, value_name = "N")]
    pub mem_mib: Option<u64>,
    /// Serial console: stdio, none or file:PATH [default: stdio].
    #[arg(long, value_name = "stdio|file:PATH|none")]
    pub console: Option<String>,
    /// Bytes the guest may write to the console; the rest is dropped and counted
    /// (bulkhead_console_dropped_bytes) [default: 64 MiB for a console file, else no limit].
    #[arg(long, value_name = "BYTES")]
    pub console_limit: Option<u64>,
    /// Refuse a kernel, initrd or disk that is itself a symlink (O_NOFOLLOW); the default in
    /// a jail, which follows no symlink at all.
    #[arg(long)]
    pub no_follow: bool,
    /// Tenant this VM belongs to [default: default].
    #[arg(long, value_name = "ID")]
    pub tenant: Option<String>,
    /// This VM's id [default: random].
    #[arg(long, value_name = "ID")]
    pub vm_id: Option<String>,
    /// Attach a virtio block device backed by a raw file (repeatable). `ro` makes it
    /// read-only whatever the guest asks; `id` is what the guest reads as its id [default:
    /// diskN]. Rate limits are token buckets as in Firecracker: `bw_size=BYTES,
    /// bw_refill_time=MS` (and `bw_one_time_burst=BYTES`) for bytes, `ops_size=N,
    /// ops_refill_time=MS` (and `ops_one_time_burst=N`) for requests.
    #[arg(
        long = "disk",
        value_name = "PATH[,ro][,id=NAME][,bw_size=..][,ops_size=..]"
    )]
    pub disks: Vec<RawDisk>,
    /// Attach a virtio network device on a tap interface (repeatable). Frames the guest
    /// sends from any other MAC than this one are dropped [default MAC: derived from the VM
    /// id]. Rate limits as for --disk, prefixed `rx_` (what the guest receives) or `tx_`
    /// (what it sends): `rx_bw_size=BYTES,rx_bw_refill_time=MS,tx_ops_size=N,...`. `id`
    /// names the interface in snapshots. With --restore, `tap=NAME` alone, once per device of
    /// the snapshot: the clone's own taps.
    #[arg(
        long = "net",
        value_name = "tap=NAME[,mac=MAC][,id=NAME][,rx_bw_size=..][,tx_ops_size=..]"
    )]
    pub nets: Vec<RawNet>,
    /// Attach a virtio-vsock device with guest CID N. The host reaches guest port P by
    /// connecting to PATH and writing `CONNECT P\n`; guest connections to host port P go to
    /// PATH_P. `buffer_mib` bounds the host-side buffers of all connections together
    /// [default: 32, which allows 102 connections of 320 KiB each].
    #[arg(long, value_name = "cid=N,uds=PATH[,buffer_mib=MIB]")]
    pub vsock: Option<RawVsock>,
    /// Share a host directory with the guest over virtio-fs (repeatable); the guest mounts it
    /// with `mount -t virtiofs TAG DIR`. Read-only unless `rw` is given. Each share is served
    /// by a virtiofsd the supervisor starts in its own sandbox; guest RAM is then a shared
    /// memfd that virtiofsd maps.
    #[arg(long = "share", value_name = "DIR:TAG[,ro|,rw]")]
    pub shares: Vec<RawShare>,
    /// The virtiofsd program for --share [default: virtiofsd on PATH, then
    /// /usr/libexec/virtiofsd].
    #[arg(long, value_name = "PATH")]
    pub virtiofsd: Option<PathBuf>,
    /// Leave out the virtio-rng device (present by default).
    #[arg(long)]
    pub no_rng: bool,
    /// Limit what the guest draws from virtio-rng: `bw_size=BYTES,bw_refill_time=MS` and/or
    /// `ops_size=N,ops_refill_time=MS` (Firecracker's entropy rate limiter).
    #[arg(long, value_name = "bw_size=..,bw_refill_time=..")]
    pub rng_limit: Option<RateLimiterConfig>,
    /// Leave out the ACPI tables: the guest finds its vCPUs in the MP table and its devices
    /// on the command line (also what `acpi=off` in --cmdline implies).
    #[arg(long)]
    pub no_acpi: bool,
    /// Also announce the virtio devices on the kernel command line (`virtio_mmio.device=`),
    /// for kernels that read them there but do not have ACPI.
    #[arg(long)]
    pub cmdline_devices: bool,
    /// Interrupt controllers: `split` (local APICs in KVM, the IOAPIC in bulkhead, no PIC or
    /// PIT) or `full` (all in KVM, as a guest without ACPI needs). Default: split with ACPI,
    /// full without.
    #[arg(long, value_name = "split|full")]
    pub irqchip: Option<String>,
    /// Run without seccomp filters. For debugging only: the VMM is then unconfined.
    #[arg(long)]
    pub no_seccomp: bool,
    /// Write Prometheus metrics to PATH, replaced every second and at exit.
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,
    /// Write alerts as JSON lines (Falco's layout) to PATH, or to stderr with `-`.
    #[arg(long, value_name = "PATH|-")]
    pub alerts: Option<String>,
    /// Also POST each alert to a falcosidekick-compatible endpoint.
    #[arg(long, value_name = "http://HOST[:PORT][/PATH]")]
    pub alerts_http: Option<String>,
    /// End the VM after SECS seconds (exit status 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// What follows an alert [default: reset-device for virtio rules, log for the rest].
    #[arg(long, value_name = "log|reset-device|stop-vm")]
    pub on_violation: Option<String>,
    /// Run the VM process in a jail: its own mount, pid, IPC, UTS and network namespaces, a
    /// root holding only its files, a cgroup with CPU, memory and pids limits, a uid and gid
    /// of its own and no capabilities. Needs root. Limits are set under "jail" in --config.
    #[arg(long)]
    pub jail: bool,
    /// Where the jail's per-VM directory is made [default: /run/bulkhead/jail].
    #[arg(long, value_name = "DIR", requires = "jail")]
    pub jail_dir: Option<PathBuf>,
    /// The uid the jailed VM process runs as [default: one of a per-VM range].
    #[arg(long, value_name = "UID", requires = "jail")]
    pub jail_uid: Option<u32>,
    /// The gid the jailed VM process runs as [default: its uid].
    #[arg(long, value_name = "GID", requires = "jail")]
    pub jail_gid: Option<u32>,
    /// Join this network namespace (e.g. /run/netns/NAME, where the VM's taps are) instead of
    /// a new, empty one.
    #[arg(long, value_name = "PATH", requires = "jail")]
    pub jail_netns: Option<PathBuf>,
    /// Start from a snapshot's state file (with --restore-mem) instead of booting a kernel;
    /// the machine settings come from the snapshot.
    #[arg(long, value_name = "STATE", requires = "restore_mem", alias = "state")]
    pub restore: Option<PathBuf>,
    /// The snapshot's memory file, mapped copy-on-write.
    #[arg(long, value_name = "MEM", requires = "restore", alias = "mem")]
    pub restore_mem: Option<PathBuf>,
    /// Take control requests (pause, resume, snapshot) on this Unix socket, created mode 0600
    /// and removed at exit; only this user and root may connect.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Log which guest pages change, so `bulkhead snapshot create --diff` can write only those
    /// (may be given with --restore).
    #[arg(long)]
    pub track_dirty_pages: bool,
    /// KVM device to open.
    #[arg(long, value_name = "PATH", hide = true)]
    pub kvm_device: Option<PathBuf>,
    /// Misbehave on purpose so tests can prove a defence (debug builds only).
    #[arg(long, value_name = "HOOK", hide = true)]
    pub test_hook: Option<TestHook>,
}

impl RunArgs {
    /// The settings given as flags.
    pub fn raw_config(&self) -> RawConfig {
        RawConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            vcpus: self.vcpus,
            mem_mib: self.mem_mib,
            console: self.console.clone(),
            tenant: self.tenant.clone(),
            vm_id: self.vm_id.clone(),
            seccomp: self.no_seccomp.then_some(false),
            kvm_device: self.kvm_device.clone(),
            disks: (!self.disks.is_empty()).then(|| self.disks.clone()),
            nets: (!self.nets.is_empty()).then(|| self.nets.clone()),
            vsock: self.vsock.clone(),
            shares: (!self.shares.is_empty()).then(|| self.shares.clone()),
            virtiofsd: self.virtiofsd.clone(),
            rng: self.no_rng.then_some(false),
            rng_rate_limiter: self.rng_limit,
            acpi: self.no_acpi.then_some(false),
            cmdline_devices: self.cmdline_devices.then_some(true),
            irqchip: self.irqchip.clone(),
            metrics_file: self.metrics_file.clone(),
            alerts: self.alerts.clone(),
            alerts_http: self.alerts_http.clone(),
            timeout: self.timeout,
            on_violation: self.on_violation.clone(),
            thread_names: None,
            control_fd: None,
            handover_fd: None,
            pinned_files: None,
            vsock_cid_shared: None,
            console_limit: self.console_limit,
            no_follow: self.no_follow.then_some(true),
            restore: self
                .restore
                .clone()
                .zip(self.restore_mem.clone())
                .map(|(state, mem)| bulkhead::config::RawRestore { state, mem }),
            control_socket: self.control_socket.clone(),
            start_paused: None,
            track_dirty_pages: self.track_dirty_pages.then_some(true),
            jail: self.jail.then(|| RawJail {
                dir: self.jail_dir.clone(),
                uid: self.jail_uid,
                gid: self.jail_gid,
                netns: self.jail_netns.clone(),
                ..RawJail::default()
            }),
        }
    }
}

/// Firecracker's flags, with its names and defaults.
#[derive(Debug, Args, Default)]
#[command(disable_version_flag = true)]
pub struct FcArgs {
    /// Path to unix domain socket used by the API [default: /run/firecracker.socket].
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Path to a file that contains the microVM configuration in JSON format; the microVM
    /// starts at once.
    #[arg(long, value_name = "PATH")]
    pub config_file: Option<PathBuf>,
    /// Start without the API socket (needs --config-file).
    #[arg(long)]
    pub no_api: bool,
    /// MicroVM unique identifier.
    #[arg(long, value_name = "ID", default_value = "anonymous-instance")]
    pub id: String,
    /// Set the logger level (Error, Warning, Info, Debug, Trace, Off).
    #[arg(long, value_name = "LEVEL")]
    pub level: Option<String>,
    /// Path to a fifo or a file for the log.
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<PathBuf>,
    /// Path to a fifo or a file for the metrics.
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,
    /// Log the guest's boot time.
    #[arg(long)]
    pub boot_timer: bool,
    /// Run without seccomp filters. For debugging only.
    #[arg(long)]
    pub no_seccomp: bool,
    /// Print the version (Firecracker's, then bulkhead's).
    #[arg(long)]
    pub version: bool,
    /// Accepted for Firecracker's jailer, which always passes them.
    #[arg(long, value_name = "US", hide = true)]
    pub start_time_us: Option<u64>,
    #[arg(long, value_name = "US", hide = true)]
    pub start_time_cpu_us: Option<u64>,
    #[arg(long, value_name = "US", hide = true)]
    pub parent_cpu_time_us: Option<u64>,
    /// Logger options Firecracker has; bulkhead's log always shows the level.
    #[arg(long, hide = true)]
    pub show_level: bool,
    #[arg(long, hide = true)]
    pub show_log_origin: bool,
    #[arg(long, value_name = "MODULE", hide = true)]
    pub module: Option<String>,
}

impl FcArgs {
    pub fn options(&self) -> bulkhead::api::firecracker::Options {
        bulkhead::api::firecracker::Options {
            api_sock: self.api_sock.clone(),
            config_file: self.config_file.clone(),
            no_api: self.no_api,
            id: self.id.clone(),
            level: self.level.clone(),
            log_path: self.log_path.clone(),
            metrics_path: self.metrics_path.clone(),
            boot_timer: self.boot_timer,
            no_seccomp: self.no_seccomp,
        }
    }
}

/// `bulkhead run ...` alone, parsed without building the other subcommands: each VM's
/// supervisor starts this way, and clap's builders for all of them (frames of several pages
/// each) kept it 250 KiB of code and 100 KiB of stack more resident (release binary, idle
/// guest, 2026-12-06). What it accepts is `Cli`'s `run` subcommand (`--log-level` included,
/// as that flag is global there).
#[derive(Debug, Parser)]
#[command(
    name = "run",
    bin_name = "bulkhead run",
    disable_version_flag = true,
    about = "Boot one VM and wait for it to end; exits with the guest's status",
    long_about = None
)]
pub struct RunCli {
    #[command(flatten)]
    pub args: RunArgs,
    /// Log level for messages on stderr.
    // Where `Cli`'s global flag shows in `bulkhead run --help`: after the first option.
    #[arg(long, value_enum, default_value_t = LogLevel::Info, display_order = 0)]
    pub log_level: LogLevel,
}

/// The command line when this binary is invoked as `firecracker`.
#[derive(Debug, Parser)]
#[command(name = "firecracker", disable_version_flag = true)]
pub struct FirecrackerCli {
    #[command(flatten)]
    pub args: FcArgs,
}

/// Firecracker's jailer flags.
#[derive(Debug, Args)]
pub struct JailerArgs {
    /// The microVM's id: letters, digits and '-', at most 64.
    #[arg(long)]
    pub id: String,
    /// The VMM to run in the jail (copied in; its file name names the layout).
    #[arg(long, value_name = "PATH")]
    pub exec_file: PathBuf,
    #[arg(long)]
    pub uid: u32,
    #[arg(long)]
    pub gid: u32,
    /// Where jails are made: BASE/EXEC_NAME/ID/root.
    #[arg(long, value_name = "DIR", default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,
    /// A network namespace to join (e.g. /var/run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// 1 or 2.
    #[arg(long, default_value_t = 1)]
    pub cgroup_version: u8,
    /// A cgroup setting, FILE=VALUE (repeatable).
    #[arg(long = "cgroup", value_name = "FILE=VALUE")]
    pub cgroups: Vec<String>,
    /// The cgroup the VM's goes under [default: the exec file's name].
    #[arg(long, value_name = "PATH")]
    pub parent_cgroup: Option<String>,
    /// fsize=N or no-file=N (repeatable).
    #[arg(long = "resource-limit", value_name = "NAME=N")]
    pub resource_limits: Vec<String>,
    /// Detach: a new session, stdio on /dev/null.
    #[arg(long)]
    pub daemonize: bool,
    /// Run the VMM as the first process of a new pid namespace.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// The VMM's arguments.
    #[arg(last = true)]
    pub args: Vec<String>,
}

impl JailerArgs {
    pub fn options(&self) -> bulkhead::jail::jailer::JailerOptions {
        bulkhead::jail::jailer::JailerOptions {
            id: self.id.clone(),
            exec_file: self.exec_file.clone(),
            uid: self.uid,
            gid: self.gid,
            chroot_base_dir: self.chroot_base_dir.clone(),
            netns: self.netns.clone(),
            cgroup_version: self.cgroup_version,
            cgroups: self.cgroups.clone(),
            parent_cgroup: self.parent_cgroup.clone(),
            resource_limits: self.resource_limits.clone(),
            daemonize: self.daemonize,
            new_pid_ns: self.new_pid_ns,
            args: self.args.clone(),
        }
    }
}

/// The command line when this binary is invoked as `jailer`.
#[derive(Debug, Parser)]
#[command(name = "jailer")]
pub struct JailerCli {
    #[command(flatten)]
    pub args: JailerArgs,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn run_alone_documents_what_the_run_subcommand_does() {
        let mut full = Cli::command();
        full.build();
        let mut sub = full.find_subcommand("run").expect("run subcommand").clone();
        let mut alone = RunCli::command();
        alone.build();
        assert_eq!(
            alone.render_long_help().to_string(),
            sub.render_long_help().to_string()
        );
    }

    #[test]
    fn run_alone_parses_as_the_run_subcommand_does() {
        let args = [
            "run",
            "--kernel",
            "vmlinux",
            "--log-level",
            "warn",
            "--vcpus",
            "2",
            "--disk",
            "a.img,ro",
            "--timeout",
            "5",
            "--cmdline",
            "quiet -- init=/bin/sh",
        ];
        let alone = RunCli::try_parse_from(args).expect("run alone parses");
        let full = Cli::try_parse_from(std::iter::once("bulkhead").chain(args))
            .expect("the full command line parses");
        let Command::Run(sub) = full.command else {
            panic!("not parsed as run")
        };
        assert_eq!(format!("{:?}", alone.args), format!("{sub:?}"));
        assert_eq!(
            format!("{:?}", alone.log_level),
            format!("{:?}", full.log_level)
        );
        // A flag only the full command line knows is refused as the subcommand refuses it.
        assert!(RunCli::try_parse_from(["run", "--version"]).is_err());
        assert!(Cli::try_parse_from(["bulkhead", "run", "--version"]).is_err());
    }
}
