//! Settings as given, before validation: the JSON settings file's one flat layout, which the
//! command line's flags fill too, and which a front end writes for the `bulkhead run` it starts.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, RateLimiterConfig, RawDisk, RawJail, RawNet, RawShare, RawVsock};

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
    /// Host directories shared over virtio-fs, each served by a virtiofsd the supervisor
    /// starts.
    pub shares: Option<Vec<RawShare>>,
    /// The virtiofsd program; by default `virtiofsd` on PATH, then /usr/libexec/virtiofsd.
    pub virtiofsd: Option<PathBuf>,
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
    /// Start from a snapshot instead of booting: its state file and memory file. The machine
    /// settings come from the snapshot and may not be given again.
    pub restore: Option<RawRestore>,
    /// A Unix socket (created, mode 0600) on which the running VM takes control requests:
    /// pause, resume, snapshot (`bulkhead snapshot create`).
    pub control_socket: Option<PathBuf>,
    /// `true`: the vCPUs start paused and run once a control request resumes them (a
    /// Firecracker snapshot load without `resume_vm`).
    pub start_paused: Option<bool>,
    /// `true`: log which guest pages change (KVM's dirty log and the VMM's own writes), so a
    /// diff snapshot can write only those. Not a machine setting: a restore may give it.
    pub track_dirty_pages: Option<bool>,
    /// Files that must still be the ones checked earlier (the daemon's checks as the tenant):
    /// a jail refuses a path that now names another file.
    pub pinned_files: Option<Vec<PinnedFile>>,
}

/// A snapshot to start from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRestore {
    pub state: PathBuf,
    pub mem: PathBuf,
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
        serde_json::from_str(text).map_err(|e| ConfigError::Json(crate::Cause::new(e)))
    }

    /// The settings as a JSON config file holds them: what a front end writes for the
    /// `bulkhead run` it starts (the process boundary), and [`RawConfig::from_json`] reads.
    pub fn to_json(&self) -> String {
        // Every field is a plain value, a path or a list of them: serialising can not fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The machine part: what the VM is made of (boot, size, devices), without who runs it,
    /// where its outputs go or how it is supervised. A snapshot keeps it and a restore starts
    /// from it.
    pub fn machine(&self) -> RawConfig {
        RawConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            vcpus: self.vcpus,
            mem_mib: self.mem_mib,
            disks: self.disks.clone(),
            nets: self.nets.clone(),
            vsock: self.vsock.clone(),
            shares: self.shares.clone(),
            rng: self.rng,
            rng_rate_limiter: self.rng_rate_limiter,
            acpi: self.acpi,
            cmdline_devices: self.cmdline_devices,
            irqchip: self.irqchip.clone(),
            ..RawConfig::default()
        }
    }

    /// The machine settings given in `self` (by name), which a restore may not give again.
    pub fn machine_fields_given(&self) -> Vec<&'static str> {
        let m = self.machine();
        [
            ("kernel", m.kernel.is_some()),
            ("initrd", m.initrd.is_some()),
            ("cmdline", m.cmdline.is_some()),
            ("vcpus", m.vcpus.is_some()),
            ("mem_mib", m.mem_mib.is_some()),
            ("disks", m.disks.is_some()),
            ("nets", m.nets.is_some()),
            ("vsock", m.vsock.is_some()),
            ("shares", m.shares.is_some()),
            ("rng", m.rng.is_some()),
            ("rng_rate_limiter", m.rng_rate_limiter.is_some()),
            ("acpi", m.acpi.is_some()),
            ("cmdline_devices", m.cmdline_devices.is_some()),
            ("irqchip", m.irqchip.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect()
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
            shares: over.shares.or(self.shares),
            virtiofsd: over.virtiofsd.or(self.virtiofsd),
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
            restore: over.restore.or(self.restore),
            control_socket: over.control_socket.or(self.control_socket),
            start_paused: over.start_paused.or(self.start_paused),
            track_dirty_pages: over.track_dirty_pages.or(self.track_dirty_pages),
            jail: match (self.jail, over.jail) {
                (Some(base), Some(over)) => Some(base.overlay(over)),
                (base, over) => over.or(base),
            },
        }
    }
}
