//! Firecracker's API bodies, with its field names and its strictness: unknown fields are
//! refused where Firecracker refuses them (everywhere but `PUT /metrics`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{RateLimiterConfig, TokenBucketConfig};

/// `GET /`.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceInfo {
    pub id: String,
    pub state: &'static str,
    pub vmm_version: String,
    pub app_name: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    #[serde(default = "huge_pages_none")]
    pub huge_pages: String,
}

fn huge_pages_none() -> String {
    "None".to_string()
}

impl Default for MachineConfiguration {
    fn default() -> Self {
        MachineConfiguration {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: huge_pages_none(),
        }
    }
}

/// `PATCH /machine-config`: any subset.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigurationPatch {
    pub vcpu_count: Option<u8>,
    pub mem_size_mib: Option<u64>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    pub cpu_template: Option<String>,
    pub huge_pages: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(default)]
    pub initrd_path: Option<PathBuf>,
    #[serde(default)]
    pub boot_args: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    pub size: u64,
    #[serde(default)]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    #[serde(default)]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default)]
    pub ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// True when the limiter limits nothing (`{}` or both buckets null), as Kata sends.
    pub fn is_unlimited(limiter: &Option<RateLimiter>) -> bool {
        limiter
            .as_ref()
            .map_or(true, |l| l.bandwidth.is_none() && l.ops.is_none())
    }

    /// The limiter in bulkhead's settings, or None when it limits nothing. A bucket with a
    /// zero size or refill time limits nothing in Firecracker, and is left out.
    pub fn to_bulkhead(limiter: &Option<RateLimiter>) -> Option<RateLimiterConfig> {
        let l = limiter.as_ref()?;
        let bucket = |b: &Option<TokenBucket>| {
            b.as_ref()
                .filter(|b| b.size > 0 && b.refill_time > 0)
                .map(|b| TokenBucketConfig {
                    size: b.size,
                    one_time_burst: b.one_time_burst.unwrap_or(0),
                    refill_time: b.refill_time,
                })
        };
        let out = RateLimiterConfig {
            bandwidth: bucket(&l.bandwidth),
            ops: bucket(&l.ops),
        };
        (out.bandwidth.is_some() || out.ops.is_some()).then_some(out)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub is_root_device: bool,
    #[serde(default)]
    pub partuuid: Option<String>,
    #[serde(default = "cache_unsafe")]
    pub cache_type: String,
    #[serde(default)]
    pub is_read_only: Option<bool>,
    #[serde(default)]
    pub path_on_host: Option<PathBuf>,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
    #[serde(default = "io_sync")]
    pub io_engine: String,
    #[serde(default)]
    pub socket: Option<String>,
}

fn cache_unsafe() -> String {
    "Unsafe".to_string()
}

fn io_sync() -> String {
    "Sync".to_string()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    pub drive_id: String,
    #[serde(default)]
    pub path_on_host: Option<PathBuf>,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default)]
    pub guest_mac: Option<String>,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    pub iface_id: String,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
    /// Deprecated in Firecracker; accepted and dropped.
    #[serde(default, skip_serializing)]
    pub vsock_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    #[serde(default)]
    pub log_path: Option<PathBuf>,
    #[serde(default)]
    pub level: Option<String>,
    #[serde(default)]
    pub show_level: Option<bool>,
    #[serde(default)]
    pub show_log_origin: Option<bool>,
    #[serde(default)]
    pub module: Option<String>,
}

/// `PUT /metrics`: unknown fields are ignored, as Firecracker does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    pub metrics_path: PathBuf,
    #[serde(default)]
    pub emit_id: Option<bool>,
    #[serde(default)]
    pub properties: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub state: VmStateRequest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VmStateRequest {
    Paused,
    Resumed,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    pub mem_file_path: PathBuf,
    pub snapshot_path: PathBuf,
    #[serde(default)]
    pub snapshot_type: SnapshotType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum SnapshotType {
    #[default]
    Full,
    Diff,
}

impl SnapshotType {
    pub fn kind(self) -> crate::snapshot::SnapshotKind {
        match self {
            SnapshotType::Full => crate::snapshot::SnapshotKind::Full,
            SnapshotType::Diff => crate::snapshot::SnapshotKind::Diff,
        }
    }
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    pub snapshot_path: PathBuf,
    pub mem_file_path: Option<PathBuf>,
    pub mem_backend: Option<MemoryBackend>,
    pub enable_diff_snapshots: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    #[serde(default)]
    pub resume_vm: bool,
    pub network_overrides: Option<Vec<NetworkOverride>>,
    pub vsock_override: Option<VsockOverride>,
    pub clock_realtime: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    pub backend_type: MemoryBackendType,
    pub backend_path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MemoryBackendType {
    File,
    Uffd,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

/// The `--config-file`: Firecracker's thirteen keys. Unknown keys are ignored, as Firecracker
/// ignores them; keys for features bulkhead does not have are refused when set.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConfigFile {
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    pub drives: Vec<Drive>,
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfiguration>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    #[serde(default)]
    pub vsock: Option<Vsock>,
    #[serde(default)]
    pub logger: Option<Logger>,
    #[serde(default)]
    pub metrics: Option<Metrics>,
    #[serde(default)]
    pub entropy: Option<EntropyDevice>,
    #[serde(default)]
    pub balloon: Option<serde_json::Value>,
    #[serde(rename = "cpu-config", default)]
    pub cpu_config: Option<serde_json::Value>,
    #[serde(rename = "mmds-config", default)]
    pub mmds_config: Option<serde_json::Value>,
    #[serde(default)]
    pub pmem: Option<serde_json::Value>,
    #[serde(rename = "memory-hotplug", default)]
    pub memory_hotplug: Option<serde_json::Value>,
}
