//! Validated VM settings, from command-line flags and a JSON file (flags win).
//!
//! This module never opens files: the caller reads the JSON file and hands over its text, and
//! paths are only checked for shape here; the boot module opens them.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use crate::test_hooks::TestHook;

mod devices;
mod jail;
mod limits;
pub mod serve;
mod supervision;

pub use devices::{format_mac, DiskConfig, NetConfig, RawDisk, RawNet, RawVsock, VsockConfig};
use devices::{validate_disks, validate_nets, validate_vsock};
pub use jail::{JailConfig, RawJail, DEFAULT_JAIL_DIR, MIN_FILE_SIZE_MIB};
pub use limits::{RateLimiterConfig, TokenBucketConfig};
pub use supervision::{AlertsTarget, HttpTarget, RawSupervision, Supervision, MAX_TIMEOUT_SECS};

/// Smallest guest RAM accepted; below this even the test guests' page tables and stacks are
/// cramped, and a Linux guest can not decompress.
pub const MIN_MEM_MIB: u64 = 16;
/// Default guest RAM.
pub const DEFAULT_MEM_MIB: u64 = 128;
/// Default vCPU count.
pub const DEFAULT_VCPUS: u32 = 1;
/// The MP table names CPUs by 8-bit APIC id and 0xff is the broadcast id, so 254 vCPUs is the
/// most this board can describe. KVM's own limit is checked when the VM is built.
pub const MAX_VCPUS: u32 = 254;
/// Linux's COMMAND_LINE_SIZE on x86.
pub const MAX_CMDLINE_LEN: usize = 2048;
/// Longest tenant or VM id.
pub const MAX_ID_LEN: usize = 64;
/// Longest disk id: what virtio-blk's GET_ID can return.
pub const MAX_DISK_ID_LEN: usize = 20;
/// Virtio devices take IRQs 5 to 23, one each.
pub const MAX_VIRTIO_DEVICES: usize = 19;

// The telemetry region has a row for every vCPU and a slot for every device a VM may have.
const _: () = assert!(MAX_VCPUS as usize <= crate::telemetry::MAX_VCPUS);
const _: () = assert!(MAX_VIRTIO_DEVICES <= crate::telemetry::MAX_DEVICES);

