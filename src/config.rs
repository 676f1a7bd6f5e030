//! Validated VM settings, from command-line flags and a JSON file (flags win).
//!
//! This module never opens files: the caller reads the JSON file and hands over its text, and
//! paths are only checked for shape here; the boot module opens them.

use std::path::PathBuf;

mod devices;
mod jail;
mod limits;
mod raw;
pub mod serve;
mod shares;
mod spec;
mod supervision;

pub use devices::{format_mac, DiskConfig, NetConfig, RawDisk, RawNet, RawVsock, VsockConfig};
use devices::{validate_disks, validate_nets, validate_vsock};
pub use jail::{JailConfig, RawJail, DEFAULT_JAIL_DIR, MIN_FILE_SIZE_MIB};
pub use limits::{RateLimiterConfig, TokenBucketConfig};
pub use raw::{PinnedFile, RawConfig, RawRestore, ThreadNames};
use shares::validate_shares;
pub use shares::{is_share_tag, RawShare, ShareConfig, MAX_TAG_LEN};
pub use spec::{ConsoleConfig, IrqChip, ProcessSpec, Quirks, RestoreSpec, VmConfig, VmSpec};
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
    Json(#[source] crate::Cause<serde_json::Error>),
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
    Random(#[source] crate::Cause<std::io::Error>),
    #[error("invalid --disk {0:?}: expected PATH[,ro][,id=NAME][,bw_size=BYTES,bw_refill_time=MS[,bw_one_time_burst=BYTES]][,ops_size=N,ops_refill_time=MS[,ops_one_time_burst=N]]")]
    Disk(String),
    #[error("invalid --share {0:?}: expected DIR:TAG[,ro|,rw]")]
    Share(String),
    #[error("invalid share tag {0:?}: use 1 to {MAX_TAG_LEN} characters from A-Z a-z 0-9 . _ -")]
    ShareTag(String),
    #[error("two shares have the tag {0:?}; the guest tells shares apart by tag")]
    DuplicateShareTag(String),
    #[error("handover_fd and shares: a VM handed over to another process can not have a virtio-fs share")]
    HandoverShares,
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
    #[error(transparent)]
    OnViolation(#[from] crate::telemetry::policy::UnknownPolicy),
    #[error("invalid --irqchip {0:?}: expected split or full")]
    IrqChip(String),
    #[error("a VM with shares can not be restored from a snapshot: a share's backend keeps state no snapshot has")]
    RestoreShares,
    #[error("\"start_paused\" needs a control channel or --control-socket: nothing else could resume the VM")]
    StartPausedUncontrolled,
    #[error("--track-dirty-pages can not be given with shares: virtiofsd writes guest RAM where no dirty log sees it")]
    TrackDirtyShares,
}

/// True when the kernel's part of `cmdline` (before any `--`) holds `acpi=off`.
fn kernel_turns_acpi_off(cmdline: &str) -> bool {
    cmdline
        .split_whitespace()
        .take_while(|w| *w != "--")
        .any(|w| w == "acpi=off")
}

impl VmConfig {
    /// Validates `raw` against this host (`host_mem_mib` is its RAM).
    pub fn from_raw(raw: RawConfig, host_mem_mib: u64) -> Result<VmConfig, ConfigError> {
        let mut machine = raw.machine();
        let restore = raw.restore.clone().map(|r| RestoreSpec {
            state: r.state,
            mem: r.mem,
        });
        if restore.is_some() {
            // A share's backend holds state of its own that no snapshot has.
            if raw.shares.as_ref().is_some_and(|s| !s.is_empty()) {
                return Err(ConfigError::RestoreShares);
            }
        }
        let track_dirty_pages = raw.track_dirty_pages.unwrap_or(false);
        // virtiofsd writes guest RAM where no log sees it (and a VM with shares can not be
        // snapshotted anyway).
        if track_dirty_pages && raw.shares.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ConfigError::TrackDirtyShares);
        }
        // Only a control request can let a VM that starts paused run.
        if raw.start_paused == Some(true)
            && raw.control_fd.is_none()
            && raw.control_socket.is_none()
        {
            return Err(ConfigError::StartPausedUncontrolled);
        }
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
        // A MAC not given is made from the VM id, which a clone does not share: the snapshot
        // keeps the one the guest has, or a clone would refuse its own frames as spoofed.
        for (saved, net) in machine.nets.iter_mut().flatten().zip(&nets) {
            saved.mac = Some(devices::format_mac(&net.mac));
        }
        let vsock = validate_vsock(raw.vsock)?;
        let shares = validate_shares(raw.shares.unwrap_or_default())?;
        // The share's backend connection is handed to a forked VM process only.
        if !shares.is_empty() && raw.handover_fd.is_some() {
            return Err(ConfigError::HandoverShares);
        }
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
        let devices = disks.len()
            + nets.len()
            + usize::from(vsock.is_some())
            + usize::from(rng)
            + shares.len();
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        Ok(VmConfig {
            vm: VmSpec {
                kernel,
                initrd: raw.initrd,
                cmdline,
                vcpus,
                mem_mib,
                console,
                console_limit,
                disks,
                nets,
                vsock,
                rng,
                rng_rate_limiter,
                shares,
                acpi,
                cmdline_devices,
                irqchip,
                restore,
                track_dirty_pages,
                machine: machine.to_json(),
            },
            process: ProcessSpec {
                tenant,
                vm_id,
                seccomp: raw.seccomp.unwrap_or(true),
                kvm_device: raw.kvm_device.unwrap_or_else(|| PathBuf::from("/dev/kvm")),
                supervision,
                jail,
                control_fd: raw.control_fd.filter(|fd| *fd > 2),
                control_socket: raw.control_socket,
                start_paused: raw.start_paused.unwrap_or(false),
                handover_fd: raw.handover_fd.filter(|fd| *fd > 2),
                no_follow,
                pinned_files: raw.pinned_files.unwrap_or_default(),
                virtiofsd: raw.virtiofsd,
            },
            quirks: Quirks {
                firecracker_names,
                vsock_cid_shared: raw.vsock_cid_shared.unwrap_or(false),
            },
            test_hook: None,
        })
    }
}

