//! `bulkhead serve`'s settings (`serve.json`): where the daemon keeps its sockets, state and
//! audit log, who administers it, and each tenant's uids, allowed directories and quotas.
//! Checked here so that the daemon starts only with a configuration in which no two tenants
//! can meet: a uid belongs to one tenant (or is an admin), and no tenant's directory lies inside
//! another's. Nothing is opened; the daemon resolves symlinks before it asks [`Tenant::allows`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use super::{id_chars_ok, MAX_ID_LEN};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeConfigError {
    #[error("serve config: {0}")]
    Json(#[source] crate::Cause<serde_json::Error>),
    #[error("serve config: {field} {path:?} must be an absolute path without `..`")]
    Path { field: String, path: PathBuf },
    #[error("serve config: `admins` is empty: nobody could use the admin socket")]
    NoAdmins,
    #[error("serve config: no tenants")]
    NoTenants,
    #[error(
        "serve config: tenant name {0:?}: use 1 to {MAX_ID_LEN} characters from A-Z a-z 0-9 . _ -"
    )]
    TenantName(String),
    #[error("serve config: tenant {tenant} has no uids")]
    NoUids { tenant: String },
    #[error("serve config: tenant {tenant} has no paths for kernels, initrds and disks")]
    NoPaths { tenant: String },
    #[error("serve config: uid {uid} is given to both {first} and {second}")]
    SharedUid {
        uid: u32,
        first: String,
        second: String,
    },
    #[error("serve config: uid {uid} is an admin and also tenant {tenant}'s")]
    AdminTenantUid { uid: u32, tenant: String },
    #[error("serve config: {first}'s path {a:?} and {second}'s path {b:?} overlap")]
    SharedPath {
        first: String,
        a: PathBuf,
        second: String,
        b: PathBuf,
    },
    #[error("serve config: tenant {tenant}: {field} must be at least 1")]
    ZeroQuota { tenant: String, field: &'static str },
    #[error("serve config: metrics_listen {0:?} is neither unix:/ABSOLUTE/PATH nor an IP address and port")]
    MetricsListen(String),
    #[error("serve config: metrics_listen on TCP needs metrics_token_file: every VM of every tenant shows there")]
    MetricsToken,
    #[error("serve config: {0} goes with a metrics_listen of the other kind")]
    MetricsOption(&'static str),
}

/// What a tenant's VM may write to its console, unless serve.json says otherwise.
pub const DEFAULT_CONSOLE_LIMIT: u64 = 16 << 20;
/// Exited VMs a tenant's records keep, unless serve.json says otherwise.
pub const DEFAULT_MAX_EXITED_VMS: u32 = 16;
/// Requests a tenant's socket takes a second, and at once, unless serve.json says otherwise.
pub const DEFAULT_REQUESTS_PER_SECOND: u32 = 20;
pub const DEFAULT_REQUEST_BURST: u32 = 100;

/// Where the merged Prometheus endpoint listens. It shows every tenant's VMs, so it is never
/// open to any local user: a Unix socket only root (and a configured group) may connect to,
/// or TCP with a bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    /// Mode 0600 root's, or 0660 root:`group`'s.
    Unix { path: PathBuf, group: Option<u32> },
    /// Every request must carry `Authorization: Bearer TOKEN`, the token being the contents
    /// of `token_file` (read by the daemon at start).
    Tcp {
        addr: SocketAddr,
        token_file: PathBuf,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServe {
    run_dir: PathBuf,
    state_dir: PathBuf,
    audit_log: PathBuf,
    admins: Vec<u32>,
    metrics_listen: Option<String>,
    metrics_group: Option<u32>,
    metrics_token_file: Option<PathBuf>,
    tenants: BTreeMap<String, RawTenant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    uids: Vec<u32>,
    paths: Vec<PathBuf>,
    max_vms: u32,
    max_vcpus: u32,
    max_mem_mib: u64,
    console_limit: Option<u64>,
    max_exited_vms: Option<u32>,
    max_snapshot_mib: Option<u64>,
    requests_per_second: Option<u32>,
    request_burst: Option<u32>,
}

/// What one tenant may hold at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub max_vms: u32,
    pub max_vcpus: u32,
    pub max_mem_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub uids: BTreeSet<u32>,
    /// Directories its VMs may take kernels, initrds and disks from.
    pub paths: Vec<PathBuf>,
    pub quota: Quota,
    /// Bytes each of its VMs may write to the console file in the state directory.
    pub console_limit: u64,
    /// Records of exited VMs kept; the oldest go first.
    pub max_exited_vms: u32,
    /// Guest RAM its snapshots may hold in all (each costs at most its RAM on the state
    /// disk); by default its `max_mem_mib`.
    pub max_snapshot_mib: u64,
    /// Requests its socket takes a second, after a burst of `request_burst`.
    pub requests_per_second: u32,
    pub request_burst: u32,
}

impl Tenant {
    /// True when `resolved` (a path with symlinks already resolved) lies inside one of the
    /// tenant's directories, compared component by component (`/srv/acme2` is not inside
    /// `/srv/acme`).
    pub fn allows(&self, resolved: &Path) -> bool {
        clean(resolved) && self.paths.iter().any(|dir| resolved.starts_with(dir))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
    pub audit_log: PathBuf,
    pub admins: BTreeSet<u32>,
    pub metrics_listen: Option<MetricsListen>,
    pub tenants: BTreeMap<String, Tenant>,
}

impl ServeConfig {
    pub fn from_json(text: &str) -> Result<ServeConfig, ServeConfigError> {
        let raw: RawServe =
            serde_json::from_str(text).map_err(|e| ServeConfigError::Json(crate::Cause::new(e)))?;
        for (field, path) in [
            ("run_dir", &raw.run_dir),
            ("state_dir", &raw.state_dir),
            ("audit_log", &raw.audit_log),
        ] {
            check_path(field, path)?;
        }
        if raw.admins.is_empty() {
            return Err(ServeConfigError::NoAdmins);
        }
        if raw.tenants.is_empty() {
            return Err(ServeConfigError::NoTenants);
        }
        let admins: BTreeSet<u32> = raw.admins.into_iter().collect();
        let metrics_listen = metrics_listen(
            raw.metrics_listen,
            raw.metrics_group,
            raw.metrics_token_file,
        )?;
        let mut owner: BTreeMap<u32, String> = BTreeMap::new();
        let mut tenants = BTreeMap::new();
        for (name, t) in raw.tenants {
            let tenant = check_tenant(&name, t, &admins, &mut owner)?;
            tenants.insert(name, tenant);
        }
        check_paths_apart(&tenants)?;
        Ok(ServeConfig {
            run_dir: raw.run_dir,
            state_dir: raw.state_dir,
            audit_log: raw.audit_log,
            admins,
            metrics_listen,
            tenants,
        })
    }

    /// The tenant a caller's uid acts as, if any.
    pub fn tenant_of(&self, uid: u32) -> Option<&str> {
        self.tenants
            .iter()
            .find(|(_, t)| t.uids.contains(&uid))
            .map(|(name, _)| name.as_str())
    }
}

fn metrics_listen(
    listen: Option<String>,
    group: Option<u32>,
    token_file: Option<PathBuf>,
) -> Result<Option<MetricsListen>, ServeConfigError> {
    let Some(listen) = listen else {
        return match (group, token_file) {
            (None, None) => Ok(None),
            (Some(_), _) => Err(ServeConfigError::MetricsOption("metrics_group")),
            (_, Some(_)) => Err(ServeConfigError::MetricsOption("metrics_token_file")),
        };
    };
    if let Some(path) = listen.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        check_path("metrics_listen", &path)?;
        if token_file.is_some() {
            return Err(ServeConfigError::MetricsOption("metrics_token_file"));
        }
        return Ok(Some(MetricsListen::Unix { path, group }));
    }
    let addr = listen
        .parse()
        .map_err(|_| ServeConfigError::MetricsListen(listen.clone()))?;
    if group.is_some() {
        return Err(ServeConfigError::MetricsOption("metrics_group"));
    }
    let token_file = token_file.ok_or(ServeConfigError::MetricsToken)?;
    check_path("metrics_token_file", &token_file)?;
    Ok(Some(MetricsListen::Tcp { addr, token_file }))
}

/// Absolute, and with no `.` or `..` that could make two spellings of one directory.
fn clean(path: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

fn check_path(field: &str, path: &Path) -> Result<(), ServeConfigError> {
    if clean(path) {
        Ok(())
    } else {
        Err(ServeConfigError::Path {
            field: field.to_string(),
            path: path.to_path_buf(),
        })
    }
}

fn check_tenant(
    name: &str,
    raw: RawTenant,
    admins: &BTreeSet<u32>,
    owner: &mut BTreeMap<u32, String>,
) -> Result<Tenant, ServeConfigError> {
    if !id_chars_ok(name, MAX_ID_LEN) {
        return Err(ServeConfigError::TenantName(name.to_string()));
    }
    if raw.uids.is_empty() {
        return Err(ServeConfigError::NoUids {
            tenant: name.to_string(),
        });
    }
    if raw.paths.is_empty() {
        return Err(ServeConfigError::NoPaths {
            tenant: name.to_string(),
        });
    }
    for uid in &raw.uids {
        if admins.contains(uid) {
            return Err(ServeConfigError::AdminTenantUid {
                uid: *uid,
                tenant: name.to_string(),
            });
        }
        if let Some(first) = owner.insert(*uid, name.to_string()).filter(|f| f != name) {
            return Err(ServeConfigError::SharedUid {
                uid: *uid,
                first,
                second: name.to_string(),
            });
        }
    }
    for path in &raw.paths {
        check_path(&format!("tenants.{name}.paths"), path)?;
    }
    let console_limit = raw.console_limit.unwrap_or(DEFAULT_CONSOLE_LIMIT);
    let max_exited_vms = raw.max_exited_vms.unwrap_or(DEFAULT_MAX_EXITED_VMS);
    let max_snapshot_mib = raw.max_snapshot_mib.unwrap_or(raw.max_mem_mib);
    let requests_per_second = raw
        .requests_per_second
        .unwrap_or(DEFAULT_REQUESTS_PER_SECOND);
    let request_burst = raw.request_burst.unwrap_or(DEFAULT_REQUEST_BURST);
    for (field, value) in [
        ("max_vms", u64::from(raw.max_vms)),
        ("max_vcpus", u64::from(raw.max_vcpus)),
        ("max_mem_mib", raw.max_mem_mib),
        ("console_limit", console_limit),
        ("max_exited_vms", u64::from(max_exited_vms)),
        ("max_snapshot_mib", max_snapshot_mib),
        ("requests_per_second", u64::from(requests_per_second)),
        ("request_burst", u64::from(request_burst)),
    ] {
        if value == 0 {
            return Err(ServeConfigError::ZeroQuota {
                tenant: name.to_string(),
                field,
            });
        }
    }
    Ok(Tenant {
        uids: raw.uids.into_iter().collect(),
        paths: raw.paths,
        quota: Quota {
            max_vms: raw.max_vms,
            max_vcpus: raw.max_vcpus,
            max_mem_mib: raw.max_mem_mib,
        },
        console_limit,
        max_exited_vms,
        max_snapshot_mib,
        requests_per_second,
        request_burst,
    })
}

/// No directory of one tenant may equal, contain or lie inside another tenant's.
fn check_paths_apart(tenants: &BTreeMap<String, Tenant>) -> Result<(), ServeConfigError> {
    let all: Vec<(&String, &PathBuf)> = tenants
        .iter()
        .flat_map(|(name, t)| t.paths.iter().map(move |p| (name, p)))
        .collect();
    for (i, (first, a)) in all.iter().enumerate() {
        for (second, b) in &all[i + 1..] {
            if first != second && (a.starts_with(b) || b.starts_with(a)) {
                return Err(ServeConfigError::SharedPath {
                    first: first.to_string(),
                    a: a.to_path_buf(),
                    second: second.to_string(),
                    b: b.to_path_buf(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example the repository ships, which the README points operators at.
    const EXAMPLE: &str = include_str!("../../docs/serve.example.json");

    fn with(edit: impl FnOnce(&mut serde_json::Value)) -> Result<ServeConfig, ServeConfigError> {
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        edit(&mut v);
        ServeConfig::from_json(&v.to_string())
    }

    #[test]
    fn the_shipped_example_is_valid_and_maps_each_uid_to_its_tenant() {
        let c = ServeConfig::from_json(EXAMPLE).unwrap();
        assert_eq!(c.admins, BTreeSet::from([0]));
        assert_eq!(
            c.metrics_listen,
            Some(MetricsListen::Unix {
                path: PathBuf::from("/run/bulkhead/metrics.sock"),
                group: None
            })
        );
        assert_eq!(c.tenants["acme"].console_limit, DEFAULT_CONSOLE_LIMIT);
        assert_eq!(c.tenants["acme"].max_exited_vms, DEFAULT_MAX_EXITED_VMS);
        assert_eq!(c.tenant_of(1001), Some("acme"));
        assert_eq!(c.tenant_of(1002), Some("globex"));
        assert_eq!(c.tenant_of(0), None);
        assert_eq!(c.tenant_of(4242), None);
        let acme = &c.tenants["acme"];
        assert_eq!(
            acme.quota,
            Quota {
                max_vms: 8,
                max_vcpus: 16,
                max_mem_mib: 8192
            }
        );
    }

    #[test]
    fn a_tenant_may_use_only_what_lies_inside_its_own_directories() {
        let c = ServeConfig::from_json(EXAMPLE).unwrap();
        let acme = &c.tenants["acme"];
        assert!(acme.allows(Path::new("/srv/acme/vmlinux")));
        assert!(acme.allows(Path::new("/srv/acme/disks/root.img")));
        assert!(!acme.allows(Path::new("/srv/acme2/vmlinux")));
        assert!(!acme.allows(Path::new("/srv/globex/disk.img")));
        assert!(!acme.allows(Path::new("/srv/acme/../globex/disk.img")));
        assert!(!acme.allows(Path::new("srv/acme/vmlinux")));
    }

    #[test]
    fn unknown_fields_are_refused_at_both_levels() {
        assert!(matches!(
            with(|v| v["listen"] = "x".into()),
            Err(ServeConfigError::Json(e)) if e.to_string().contains("unknown field `listen`")
        ));
        assert!(matches!(
            with(|v| v["tenants"]["acme"]["max_disks"] = 3.into()),
            Err(ServeConfigError::Json(e)) if e.to_string().contains("unknown field `max_disks`")
        ));
    }

    #[test]
    fn a_uid_in_two_tenants_or_an_admin_uid_in_a_tenant_is_refused() {
        assert_eq!(
            with(|v| v["tenants"]["globex"]["uids"] = serde_json::json!([1002, 1001])),
            Err(ServeConfigError::SharedUid {
                uid: 1001,
                first: "acme".into(),
                second: "globex".into()
            })
        );
        assert_eq!(
            with(|v| v["tenants"]["acme"]["uids"] = serde_json::json!([0])),
            Err(ServeConfigError::AdminTenantUid {
                uid: 0,
                tenant: "acme".into()
            })
        );
    }

    #[test]
    fn overlapping_tenant_directories_are_refused() {
        for globex in ["/srv/acme", "/srv/acme/globex", "/srv"] {
            let r = with(|v| v["tenants"]["globex"]["paths"] = serde_json::json!([globex]));
            assert!(
                matches!(r, Err(ServeConfigError::SharedPath { .. })),
                "{globex}: {r:?}"
            );
        }
        // A name that merely starts the same way is another directory.
        assert!(
            with(|v| v["tenants"]["globex"]["paths"] = serde_json::json!(["/srv/acme2"])).is_ok()
        );
    }

    #[test]
    fn relative_or_dotted_paths_empty_lists_bad_names_and_zero_quotas_are_refused() {
        assert!(matches!(
            with(|v| v["run_dir"] = "run/bulkhead".into()),
            Err(ServeConfigError::Path { .. })
        ));
        assert!(matches!(
            with(|v| v["tenants"]["acme"]["paths"] = serde_json::json!(["/srv/../etc"])),
            Err(ServeConfigError::Path { .. })
        ));
        assert_eq!(
            with(|v| v["admins"] = serde_json::json!([])),
            Err(ServeConfigError::NoAdmins)
        );
        assert_eq!(
            with(|v| v["tenants"] = serde_json::json!({})),
            Err(ServeConfigError::NoTenants)
        );
        assert!(matches!(
            with(|v| v["tenants"]["acme"]["uids"] = serde_json::json!([])),
            Err(ServeConfigError::NoUids { .. })
        ));
        assert!(matches!(
            with(|v| v["tenants"]["acme"]["paths"] = serde_json::json!([])),
            Err(ServeConfigError::NoPaths { .. })
        ));
        assert!(matches!(
            with(|v| v["tenants"]["acme"]["max_vms"] = 0.into()),
            Err(ServeConfigError::ZeroQuota {
                field: "max_vms",
                ..
            })
        ));
        assert!(matches!(
            with(|v| v["metrics_listen"] = "localhost".into()),
            Err(ServeConfigError::MetricsListen(_))
        ));
        assert!(matches!(
            with(|v| v["metrics_listen"] = "unix:run/m.sock".into()),
            Err(ServeConfigError::Path { .. })
        ));
        assert!(matches!(
            with(|v| v["tenants"]["acme"]["console_limit"] = 0.into()),
            Err(ServeConfigError::ZeroQuota {
                field: "console_limit",
                ..
            })
        ));
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        let tenants = v["tenants"].as_object_mut().unwrap();
        let acme = tenants.remove("acme").unwrap();
        tenants.insert("a/b".into(), acme);
        assert!(matches!(
            ServeConfig::from_json(&v.to_string()),
            Err(ServeConfigError::TenantName(_))
        ));
    }

    #[test]
    fn the_merged_metrics_are_never_open_to_every_local_user() {
        // TCP only with a token: any local user can connect to a port.
        assert_eq!(
            with(|v| v["metrics_listen"] = "127.0.0.1:9464".into()),
            Err(ServeConfigError::MetricsToken)
        );
        let tcp = with(|v| {
            v["metrics_listen"] = "127.0.0.1:9464".into();
            v["metrics_token_file"] = "/etc/bulkhead/metrics.token".into();
        })
        .unwrap();
        assert_eq!(
            tcp.metrics_listen,
            Some(MetricsListen::Tcp {
                addr: "127.0.0.1:9464".parse().unwrap(),
                token_file: PathBuf::from("/etc/bulkhead/metrics.token"),
            })
        );
        let unix = with(|v| v["metrics_group"] = 998.into()).unwrap();
        assert_eq!(
            unix.metrics_listen,
            Some(MetricsListen::Unix {
                path: PathBuf::from("/run/bulkhead/metrics.sock"),
                group: Some(998),
            })
        );
        // Each option with its own kind of listener only.
        assert_eq!(
            with(|v| v["metrics_token_file"] = "/etc/t".into()),
            Err(ServeConfigError::MetricsOption("metrics_token_file"))
        );
        assert_eq!(
            with(|v| {
                v["metrics_listen"] = "127.0.0.1:9464".into();
                v["metrics_token_file"] = "/etc/t".into();
                v["metrics_group"] = 998.into();
            }),
            Err(ServeConfigError::MetricsOption("metrics_group"))
        );
    }
}