/// Errors in user-supplied settings.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid config file: {0}")]
    Json(String),
    #[error("jail {what} 0: a jailed VM never runs as root")]
    JailRoot { what: &'static str },
    #[error("{0}: its name is the vsock socket's followed by _PORT, so the guest could reach it")]
    VsockOverlap(std::path::PathBuf),
    #[error("handover_fd and jail: a VM handed over to another process is not jailed by bulkhead")]
    HandoverJailed,
    #[error("jail path {0} must be absolute")]
    JailDir(std::path::PathBuf),
    #[error("jail {what} {value} is too low: {why}")]
    JailLimit {
        what: &'static str,
        value: u64,
        why: &'static str,
    },
    #[error("no kernel given: pass --kernel PATH or set \"kernel\" in the config file")]
    MissingKernel,
    #[error("--vcpus {0} is out of range: it must be between 1 and {MAX_VCPUS}")]
    VcpuCount(u32),
    #[error("--mem-mib {0} is too small: a VM needs at least {MIN_MEM_MIB} MiB")]
    MemoryTooSmall(u64),
    #[error("--mem-mib {requested} is more than this host's {host} MiB of RAM")]
    MemoryTooLarge { requested: u64, host: u64 },
    #[error("invalid --console {0:?}: expected stdio, none or file:PATH")]
    Console(String),
    #[error("invalid {field} {value:?}: use 1 to {MAX_ID_LEN} characters from A-Z a-z 0-9 . _ -")]
    Id { field: &'static str, value: String },
    #[error("the kernel command line is {0} bytes; the limit is {max} including bulkhead's additions", max = MAX_CMDLINE_LEN - 1)]
    CmdlineTooLong(usize),
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("no random source for a VM id: {0}")]
    Random(String),
    #[error("invalid --disk {0:?}: expected PATH[,ro][,id=NAME][,bw_size=BYTES,bw_refill_time=MS[,bw_one_time_burst=BYTES]][,ops_size=N,ops_refill_time=MS[,ops_one_time_burst=N]]")]
    Disk(String),
    #[error("invalid rate limit for {device}: {why}")]
    RateLimit { device: String, why: String },
    #[error("invalid disk id {0:?}: use 1 to {MAX_DISK_ID_LEN} characters from A-Z a-z 0-9 . _ -")]
    DiskId(String),
    #[error("two disks have the id {0:?}; disk ids must be unique")]
    DuplicateDiskId(String),
    #[error("disk {0} is given twice; a VM can not attach one file as two disks")]
    DuplicateDisk(PathBuf),
    #[error("invalid --net {0:?}: expected tap=NAME[,mac=MAC] and rate limits as rx_bw_size=BYTES,rx_bw_refill_time=MS (also rx_ops_*, tx_bw_*, tx_ops_*, *_one_time_burst)")]
    Net(String),
    #[error("invalid tap name {0:?}: use 1 to 15 characters, no '/', ':' or whitespace")]
    TapName(String),
    #[error("invalid MAC address {0:?}: expected six hex bytes like 06:00:ac:10:00:02, unicast and not all zero")]
    Mac(String),
    #[error("two network devices use {0}; each needs its own")]
    DuplicateNet(String),
    #[error("invalid --vsock {0:?}: expected cid=N,uds=PATH[,buffer_mib=MIB]")]
    Vsock(String),
    #[error("vsock buffer_mib {0} is out of range: use 1 to {max} (each connection reserves 320 KiB)", max = devices::MAX_VSOCK_BUFFER_MIB)]
    VsockBuffer(u64),
    #[error("vsock CID {0} is out of range: use 3 to 4294967294 (0-2 are reserved)")]
    VsockCid(u64),
    #[error("{0} virtio devices requested; at most {MAX_VIRTIO_DEVICES} fit (one IRQ each)")]
    TooManyDevices(usize),
    #[error("invalid --alerts {0:?}: expected a file path, or - for standard error")]
    Alerts(String),
    #[error("invalid --alerts-http {0:?}: expected http://HOST[:PORT][/PATH] (https is not supported; point it at a local falcosidekick)")]
    AlertsHttp(String),
    #[error("--timeout {0} is out of range: use 1 to {MAX_TIMEOUT_SECS} seconds")]
    Timeout(u64),
    #[error("--metrics-file needs a path")]
    MetricsFile,
    #[error("{0}")]
    OnViolation(String),
    #[error("invalid --irqchip {0:?}: expected split or full")]
    IrqChip(String),
}

/// How the VM's interrupt controllers are split between KVM and bulkhead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqChip {
    /// Local APICs in KVM; the IOAPIC in bulkhead; no PIC, no PIT. What a hardware-reduced
    /// ACPI guest needs, and the VM tears down in well under a millisecond.
    Split,
    /// KVM's PIC, IOAPIC, local APICs and PIT, for guests without ACPI (their timer check
    /// needs the PIT). Tearing these down costs the kernel 5 to 20 ms.
    Full,
}

impl std::str::FromStr for IrqChip {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<IrqChip, ConfigError> {
        match s {
            "split" => Ok(IrqChip::Split),
            "full" => Ok(IrqChip::Full),
            _ => Err(ConfigError::IrqChip(s.to_string())),
        }
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ConsoleConfig {
    /// The VMM's stdin and stdout.
    #[default]
    Stdio,
    /// Appended to a file (guest output only).
    File(PathBuf),
    /// Discarded; the port still works so the guest does not notice.
    None,
}

impl std::str::FromStr for ConsoleConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(ConsoleConfig::Stdio),
            "none" => Ok(ConsoleConfig::None),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(ConsoleConfig::File(PathBuf::from(path))),
                _ => Err(ConfigError::Console(s.to_string())),
            },
        }
    }
}

impl fmt::Display for ConsoleConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleConfig::Stdio => write!(f, "stdio"),
            ConsoleConfig::None => write!(f, "none"),
            ConsoleConfig::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// How the VM process names its vCPU threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ThreadNames {
    /// `vcpuN`.
    Bulkhead,
    /// `fc_vcpu N`, as Firecracker names them, for the orchestrators that look for them.
    Firecracker,
}

