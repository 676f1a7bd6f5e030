//! The jail a VM process enters (`--jail`, or `"jail"` in a config file): where its directory
//! goes, the uid and gid it runs as, and its cgroup and rlimit limits. Shapes only; the jail
//! module makes them real.

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// Where per-VM jail directories go unless told otherwise.
pub const DEFAULT_JAIL_DIR: &str = "/run/bulkhead/jail";
/// Memory a VM process may use beyond its guest RAM: the VMM's own heap, device buffers and
/// the page cache of its disk I/O.
pub const DEFAULT_MEMORY_OVERHEAD_MIB: u64 = 256;
/// Threads beyond the vCPUs: the VMM thread, the main thread, and a margin for the runtime.
pub const DEFAULT_EXTRA_PIDS: u64 = 16;
/// Open files: the VMM needs a few dozen; vsock connections take one each.
pub const DEFAULT_OPEN_FILES: u64 = 4096;
/// The first of the per-VM uids and gids a jailed VM process runs as unless given one (plus
/// the supervisor's pid): 0x70000000. systemd leaves 0x70000000-0x7FFFFFFF unused (its
/// container range, from which systemd-nspawn and others pick, ends below it; users and
/// DynamicUser= are far below; 2^31 and up is what tools that read uids as signed break on).
pub const DEFAULT_ID_BASE: u32 = 0x7000_0000;
/// The largest pid Linux hands out (pid_max's ceiling): a base plus any pid stays below 2^31.
const PID_MAX: u32 = 4 << 20;

// systemd's container range ends at 1879048191; 2^31 and up is signed trouble.
const _: () = assert!(DEFAULT_ID_BASE > 1_879_048_191);
const _: () = assert!((DEFAULT_ID_BASE as u64) + (PID_MAX as u64) < 1 << 31);

/// The smallest file-size limit: the console file grows to this before writes fail (a disk
/// larger than this raises the limit to its size).
pub const MIN_FILE_SIZE_MIB: u64 = 1024;

/// `"jail"` as written in a config file; every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawJail {
    /// The directory per-VM jail directories are made in (root's, writable by root alone).
    pub dir: Option<PathBuf>,
    /// The uid and gid the VM process runs as [default: one of bulkhead's per-VM range].
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Without `uid`, the VM process runs as this plus the supervisor's pid
    /// [default: 0x70000000]: a range of 4 Mi ids no user or container manager uses.
    pub id_base: Option<u32>,
    /// CPU time, in percent of one CPU [default: 100 per vCPU, plus 100 for the VMM thread].
    pub cpu_percent: Option<u32>,
    /// Memory limit of the VM process [default: guest RAM + 256 MiB].
    pub memory_mib: Option<u64>,
    /// Tasks (threads) the VM process may have [default: vCPUs + 16].
    pub pids: Option<u64>,
    pub open_files: Option<u64>,
    /// Largest file offset the VM process may write [default: 1 GiB, or the largest disk].
    pub file_size_mib: Option<u64>,
    /// Owner of the jail's vsock socket directory, so that user's listeners for guest
    /// connections can live there [default: root].
    pub socket_owner: Option<u32>,
    /// A network namespace to join (a file such as `/run/netns/NAME`) instead of a new, empty
    /// one: where the operator placed the VM's taps and their routes, as Firecracker's
    /// jailer `--netns` does.
    pub netns: Option<PathBuf>,
}

impl RawJail {
    /// Lays `over` on top of `self`: every field set in `over` wins.
    pub fn overlay(self, over: RawJail) -> RawJail {
        RawJail {
            dir: over.dir.or(self.dir),
            uid: over.uid.or(self.uid),
            gid: over.gid.or(self.gid),
            id_base: over.id_base.or(self.id_base),
            cpu_percent: over.cpu_percent.or(self.cpu_percent),
            memory_mib: over.memory_mib.or(self.memory_mib),
            pids: over.pids.or(self.pids),
            open_files: over.open_files.or(self.open_files),
            file_size_mib: over.file_size_mib.or(self.file_size_mib),
            socket_owner: over.socket_owner.or(self.socket_owner),
            netns: over.netns.or(self.netns),
        }
    }

