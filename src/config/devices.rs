//! Device settings: disks and network devices, as flags or JSON entries, and their checks.

use std::path::PathBuf;

use serde::Deserialize;

use super::limits::RateLimiterConfig;
use super::ConfigError;

/// A disk as given: `--disk PATH[,ro][,id=NAME][,bw_size=...]`, or an entry of `disks` in the
/// JSON file.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawDisk {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    pub id: Option<String>,
    /// Limits on the bytes and requests the guest may move (Firecracker's `rate_limiter`).
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl std::str::FromStr for RawDisk {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::Disk(s.to_string());
        let mut parts = s.split(',');
        let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(bad)?;
        let mut disk = RawDisk {
            path: PathBuf::from(path),
            ..Default::default()
        };
        for part in parts {
            match part.split_once('=') {
                None if part == "ro" && !disk.read_only => disk.read_only = true,
                Some(("id", id)) if disk.id.is_none() => disk.id = Some(id.to_string()),
                Some((key, value)) => {
                    if !RateLimiterConfig::set_flag_key(&mut disk.rate_limiter, key, value, s)? {
                        return Err(bad());
                    }
                }
                _ => return Err(bad()),
            }
        }
        Ok(disk)
    }
}

/// A validated disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// What the guest reads with GET_ID (and sees as the disk's serial).
    pub id: String,
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// A network device as given: `--net tap=NAME[,mac=MAC][,id=NAME]`, or an entry of `nets` in
/// JSON.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawNet {
    pub tap: String,
    pub mac: Option<String>,
    /// A name for the interface (Firecracker's `iface_id`), kept in snapshots so a restore can
    /// name the device whose tap it moves.
    pub id: Option<String>,
    /// Limits on what the guest receives and sends (Firecracker's names).
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

impl std::str::FromStr for RawNet {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::Net(s.to_string());
        let (mut tap, mut mac, mut id) = (None, None, None);
        let (mut rx, mut tx) = (None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", v)) if tap.is_none() => tap = Some(v.to_string()),
                Some(("mac", v)) if mac.is_none() => mac = Some(v.to_string()),
                Some(("id", v)) if id.is_none() && !v.is_empty() => id = Some(v.to_string()),
                Some((key, value)) => {
                    let (limiter, key) = match (key.strip_prefix("rx_"), key.strip_prefix("tx_")) {
                        (Some(k), _) => (&mut rx, k),
                        (_, Some(k)) => (&mut tx, k),
                        _ => return Err(bad()),
                    };
                    if !RateLimiterConfig::set_flag_key(limiter, key, value, s)? {
                        return Err(bad());
                    }
                }
                _ => return Err(bad()),
            }
        }
        Ok(RawNet {
            tap: tap.ok_or_else(bad)?,
            mac,
            id,
            rx_rate_limiter: rx,
            tx_rate_limiter: tx,
        })
    }
}

/// The vsock device as given: `--vsock cid=N,uds=PATH`, or `vsock` in JSON.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawVsock {
    pub cid: u64,
    pub uds: PathBuf,
    /// MiB the host side may buffer for all connections together (default 32).
    pub buffer_mib: Option<u64>,
}

impl std::str::FromStr for RawVsock {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::Vsock(s.to_string());
        let (mut cid, mut uds, mut buffer_mib) = (None, None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("cid", v)) if cid.is_none() => cid = Some(v.parse().map_err(|_| bad())?),
                Some(("uds", v)) if uds.is_none() && !v.is_empty() => uds = Some(PathBuf::from(v)),
                Some(("buffer_mib", v)) if buffer_mib.is_none() => {
                    buffer_mib = Some(v.parse().map_err(|_| bad())?)
                }
                _ => return Err(bad()),
            }
        }
        Ok(RawVsock {
            cid: cid.ok_or_else(bad)?,
            uds: uds.ok_or_else(bad)?,
            buffer_mib,
        })
    }
}

/// The validated vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID: 3 or more (0-2 are reserved), below 2^32 - 1 (VMADDR_CID_ANY).
    pub cid: u64,
    /// Host side: connect here for guest ports, listen on `uds_P` for host port P.
    pub uds: PathBuf,
    /// MiB the host side may buffer for all connections together.
    pub buffer_mib: u64,
}

/// The default vsock buffer budget: 32 MiB, 102 connections of 320 KiB.
pub const DEFAULT_VSOCK_BUFFER_MIB: u64 = 32;
/// The largest: 1024 connections' worth.
pub const MAX_VSOCK_BUFFER_MIB: u64 = 320;

