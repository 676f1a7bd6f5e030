//! Validated settings, as the code uses them: [`VmConfig`] in its three parts. Only
//! [`VmConfig::from_raw`](super::VmConfig::from_raw) makes one.

use std::fmt;
use std::path::PathBuf;

use super::{
    ConfigError, DiskConfig, JailConfig, NetConfig, PinnedFile, RateLimiterConfig, ShareConfig,
    Supervision, VsockConfig,
};
use crate::test_hooks::TestHook;

/// Validated settings for one VM, in three parts: what the guest gets ([`VmSpec`]), how the
/// processes that run it are supervised and confined ([`ProcessSpec`]), and what other VMMs'
/// users expect that bulkhead would not do by itself ([`Quirks`]). The settings file keeps one
/// flat layout ([`RawConfig`]); the split is the code's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub vm: VmSpec,
    pub process: ProcessSpec,
    pub quirks: Quirks,
    /// A debugging hook (debug builds only; see [`crate::test_hooks`]).
    pub test_hook: Option<TestHook>,
}

/// The machine, its boot and its devices: all the builder needs to make the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The user's part of the kernel command line; bulkhead adds its own in front.
    pub cmdline: String,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub console: ConsoleConfig,
    /// Console bytes the guest may write, if limited.
    pub console_limit: Option<u64>,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub vsock: Option<VsockConfig>,
    pub rng: bool,
    pub rng_rate_limiter: Option<RateLimiterConfig>,
    /// Host directories shared over virtio-fs. Guest RAM is then a shared memfd, which each
    /// share's virtiofsd maps; without shares it is private anonymous memory.
    pub shares: Vec<ShareConfig>,
    /// ACPI tables in guest memory.
    pub acpi: bool,
    /// `virtio_mmio.device=` entries on the command line: when asked, when ACPI is off, or
    /// when the command line turns it off (`acpi=off`).
    pub cmdline_devices: bool,
    pub irqchip: IrqChip,
    /// Start from this snapshot instead of booting the kernel.
    pub restore: Option<RestoreSpec>,
    /// Log the pages that change, for diff snapshots.
    pub track_dirty_pages: bool,
    /// The machine settings as given ([`crate::RawConfig::machine`], as JSON): what a
    /// snapshot of this VM keeps.
    pub machine: String,
}

/// A snapshot to start from: its state file and memory file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreSpec {
    pub state: PathBuf,
    pub mem: PathBuf,
}

/// Who the VM is, and how its processes are supervised, confined and controlled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    pub tenant: String,
    pub vm_id: String,
    pub seccomp: bool,
    pub kvm_device: PathBuf,
    pub supervision: Supervision,
    /// The jail the VM process enters, if any.
    pub jail: Option<JailConfig>,
    /// The inherited control channel's descriptor.
    pub control_fd: Option<i32>,
    /// A Unix socket the supervisor creates for control requests (`--control-socket`).
    pub control_socket: Option<PathBuf>,
    /// The vCPUs wait, paused, until a control request resumes them.
    pub start_paused: bool,
    /// The inherited hand-over socket's descriptor: the VM runs in the process at its other
    /// end, not in a fork of the supervisor.
    pub handover_fd: Option<i32>,
    /// Kernel, initrd and disks are opened with O_NOFOLLOW.
    pub no_follow: bool,
    /// Files a jail must find unchanged (see [`PinnedFile`]).
    pub pinned_files: Vec<PinnedFile>,
    /// The virtiofsd program the shares' backends run, if not the one found by default.
    pub virtiofsd: Option<PathBuf>,
}

/// Compatibility with what Firecracker's users expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quirks {
    /// vCPU threads named `fc_vcpu N`, where Kata looks for them.
    pub firecracker_names: bool,
    /// The vsock CID need not be unique on the host (Kata gives every pod CID 3).
    pub vsock_cid_shared: bool,
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

impl VmSpec {
    /// Guest RAM in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }

    /// The virtio devices' names, in the order the guest finds them (and their telemetry slots
    /// are numbered): disks, network devices, vsock, rng, shares.
    pub fn device_names(&self) -> Vec<String> {
        let disks = (0..self.disks.len()).map(|i| format!("virtio-blk{i}"));
        let nets = (0..self.nets.len()).map(|i| format!("virtio-net{i}"));
        let vsock = self.vsock.iter().map(|_| "virtio-vsock0".to_string());
        let rng = self.rng.then(|| "virtio-rng0".to_string());
        let shares = (0..self.shares.len()).map(|i| format!("virtio-fs{i}"));
        disks
            .chain(nets)
            .chain(vsock)
            .chain(rng)
            .chain(shares)
            .collect()
    }
}