    /// Checks the settings for a VM with `vcpus` vCPUs and `mem_mib` of RAM, filling in
    /// defaults.
    pub fn validate(self, vcpus: u32, mem_mib: u64) -> Result<JailConfig, ConfigError> {
        let dir = self.dir.unwrap_or_else(|| PathBuf::from(DEFAULT_JAIL_DIR));
        if !dir.is_absolute() {
            return Err(ConfigError::JailDir(dir));
        }
        for (what, id) in [("uid", self.uid), ("gid", self.gid)] {
            if id == Some(0) {
                return Err(ConfigError::JailRoot { what });
            }
        }
        let id_base = self.id_base.unwrap_or(DEFAULT_ID_BASE);
        if !(0x1_0000..=0x7FFF_FFFF - PID_MAX).contains(&id_base) {
            return Err(ConfigError::JailLimit {
                what: "id_base",
                value: u64::from(id_base),
                why: "the range must lie above the 16-bit ids and end below 2^31",
            });
        }
        let cpu_percent = self.cpu_percent.unwrap_or(100 * (vcpus + 1));
        if cpu_percent == 0 {
            return Err(ConfigError::JailLimit {
                what: "cpu_percent",
                value: 0,
                why: "the VM would never run",
            });
        }
        let memory_mib = self
            .memory_mib
            .unwrap_or(mem_mib + DEFAULT_MEMORY_OVERHEAD_MIB);
        if memory_mib <= mem_mib {
            return Err(ConfigError::JailLimit {
                what: "memory_mib",
                value: memory_mib,
                why: "it must exceed the guest's RAM",
            });
        }
        let pids = self.pids.unwrap_or(u64::from(vcpus) + DEFAULT_EXTRA_PIDS);
        if pids <= u64::from(vcpus) + 1 {
            return Err(ConfigError::JailLimit {
                what: "pids",
                value: pids,
                why: "the vCPU threads and the VMM's own need more",
            });
        }
        let open_files = self.open_files.unwrap_or(DEFAULT_OPEN_FILES);
        if open_files < 64 {
            return Err(ConfigError::JailLimit {
                what: "open_files",
                value: open_files,
                why: "the VMM needs at least 64",
            });
        }
        if let Some(ns) = &self.netns {
            if !ns.is_absolute() {
                return Err(ConfigError::JailDir(ns.clone()));
            }
        }
        Ok(JailConfig {
            dir,
            uid: self.uid,
            gid: self.gid,
            id_base,
            cpu_percent,
            memory_mib,
            pids,
            open_files,
            file_size_mib: self.file_size_mib,
            socket_owner: self.socket_owner,
            netns: self.netns,
        })
    }
}

/// A validated jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    pub dir: PathBuf,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub id_base: u32,
    pub cpu_percent: u32,
    pub memory_mib: u64,
    pub pids: u64,
    pub open_files: u64,
    pub file_size_mib: Option<u64>,
    pub socket_owner: Option<u32>,
    pub netns: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_scale_with_the_vm() {
        let j = RawJail::default().validate(2, 512).unwrap();
        assert_eq!(j.dir, PathBuf::from(DEFAULT_JAIL_DIR));
        assert_eq!((j.cpu_percent, j.memory_mib, j.pids), (300, 768, 18));
        assert_eq!((j.uid, j.gid), (None, None));
        assert_eq!(j.id_base, DEFAULT_ID_BASE);
    }

    #[test]
    fn a_base_that_would_reach_16_bit_ids_or_2_pow_31_is_refused() {
        for bad in [1000, 0x7FFF_0000, u32::MAX] {
            let raw = RawJail {
                id_base: Some(bad),
                ..RawJail::default()
            };
            assert!(raw.validate(1, 128).is_err(), "{bad:#x}");
        }
        let raw = RawJail {
            id_base: Some(200_000),
            ..RawJail::default()
        };
        assert_eq!(raw.validate(1, 128).unwrap().id_base, 200_000);
    }

    #[test]
    fn root_relative_dirs_and_starved_limits_are_refused() {
        let bad = [
            RawJail {
                uid: Some(0),
                ..Default::default()
            },
            RawJail {
                gid: Some(0),
                ..Default::default()
            },
            RawJail {
                dir: Some("jails".into()),
                ..Default::default()
            },
            RawJail {
                memory_mib: Some(128),
                ..Default::default()
            },
            RawJail {
                pids: Some(2),
                ..Default::default()
            },
            RawJail {
                cpu_percent: Some(0),
                ..Default::default()
            },
            RawJail {
                open_files: Some(3),
                ..Default::default()
            },
        ];
        for raw in bad {
            assert!(raw.clone().validate(1, 128).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn unknown_jail_fields_are_refused() {
        assert!(serde_json::from_str::<RawJail>(r#"{"uid": 5, "chroot": "/"}"#).is_err());
        let j: RawJail = serde_json::from_str(r#"{"uid": 5, "gid": 6}"#).unwrap();
        assert_eq!((j.uid, j.gid), (Some(5), Some(6)));
    }
}