pub(super) fn validate_vsock(raw: Option<RawVsock>) -> Result<Option<VsockConfig>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    if !(3..u64::from(u32::MAX)).contains(&raw.cid) {
        return Err(ConfigError::VsockCid(raw.cid));
    }
    let buffer_mib = raw.buffer_mib.unwrap_or(DEFAULT_VSOCK_BUFFER_MIB);
    if !(1..=MAX_VSOCK_BUFFER_MIB).contains(&buffer_mib) {
        return Err(ConfigError::VsockBuffer(buffer_mib));
    }
    Ok(Some(VsockConfig {
        cid: raw.cid,
        uds: raw.uds,
        buffer_mib,
    }))
}

/// A validated network device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    /// The VM's address on this device: the only source address its frames may carry.
    pub mac: [u8; 6],
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// Gives each disk an id (`diskN` by default) and checks ids and paths are unique. Paths are
/// compared as given: the lock taken when the disk is opened catches the rest.
pub(super) fn validate_disks(raw: Vec<RawDisk>) -> Result<Vec<DiskConfig>, ConfigError> {
    let mut disks: Vec<DiskConfig> = Vec::with_capacity(raw.len());
    for (index, disk) in raw.into_iter().enumerate() {
        let id = disk.id.unwrap_or_else(|| format!("disk{index}"));
        if !super::is_disk_id(&id) {
            return Err(ConfigError::DiskId(id));
        }
        if disks.iter().any(|d| d.id == id) {
            return Err(ConfigError::DuplicateDiskId(id));
        }
        if disk.path.as_os_str().is_empty() {
            return Err(ConfigError::Disk(String::new()));
        }
        if disks.iter().any(|d| d.path == disk.path) {
            return Err(ConfigError::DuplicateDisk(disk.path));
        }
        let rate_limiter = RateLimiterConfig::validate(disk.rate_limiter, &id)?;
        disks.push(DiskConfig {
            path: disk.path,
            read_only: disk.read_only,
            id,
            rate_limiter,
        });
    }
    Ok(disks)
}

/// Checks tap names and MACs; a device without a MAC gets a locally administered one derived
/// from the VM id and its index, so it is stable for a given VM id.
pub(super) fn validate_nets(raw: Vec<RawNet>, vm_id: &str) -> Result<Vec<NetConfig>, ConfigError> {
    let mut nets: Vec<NetConfig> = Vec::with_capacity(raw.len());
    for (index, net) in raw.into_iter().enumerate() {
        let tap_ok = !net.tap.is_empty()
            && net.tap.len() <= 15
            && !net
                .tap
                .bytes()
                // '%' would make the kernel pick a name of its own (tap%d).
                .any(|b| {
                    b == b'/'
                        || b == b':'
                        || b == b'%'
                        || b.is_ascii_whitespace()
                        || b.is_ascii_control()
                });
        if !tap_ok {
            return Err(ConfigError::TapName(net.tap));
        }
        let mac = match &net.mac {
            Some(text) => parse_mac(text)?,
            None => default_mac(vm_id, index),
        };
        if nets.iter().any(|n| n.tap == net.tap) {
            return Err(ConfigError::DuplicateNet(format!("tap {}", net.tap)));
        }
        if nets.iter().any(|n| n.mac == mac) {
            return Err(ConfigError::DuplicateNet(format!(
                "MAC {}",
                format_mac(&mac)
            )));
        }
        let name = |dir: &str| format!("{dir} of tap {}", net.tap);
        let rx_rate_limiter = RateLimiterConfig::validate(net.rx_rate_limiter, &name("rx"))?;
        let tx_rate_limiter = RateLimiterConfig::validate(net.tx_rate_limiter, &name("tx"))?;
        nets.push(NetConfig {
            tap: net.tap,
            mac,
            rx_rate_limiter,
            tx_rate_limiter,
        });
    }
    Ok(nets)
}

fn parse_mac(text: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || ConfigError::Mac(text.to_string());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    // A multicast source address, or none at all, would let the guest pose as many hosts.
    if parts.next().is_some() || mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(bad());
    }
    Ok(mac)
}

/// 06:xx:xx:xx:xx:nn: locally administered, unicast; xx from an FNV-1a hash of the VM id.
fn default_mac(vm_id: &str, index: usize) -> [u8; 6] {
    let hash = vm_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let [a, b, c, d, ..] = hash.to_le_bytes();
    [0x06, a, b, c, d, index as u8]
}

