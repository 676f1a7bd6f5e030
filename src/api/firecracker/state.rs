//! What the Firecracker personality has been told before InstanceStart, how it becomes
//! bulkhead's own settings, and how it is shown back (`GET /vm/config`).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::config::{ConsoleConfig, RawConfig, RawDisk, RawNet, RawVsock, ThreadNames};

use super::model::{
    BootSource, Drive, EntropyDevice, Logger, MachineConfiguration, Metrics, NetworkInterface,
    RateLimiter, Vsock,
};

/// Where the VM is in its life, as `GET /` words it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    NotStarted,
    Running,
    Paused,
    /// The VM ended; the process is on its way out.
    Ended,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::NotStarted => "Not started",
            Phase::Running | Phase::Ended => "Running",
            Phase::Paused => "Paused",
        }
    }
}

/// The microVM's settings so far.
#[derive(Debug, Clone, Default)]
pub struct Pending {
    pub machine: MachineConfiguration,
    pub boot: Option<BootSource>,
    /// In the order given; the root device goes first when the VM is built.
    pub drives: Vec<Drive>,
    pub nets: Vec<NetworkInterface>,
    pub vsock: Option<Vsock>,
    pub entropy: Option<EntropyDevice>,
    pub logger: Option<Logger>,
    pub metrics: Option<Metrics>,
    /// A boot-specific resource (anything but the logger and metrics) was configured: a
    /// snapshot load is then refused, as Firecracker refuses it.
    pub boot_path: bool,
}

/// Why the settings can not make a VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PendingError {
    #[error("Start microvm error: Cannot start microvm without kernel configuration.")]
    NoKernel,
    #[error("Drive config error: A root block device already exists!")]
    SecondRoot,
    #[error("Drive config error: Unable to create the virtio block device: Invalid block config.")]
    NoDrivePath,
    #[error("Drive config error: vhost-user block devices are not supported by bulkhead")]
    VhostUser,
    #[error("Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled.")]
    VcpuCount,
    #[error("Machine config error: The memory size (MiB) is either 0, or not a multiple of the configured page size.")]
    MemSize,
    #[error("Machine config error: {0} is not supported by bulkhead")]
    MachineFeature(&'static str),
    #[error("Network config error: Could not create the network device: MTU {0} is out of range [68, 65535]")]
    Mtu(u32),
    #[error("Network config error: a custom MTU is not supported by bulkhead")]
    MtuUnsupported,
}

impl Pending {
    /// Checks and stores a machine configuration.
    pub fn set_machine(&mut self, m: MachineConfiguration) -> Result<(), PendingError> {
        if m.vcpu_count == 0
            || m.vcpu_count > 32
            || (m.smt && m.vcpu_count > 1 && m.vcpu_count % 2 == 1)
        {
            return Err(PendingError::VcpuCount);
        }
        if m.mem_size_mib == 0 || (m.huge_pages == "2M" && m.mem_size_mib % 2 == 1) {
            return Err(PendingError::MemSize);
        }
        if m.huge_pages != "None" {
            return Err(PendingError::MachineFeature("huge_pages"));
        }
        if m.cpu_template.as_deref().is_some_and(|t| t != "None") {
            return Err(PendingError::MachineFeature("cpu_template"));
        }
        self.machine = m;
        Ok(())
    }