/// Settings as given, before validation. Both the JSON file and the flags produce one; the
/// flags' one is laid over the file's.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub vcpus: Option<u32>,
    pub mem_mib: Option<u64>,
    pub console: Option<String>,
    pub tenant: Option<String>,
    pub vm_id: Option<String>,
    /// `false` disables the seccomp filters (debugging only).
    pub seccomp: Option<bool>,
    /// Path of the KVM device; `/dev/kvm` unless given.
    pub kvm_device: Option<PathBuf>,
    /// Block devices, in the order the guest sees them.
    pub disks: Option<Vec<RawDisk>>,
    /// Network devices, in the order the guest sees them.
    pub nets: Option<Vec<RawNet>>,
    /// The vsock device.
    pub vsock: Option<RawVsock>,
    /// `false` leaves out the virtio-rng device.
    pub rng: Option<bool>,
    /// Limits on what the guest may draw from virtio-rng (Firecracker's entropy limiter).
    pub rng_rate_limiter: Option<RateLimiterConfig>,
    /// `false` leaves out the ACPI tables (the guest then finds vCPUs through the MP table
    /// and devices on the command line).
    pub acpi: Option<bool>,
    /// `true` also announces the virtio devices on the kernel command line, for kernels
    /// built with `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` but without ACPI.
    pub cmdline_devices: Option<bool>,
    /// `split` or `full` (see [`IrqChip`]); by default split with ACPI, full without.
    pub irqchip: Option<String>,
    /// Prometheus text file the supervisor keeps up to date.
    pub metrics_file: Option<PathBuf>,
    /// Where alerts go: a file, or `-` for standard error.
    pub alerts: Option<String>,
    /// A falcosidekick-compatible endpoint each alert is also POSTed to.
    pub alerts_http: Option<String>,
    /// Seconds the VM may run.
    pub timeout: Option<u64>,
    /// `log`, `reset-device` or `stop-vm`.
    pub on_violation: Option<String>,
    /// Run the VM process in a jail (namespaces, its own root, a cgroup, no root).
    pub jail: Option<RawJail>,
    /// `firecracker` names the vCPU threads as Firecracker does (`fc_vcpu N`), for the
    /// orchestrators that look for them; `bulkhead` (the default) names them `vcpuN`.
    pub thread_names: Option<ThreadNames>,
    /// An inherited descriptor: the front end's control channel (set by the Firecracker
    /// personality for the `bulkhead run` it starts).
    pub control_fd: Option<i32>,
    /// An inherited descriptor: the socket to the process the VM is handed over to instead of
    /// a forked VM process (the Firecracker personality's own process; see
    /// `bulkhead::handover`).
    pub handover_fd: Option<i32>,
    /// `true`: the vsock CID need not be unique on the host (Firecracker's semantics).
    pub vsock_cid_shared: Option<bool>,
    /// Bytes the guest may write to the console; the rest is dropped and counted.
    pub console_limit: Option<u64>,
    /// `true`: a kernel, initrd or disk that is itself a symlink is refused.
    pub no_follow: Option<bool>,
    /// Files that must still be the ones checked earlier (the daemon's checks as the tenant):
    /// a jail refuses a path that now names another file.
    pub pinned_files: Option<Vec<PinnedFile>>,
}

/// A file by path and identity: its device and inode (for a block device, the device it names
/// and 0).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedFile {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
}