/// aa:bb:cc:dd:ee:ff.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RawConfig, VmConfig};

    #[test]
    fn disk_flags_parse_path_read_only_and_id_in_any_order() {
        let d: RawDisk = "/a/b.img,id=x,ro".parse().unwrap();
        assert_eq!(
            d,
            RawDisk {
                path: "/a/b.img".into(),
                read_only: true,
                id: Some("x".into()),
                rate_limiter: None,
            }
        );
        // Rate limits ride along as bucket keys.
        let d: RawDisk = "/a/b.img,bw_size=1000,bw_refill_time=10".parse().unwrap();
        assert_eq!(
            d.rate_limiter.and_then(|l| l.bandwidth).map(|b| b.size),
            Some(1000)
        );
        for bad in ["", ",ro", "a,ro,ro", "a,rw", "a,id=x,id=y", "a,size=3"] {
            assert!(bad.parse::<RawDisk>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn net_flags_need_a_tap_and_take_one_mac() {
        let n: RawNet = "tap=tap0,mac=06:00:00:00:00:01".parse().unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac.as_deref(), Some("06:00:00:00:00:01"));
        let n: RawNet = "id=eth0,tap=tap1".parse().unwrap();
        assert_eq!((n.tap.as_str(), n.id.as_deref()), ("tap1", Some("eth0")));
        let n: RawNet =
            "tap=tap0,rx_bw_size=5,rx_bw_refill_time=1,tx_ops_size=2,tx_ops_refill_time=3"
                .parse()
                .unwrap();
        assert_eq!(
            n.rx_rate_limiter.and_then(|l| l.bandwidth).map(|b| b.size),
            Some(5)
        );
        assert_eq!(
            n.tx_rate_limiter.and_then(|l| l.ops).map(|b| b.refill_time),
            Some(3)
        );
        assert!("tap=tap0,bw_size=5".parse::<RawNet>().is_err());
        for bad in [
            "",
            "mac=06:00:00:00:00:01",
            "tap=a,tap=b",
            "tap=a,x=1",
            "tap=a,id=",
            "tap0",
        ] {
            assert!(bad.parse::<RawNet>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn macs_must_be_six_hex_bytes_unicast_and_not_zero() {
        assert_eq!(
            parse_mac("06:0a:FF:00:10:99").unwrap(),
            [6, 10, 255, 0, 16, 0x99]
        );
        for bad in [
            "07:00:00:00:00:01",
            "00:00:00:00:00:00",
            "06:00:00:00:00",
            "06:00:00:00:00:01:02",
            "06:00:00:00:00:1",
            "06-00-00-00-00-01",
            "0g:00:00:00:00:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn default_macs_are_stable_per_vm_id_locally_administered_and_distinct() {
        let a = default_mac("vm-1", 0);
        assert_eq!(a, default_mac("vm-1", 0));
        assert_ne!(a, default_mac("vm-2", 0));
        assert_ne!(a, default_mac("vm-1", 1));
        assert_eq!(a[0] & 0b11, 0b10, "not locally administered unicast");
        assert_eq!(format_mac(&[6, 0, 0xab, 0, 0, 1]), "06:00:ab:00:00:01");
    }

    #[test]
    fn devices_come_from_json_and_get_ids_and_macs() {
        let raw = RawConfig::from_json(
            r#"{"kernel": "k", "vm_id": "vm-7", "rng": false,
                "disks": [{"path": "/d0"}, {"path": "/d1", "read_only": true, "id": "data"}],
                "nets": [{"tap": "tap0"}]}"#,
        )
        .unwrap();
        let c = VmConfig::from_raw(raw, 1 << 20).unwrap();
        assert!(!c.vm.rng);
        assert_eq!(c.vm.disks[0].id, "disk0");
        assert_eq!(
            (c.vm.disks[1].id.as_str(), c.vm.disks[1].read_only),
            ("data", true)
        );
        assert_eq!(c.vm.nets[0].mac, default_mac("vm-7", 0));
        assert!(RawConfig::from_json(r#"{"disks": [{"path": "/d", "size": 1}]}"#).is_err());
    }

    #[test]
    fn a_snapshot_keeps_the_mac_a_net_was_given_by_default_so_a_clone_with_another_id_has_it() {
        let raw =
            RawConfig::from_json(r#"{"kernel": "k", "vm_id": "vm-7", "nets": [{"tap": "tap0"}]}"#)
                .unwrap();
        let c = VmConfig::from_raw(raw, 1 << 20).unwrap();
        let machine = RawConfig::from_json(&c.vm.machine).unwrap();
        let nets = machine.nets.clone().unwrap();
        assert_eq!(
            nets[0].mac.as_deref(),
            Some(format_mac(&default_mac("vm-7", 0)).as_str())
        );
        let clone = RawConfig {
            vm_id: Some("vm-8".into()),
            ..machine
        };
        let c = VmConfig::from_raw(clone, 1 << 20).unwrap();
        assert_eq!(c.vm.nets[0].mac, default_mac("vm-7", 0));
    }
}