    /// Adds or replaces a drive.
    pub fn put_drive(&mut self, d: Drive) -> Result<(), PendingError> {
        if d.socket.is_some() {
            return Err(PendingError::VhostUser);
        }
        if d.path_on_host.is_none() {
            return Err(PendingError::NoDrivePath);
        }
        let other_root = self
            .drives
            .iter()
            .any(|o| o.is_root_device && o.drive_id != d.drive_id);
        if d.is_root_device && other_root {
            return Err(PendingError::SecondRoot);
        }
        match self.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
            Some(o) => *o = d,
            None => self.drives.push(d),
        }
        Ok(())
    }

    pub fn put_net(&mut self, n: NetworkInterface) -> Result<(), PendingError> {
        if let Some(mtu) = n.mtu {
            if !(68..=65535).contains(&mtu) {
                return Err(PendingError::Mtu(mtu));
            }
            return Err(PendingError::MtuUnsupported);
        }
        match self.nets.iter_mut().find(|o| o.iface_id == n.iface_id) {
            Some(o) => *o = n,
            None => self.nets.push(n),
        }
        Ok(())
    }

    /// Drives as the guest will see them: the root device first, the others in order.
    pub fn ordered_drives(&self) -> Vec<&Drive> {
        let root = self.drives.iter().filter(|d| d.is_root_device);
        let rest = self.drives.iter().filter(|d| !d.is_root_device);
        root.chain(rest).collect()
    }

    /// bulkhead's settings for this microVM. Relative paths are taken from `cwd`, as
    /// Firecracker takes them from its working directory.
    pub fn to_bulkhead(
        &self,
        id: &str,
        seccomp: bool,
        cwd: &Path,
    ) -> Result<RawConfig, PendingError> {
        let boot = self.boot.as_ref().ok_or(PendingError::NoKernel)?;
        let abs = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                cwd.join(p)
            }
        };
        let mut cmdline = boot.boot_args.clone().unwrap_or_default();
        let mut disks = Vec::new();
        for (index, d) in self.ordered_drives().into_iter().enumerate() {
            let path = d.path_on_host.as_deref().ok_or(PendingError::NoDrivePath)?;
            let read_only = d.is_read_only.unwrap_or(false);
            if d.is_root_device {
                // As Firecracker does: the root device is named on the command line.
                let dev = match &d.partuuid {
                    Some(uuid) => format!("PARTUUID={uuid}"),
                    None => format!(
                        "/dev/vd{}",
                        char::from(b'a' + u8::try_from(index).unwrap_or(0))
                    ),
                };
                let mode = if read_only { "ro" } else { "rw" };
                cmdline = format!("{cmdline} root={dev} {mode}").trim().to_string();
            }
            disks.push(RawDisk {
                path: abs(path),
                read_only,
                // A Firecracker drive id bulkhead can not use as a disk id (too long, other
                // characters) leaves the disk its default id.
                id: crate::config::is_disk_id(&d.drive_id).then(|| d.drive_id.clone()),
                rate_limiter: RateLimiter::to_bulkhead(&d.rate_limiter),
            });
        }
        let nets: Vec<RawNet> = self
            .nets
            .iter()
            .map(|n| RawNet {
                tap: n.host_dev_name.clone(),
                mac: n.guest_mac.clone(),
                id: Some(n.iface_id.clone()),
                rx_rate_limiter: RateLimiter::to_bulkhead(&n.rx_rate_limiter),
                tx_rate_limiter: RateLimiter::to_bulkhead(&n.tx_rate_limiter),
            })
            .collect();
        Ok(RawConfig {
            kernel: Some(abs(&boot.kernel_image_path)),
            initrd: boot.initrd_path.as_deref().map(abs),
            cmdline: Some(cmdline),
            vcpus: Some(u32::from(self.machine.vcpu_count)),
            mem_mib: Some(self.machine.mem_size_mib),
            track_dirty_pages: Some(self.machine.track_dirty_pages),
            vm_id: Some(id.to_string()),
            console: Some(ConsoleConfig::Stdio.to_string()),
            rng: Some(self.entropy.is_some()),
            rng_rate_limiter: self
                .entropy
                .as_ref()
                .and_then(|e| RateLimiter::to_bulkhead(&e.rate_limiter)),
            seccomp: Some(seccomp),
            thread_names: Some(ThreadNames::Firecracker),
            // Kata gives every pod CID 3: as in Firecracker, a CID is the VM's own.
            vsock_cid_shared: Some(true),
            disks: (!disks.is_empty()).then_some(disks),
            nets: (!nets.is_empty()).then_some(nets),
            vsock: self.vsock.as_ref().map(|v| RawVsock {
                cid: v.guest_cid,
                uds: abs(&v.uds_path),
                buffer_mib: None,
            }),
            ..RawConfig::default()
        })
    }

    /// Whether a boot-specific resource was configured (what makes a snapshot load refused,
    /// as in Firecracker).
    pub fn configured(&self) -> bool {
        self.boot_path
    }

    /// `GET /vm/config`, in Firecracker's layout.
    pub fn full_config(&self) -> Value {
        let boot = self.boot.clone().unwrap_or_default();
        json!({
            "balloon": null,
            "drives": self.ordered_drives(),
            "boot-source": {
                "kernel_image_path": boot.kernel_image_path,
                "initrd_path": boot.initrd_path,
                "boot_args": boot.boot_args,
            },
            "cpu-config": null,
            "logger": null,
            "machine-config": self.machine,
            "metrics": null,
            "mmds-config": null,
            "network-interfaces": self.nets,
            "vsock": self.vsock,
            "entropy": self.entropy,
            "pmem": [],
            "memory-hotplug": null,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(id: &str, root: bool, path: &str) -> Drive {
        serde_json::from_value(json!({
            "drive_id": id, "is_root_device": root, "path_on_host": path, "is_read_only": false
        }))
        .unwrap()
    }

    #[test]
    fn the_root_drive_comes_first_and_is_named_on_the_command_line() {
        let mut p = Pending {
            boot: Some(BootSource {
                kernel_image_path: "vmlinux".into(),
                initrd_path: None,
                boot_args: Some("console=ttyS0".into()),
            }),
            ..Pending::default()
        };
        p.put_drive(drive("data", false, "/d.img")).unwrap();
        p.put_drive(drive("rootfs", true, "/r.img")).unwrap();
        assert_eq!(
            p.put_drive(drive("other", true, "/o.img")),
            Err(PendingError::SecondRoot)
        );
        let c = p.to_bulkhead("vm1", true, Path::new("/jail")).unwrap();
        assert_eq!(c.kernel.as_deref(), Some(Path::new("/jail/vmlinux")));
        assert_eq!(c.cmdline.as_deref(), Some("console=ttyS0 root=/dev/vda rw"));
        let disks = c.disks.unwrap();
        assert_eq!(disks[0].path, Path::new("/r.img"));
        assert_eq!(disks[1].id.as_deref(), Some("data"));
        assert_eq!(c.rng, Some(false));
    }

    #[test]
    fn rate_limiters_reach_bulkheads_settings_and_zero_buckets_limit_nothing() {
        let mut p = Pending {
            boot: Some(BootSource {
                kernel_image_path: "/vmlinux".into(),
                initrd_path: None,
                boot_args: None,
            }),
            ..Pending::default()
        };
        let mut d = drive("rootfs", true, "/r.img");
        d.rate_limiter = serde_json::from_value(json!({
            "bandwidth": {"size": 1000, "refill_time": 100},
            "ops": {"size": 0, "refill_time": 100}
        }))
        .unwrap();
        p.put_drive(d).unwrap();
        let c = p.to_bulkhead("vm1", true, Path::new("/")).unwrap();
        let limiter = c.disks.unwrap()[0].rate_limiter.unwrap();
        assert_eq!(
            limiter.bandwidth.map(|b| (b.size, b.refill_time)),
            Some((1000, 100))
        );
        assert_eq!(limiter.ops, None);
        // Kata's `{}` limits nothing and is left out.
        p.drives[0].rate_limiter = Some(RateLimiter::default());
        let c = p.to_bulkhead("vm1", true, Path::new("/")).unwrap();
        assert_eq!(c.disks.unwrap()[0].rate_limiter, None);
    }

    #[test]
    fn machine_limits_are_firecrackers() {
        let mut p = Pending::default();
        let m = |v: u8, mem: u64, smt: bool| MachineConfiguration {
            vcpu_count: v,
            mem_size_mib: mem,
            smt,
            ..MachineConfiguration::default()
        };
        assert_eq!(
            p.set_machine(m(0, 128, false)),
            Err(PendingError::VcpuCount)
        );
        assert_eq!(
            p.set_machine(m(33, 128, false)),
            Err(PendingError::VcpuCount)
        );
        assert_eq!(p.set_machine(m(3, 128, true)), Err(PendingError::VcpuCount));
        assert_eq!(p.set_machine(m(1, 0, false)), Err(PendingError::MemSize));
        assert!(p.set_machine(m(32, 256, false)).is_ok());
        assert!(p.to_bulkhead("x", true, Path::new("/")).is_err());
    }
}