impl RawConfig {
    /// Parses the text of a JSON config file. Unknown fields are errors.
    pub fn from_json(text: &str) -> Result<RawConfig, ConfigError> {
        serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))
    }

    /// The settings as a JSON config file holds them: what a front end writes for the
    /// `bulkhead run` it starts (the process boundary), and [`RawConfig::from_json`] reads.
    pub fn to_json(&self) -> String {
        // Every field is a plain value, a path or a list of them: serialising can not fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Lays `over` on top of `self`: every field set in `over` wins.
    pub fn overlay(self, over: RawConfig) -> RawConfig {
        RawConfig {
            kernel: over.kernel.or(self.kernel),
            initrd: over.initrd.or(self.initrd),
            cmdline: over.cmdline.or(self.cmdline),
            vcpus: over.vcpus.or(self.vcpus),
            mem_mib: over.mem_mib.or(self.mem_mib),
            console: over.console.or(self.console),
            tenant: over.tenant.or(self.tenant),
            vm_id: over.vm_id.or(self.vm_id),
            seccomp: over.seccomp.or(self.seccomp),
            kvm_device: over.kvm_device.or(self.kvm_device),
            disks: over.disks.or(self.disks),
            nets: over.nets.or(self.nets),
            vsock: over.vsock.or(self.vsock),
            rng: over.rng.or(self.rng),
            rng_rate_limiter: over.rng_rate_limiter.or(self.rng_rate_limiter),
            acpi: over.acpi.or(self.acpi),
            cmdline_devices: over.cmdline_devices.or(self.cmdline_devices),
            irqchip: over.irqchip.or(self.irqchip),
            metrics_file: over.metrics_file.or(self.metrics_file),
            alerts: over.alerts.or(self.alerts),
            alerts_http: over.alerts_http.or(self.alerts_http),
            timeout: over.timeout.or(self.timeout),
            on_violation: over.on_violation.or(self.on_violation),
            thread_names: over.thread_names.or(self.thread_names),
            control_fd: over.control_fd.or(self.control_fd),
            handover_fd: over.handover_fd.or(self.handover_fd),
            vsock_cid_shared: over.vsock_cid_shared.or(self.vsock_cid_shared),
            console_limit: over.console_limit.or(self.console_limit),
            no_follow: over.no_follow.or(self.no_follow),
            pinned_files: over.pinned_files.or(self.pinned_files),
            jail: match (self.jail, over.jail) {
                (Some(base), Some(over)) => Some(base.overlay(over)),
                (base, over) => over.or(base),
            },
        }
    }
}

/// True when the kernel's part of `cmdline` (before any `--`) holds `acpi=off`.
fn kernel_turns_acpi_off(cmdline: &str) -> bool {
    cmdline
        .split_whitespace()
        .take_while(|w| *w != "--")
        .any(|w| w == "acpi=off")
}

/// Validated settings for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The user's part of the kernel command line; bulkhead adds its own in front.
    pub cmdline: String,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub console: ConsoleConfig,
    pub tenant: String,
    pub vm_id: String,
    pub seccomp: bool,
    pub kvm_device: PathBuf,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub vsock: Option<VsockConfig>,
    pub rng: bool,
    pub rng_rate_limiter: Option<RateLimiterConfig>,
    /// ACPI tables in guest memory.
    pub acpi: bool,
    /// `virtio_mmio.device=` entries on the command line: when asked, when ACPI is off, or
    /// when the command line turns it off (`acpi=off`).
    pub cmdline_devices: bool,
    pub irqchip: IrqChip,
    pub supervision: Supervision,
    /// The jail the VM process enters, if any.
    pub jail: Option<JailConfig>,
    /// vCPU threads named `fc_vcpu N`.
    pub firecracker_names: bool,
    /// The inherited control channel's descriptor.
    pub control_fd: Option<i32>,
    /// The inherited hand-over socket's descriptor: the VM runs in the process at its other
    /// end, not in a fork of the supervisor.
    pub handover_fd: Option<i32>,
    /// The vsock CID need not be unique on the host.
    pub vsock_cid_shared: bool,
    /// Console bytes the guest may write, if limited.
    pub console_limit: Option<u64>,
    /// Kernel, initrd and disks are opened with O_NOFOLLOW.
    pub no_follow: bool,
    /// Files a jail must find unchanged (see [`PinnedFile`]).
    pub pinned_files: Vec<PinnedFile>,
    pub test_hook: Option<TestHook>,
}