/// Whether `id` may be a disk's id (what virtio-blk's GET_ID returns): the one rule, which the
/// Firecracker personality also asks before it passes a drive id on.
pub fn is_disk_id(id: &str) -> bool {
    id_chars_ok(id, MAX_DISK_ID_LEN)
}

pub(crate) fn id_chars_ok(value: &str, max: usize) -> bool {
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
        return Err(ConfigError::Random(crate::Cause::new(
            std::io::Error::last_os_error(),
        )));
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
        assert_eq!(a.vm.vcpus, 1);
        assert_eq!(a.vm.mem_mib, 128);
        assert_eq!(a.vm.console, ConsoleConfig::Stdio);
        assert_eq!(a.process.vm_id.len(), 32);
        assert_ne!(a.process.vm_id, b.process.vm_id);
        assert!(a.process.seccomp);
    }

    #[test]
    fn devices_go_on_the_command_line_only_when_asked_or_without_acpi() {
        let with = |f: fn(&mut RawConfig)| {
            let mut raw = raw_with_kernel();
            f(&mut raw);
            let c = VmConfig::from_raw(raw, 1 << 20).unwrap();
            (c.vm.acpi, c.vm.cmdline_devices)
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
        assert!(!VmConfig::from_raw(file, 1 << 20).unwrap().vm.acpi);
    }

    #[test]
    fn the_irqchip_is_split_for_acpi_guests_and_full_for_the_rest_unless_asked() {
        let with = |f: fn(&mut RawConfig)| {
            let mut raw = raw_with_kernel();
            f(&mut raw);
            VmConfig::from_raw(raw, 1 << 20).map(|c| c.vm.irqchip)
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
        assert!(
            matches!(err, ConfigError::Json(m) if m.to_string().contains("unknown field `vcpu`"))
        );
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