impl VmConfig {
    /// Validates `raw` against this host (`host_mem_mib` is its RAM).
    pub fn from_raw(raw: RawConfig, host_mem_mib: u64) -> Result<VmConfig, ConfigError> {
        let kernel = raw.kernel.ok_or(ConfigError::MissingKernel)?;
        let vcpus = raw.vcpus.unwrap_or(DEFAULT_VCPUS);
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(vcpus));
        }
        let mem_mib = raw.mem_mib.unwrap_or(DEFAULT_MEM_MIB);
        if mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::MemoryTooSmall(mem_mib));
        }
        if mem_mib > host_mem_mib {
            return Err(ConfigError::MemoryTooLarge {
                requested: mem_mib,
                host: host_mem_mib,
            });
        }
        let console = match raw.console {
            Some(c) => c.parse()?,
            None => ConsoleConfig::default(),
        };
        let cmdline = raw.cmdline.unwrap_or_default();
        if cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        // bulkhead's own additions are checked again when the full line is built.
        if cmdline.len() >= MAX_CMDLINE_LEN {
            return Err(ConfigError::CmdlineTooLong(cmdline.len()));
        }
        let tenant = raw.tenant.unwrap_or_else(|| "default".to_string());
        validate_id("--tenant", &tenant)?;
        let vm_id = match raw.vm_id {
            Some(id) => id,
            None => random_vm_id()?,
        };
        validate_id("--vm-id", &vm_id)?;
        let disks = validate_disks(raw.disks.unwrap_or_default())?;
        let nets = validate_nets(raw.nets.unwrap_or_default(), &vm_id)?;
        let vsock = validate_vsock(raw.vsock)?;
        let rng = raw.rng.unwrap_or(true);
        let rng_rate_limiter = RateLimiterConfig::validate(raw.rng_rate_limiter, "virtio-rng")?;
        let acpi = raw.acpi.unwrap_or(true);
        let acpi_off = !acpi || kernel_turns_acpi_off(&cmdline);
        let cmdline_devices = raw.cmdline_devices.unwrap_or(false) || acpi_off;
        let irqchip = match raw.irqchip {
            Some(chip) => chip.parse()?,
            None if acpi_off => IrqChip::Full,
            None => IrqChip::Split,
        };
        let supervision = RawSupervision {
            metrics_file: raw.metrics_file,
            alerts: raw.alerts,
            alerts_http: raw.alerts_http,
            timeout: raw.timeout,
            on_violation: raw.on_violation,
        }
        .validate()?;
        // Guest connections to host port P go to `UDS_P`: no other file this VM names may sit
        // in that namespace, or a guest could reach it by choosing a port.
        if let Some(v) = &vsock {
            let prefix = format!("{}_", v.uds.display());
            let mut named: Vec<&std::path::Path> = vec![kernel.as_path()];
            named.extend(raw.initrd.as_deref());
            named.extend(disks.iter().map(|d| d.path.as_path()));
            named.extend(supervision.metrics_file.as_deref());
            if let ConsoleConfig::File(p) = &console {
                named.push(p);
            }
            if let Some(AlertsTarget::File(p)) = &supervision.alerts {
                named.push(p);
            }
            for p in named {
                let text = p.display().to_string();
                let port = text.strip_prefix(&prefix);
                if port.is_some_and(|port| {
                    !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())
                }) {
                    return Err(ConfigError::VsockOverlap(p.to_path_buf()));
                }
            }
        }
        // A console file is capped unless told otherwise: a guest looping on the UART must not
        // fill the host's disk.
        let console_limit = raw.console_limit.or(match console {
            ConsoleConfig::File(_) => Some(DEFAULT_CONSOLE_FILE_LIMIT),
            _ => None,
        });
        let jail = raw.jail.map(|j| j.validate(vcpus, mem_mib)).transpose()?;
        // The process the VM is handed over to is already running, outside any jail this
        // supervisor could build around a fork.
        if jail.is_some() && raw.handover_fd.is_some() {
            return Err(ConfigError::HandoverJailed);
        }
        // A jail follows no symlink anywhere in these paths; outside one, when asked.
        let no_follow = raw.no_follow.unwrap_or(false) || jail.is_some();
        let firecracker_names = raw.thread_names == Some(ThreadNames::Firecracker);
        let devices = disks.len() + nets.len() + usize::from(vsock.is_some()) + usize::from(rng);
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        Ok(VmConfig {
            kernel,
            initrd: raw.initrd,
            cmdline,
            vcpus,
            mem_mib,
            console,
            tenant,
            vm_id,
            seccomp: raw.seccomp.unwrap_or(true),
            kvm_device: raw.kvm_device.unwrap_or_else(|| PathBuf::from("/dev/kvm")),
            disks,
            nets,
            vsock,
            rng,
            rng_rate_limiter,
            acpi,
            cmdline_devices,
            irqchip,
            supervision,
            jail,
            firecracker_names,
            control_fd: raw.control_fd.filter(|fd| *fd > 2),
            handover_fd: raw.handover_fd.filter(|fd| *fd > 2),
            vsock_cid_shared: raw.vsock_cid_shared.unwrap_or(false),
            console_limit,
            no_follow,
            pinned_files: raw.pinned_files.unwrap_or_default(),
            test_hook: None,
        })
    }

    /// Guest RAM in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }

    /// The virtio devices' names, in the order the guest finds them (and their telemetry slots
    /// are numbered): disks, network devices, vsock, rng.
    pub fn device_names(&self) -> Vec<String> {
        let disks = (0..self.disks.len()).map(|i| format!("virtio-blk{i}"));
        let nets = (0..self.nets.len()).map(|i| format!("virtio-net{i}"));
        let vsock = self.vsock.iter().map(|_| "virtio-vsock0".to_string());
        let rng = self.rng.then(|| "virtio-rng0".to_string());
        disks.chain(nets).chain(vsock).chain(rng).collect()
    }
}

/// Whether `id` may be a disk's id (what virtio-blk's GET_ID returns): the one rule, which the
/// Firecracker personality also asks before it passes a drive id on.
pub fn is_disk_id(id: &str) -> bool {
    id_chars_ok(id, MAX_DISK_ID_LEN)
}

fn id_chars_ok(value: &str, max: usize) -> bool {
    !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn validate_id(field: &'static str, value: &str) -> Result<(), ConfigError> {
    if id_chars_ok(value, MAX_ID_LEN) {
        Ok(())
    } else {
        Err(ConfigError::Id {
            field,
            value: value.to_string(),
        })
    }
}

/// The console file's default limit: 64 MiB.
pub const DEFAULT_CONSOLE_FILE_LIMIT: u64 = 64 << 20;

/// A 128-bit random id in hex, from getrandom(2) (no file is opened).
///
/// An id needs to be unique, not secret, so this never waits for the entropy pool: a freshly
/// booted host (or the nested lane's L1) may not have one for seconds. GRND_INSECURE asks for
/// bytes from the not-yet-seeded generator instead of blocking.
pub fn random_vm_id() -> Result<String, ConfigError> {
    const GRND_INSECURE: libc::c_uint = 0x0004;
    let mut bytes = [0u8; 16];
    // SAFETY: the buffer is valid for writes of its full length, and getrandom writes at most
    // that many bytes.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), GRND_INSECURE) };
    if usize::try_from(n).ok() != Some(bytes.len()) {
        return Err(ConfigError::Random(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// This host's RAM in MiB, from sysinfo(2).
pub fn host_mem_mib() -> u64 {
    // SAFETY: sysinfo only writes into the struct we pass, which is zero-initialised POD.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct.
    let rc = unsafe { libc::sysinfo(&mut info) };
    if rc != 0 {
        return u64::MAX;
    }
    (info.totalram as u64).saturating_mul(u64::from(info.mem_unit)) >> 20
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_with_kernel() -> RawConfig {
        RawConfig {
            kernel: Some("k".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_one_vcpu_128_mib_stdio_and_random_id() {
        let a = VmConfig::from_raw(raw_with_kernel(), 1 << 20).unwrap();
        let b = VmConfig::from_raw(raw_with_kernel(), 1 << 20).unwrap();
        assert_eq!(a.vcpus, 1);
        assert_eq!(a.mem_mib, 128);
        assert_eq!(a.console, ConsoleConfig::Stdio);
        assert_eq!(a.vm_id.len(), 32);
        assert_ne!(a.vm_id, b.vm_id);
        assert!(a.seccomp);
    }

    #[test]
    fn devices_go_on_the_command_line_only_when_asked_or_without_acpi() {
        let with = |f: fn(&mut RawConfig)| {
            let mut raw = raw_with_kernel();
            f(&mut raw);
            let c = VmConfig::from_raw(raw, 1 << 20).unwrap();
            (c.acpi, c.cmdline_devices)
        };
        assert_eq!(with(|_| {}), (true, false));
        assert_eq!(with(|r| r.acpi = Some(false)), (false, true));
        assert_eq!(with(|r| r.cmdline_devices = Some(true)), (true, true));
        assert_eq!(
            with(|r| r.cmdline = Some("console=ttyS0 acpi=off".into())),
            (true, true)
        );
        // After `--` the words are init's, not the kernel's.
        assert_eq!(
            with(|r| r.cmdline = Some("quiet -- acpi=off".into())),
            (true, false)
        );
        let file = RawConfig::from_json(r#"{"kernel":"k","acpi":false}"#).unwrap();
        assert!(!VmConfig::from_raw(file, 1 << 20).unwrap().acpi);
    }

    #[test]
    fn the_irqchip_is_split_for_acpi_guests_and_full_for_the_rest_unless_asked() {
        let with = |f: fn(&mut RawConfig)| {
            let mut raw = raw_with_kernel();
            f(&mut raw);
            VmConfig::from_raw(raw, 1 << 20).map(|c| c.irqchip)
        };
        assert_eq!(with(|_| {}).unwrap(), IrqChip::Split);
        assert_eq!(with(|r| r.acpi = Some(false)).unwrap(), IrqChip::Full);
        assert_eq!(
            with(|r| r.cmdline = Some("acpi=off".into())).unwrap(),
            IrqChip::Full
        );
        assert_eq!(
            with(|r| r.irqchip = Some("full".into())).unwrap(),
            IrqChip::Full
        );
        assert_eq!(
            with(|r| {
                r.acpi = Some(false);
                r.irqchip = Some("split".into());
            })
            .unwrap(),
            IrqChip::Split
        );
        assert!(matches!(
            with(|r| r.irqchip = Some("kernel".into())),
            Err(ConfigError::IrqChip(s)) if s == "kernel"
        ));
    }

    #[test]
    fn flags_override_file_fields_they_set_and_keep_the_rest() {
        let file = RawConfig::from_json(r#"{"kernel":"a","vcpus":2,"mem_mib":64}"#).unwrap();
        let flags = RawConfig {
            vcpus: Some(4),
            ..Default::default()
        };
        let merged = file.overlay(flags);
        assert_eq!(merged.kernel, Some(PathBuf::from("a")));
        assert_eq!(merged.vcpus, Some(4));
        assert_eq!(merged.mem_mib, Some(64));
    }

    #[test]
    fn unknown_json_field_is_refused() {
        let err = RawConfig::from_json(r#"{"kernel":"a","vcpu":2}"#).unwrap_err();
        assert!(matches!(err, ConfigError::Json(m) if m.contains("unknown field `vcpu`")));
    }

    #[test]
    fn out_of_range_vcpus_and_memory_are_refused() {
        let mut raw = raw_with_kernel();
        raw.vcpus = Some(0);
        assert_eq!(
            VmConfig::from_raw(raw.clone(), 1024),
            Err(ConfigError::VcpuCount(0))
        );
        raw.vcpus = Some(255);
        assert_eq!(
            VmConfig::from_raw(raw.clone(), 1024),
            Err(ConfigError::VcpuCount(255))
        );
        raw.vcpus = None;
        raw.mem_mib = Some(15);
        assert_eq!(
            VmConfig::from_raw(raw.clone(), 1024),
            Err(ConfigError::MemoryTooSmall(15))
        );
        raw.mem_mib = Some(2048);
        assert_eq!(
            VmConfig::from_raw(raw, 1024),
            Err(ConfigError::MemoryTooLarge {
                requested: 2048,
                host: 1024
            })
        );
    }

    #[test]
    fn console_accepts_the_three_forms_only() {
        assert_eq!("stdio".parse(), Ok(ConsoleConfig::Stdio));
        assert_eq!("none".parse(), Ok(ConsoleConfig::None));
        assert_eq!(
            "file:/tmp/x".parse(),
            Ok(ConsoleConfig::File("/tmp/x".into()))
        );
        assert!("file:".parse::<ConsoleConfig>().is_err());
        assert!("tcp:1".parse::<ConsoleConfig>().is_err());
    }

    #[test]
    fn ids_with_path_or_shell_characters_are_refused() {
        for bad in ["", "a/b", "a b", "..;rm", &"x".repeat(65)] {
            let mut raw = raw_with_kernel();
            raw.tenant = Some(bad.to_string());
            assert!(VmConfig::from_raw(raw, 1024).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn command_line_with_nul_or_too_long_is_refused() {
        let mut raw = raw_with_kernel();
        raw.cmdline = Some("a\0b".into());
        assert_eq!(
            VmConfig::from_raw(raw.clone(), 1024),
            Err(ConfigError::CmdlineNul)
        );
        raw.cmdline = Some("a".repeat(MAX_CMDLINE_LEN));
        assert!(matches!(
            VmConfig::from_raw(raw, 1024),
            Err(ConfigError::CmdlineTooLong(_))
        ));
    }
}
