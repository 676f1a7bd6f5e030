//! Why the daemon refused or failed a request. The daemon's domain code (routes, registry,
//! quotas) returns these; [`super::http`] alone decides which status code each one gets.

use std::path::PathBuf;

use super::audit_log::AuditError;
use super::vms::VmState;
use crate::api::launch::LaunchError;
use crate::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    // What the request names does not exist (for this caller).
    #[error("no such endpoint: {method} {path}")]
    NoEndpoint { method: String, path: String },
    #[error("no VM {0}")]
    NoVm(String),
    #[error("no snapshot {0}")]
    NoSnapshot(String),

    // The caller may not do this.
    #[error("uid {uid} is not a member of tenant {tenant}")]
    NotMember { uid: u32, tenant: String },
    #[error("uid {uid} is not an admin")]
    NotAdmin { uid: u32 },
    #[error("the {0} is for admins, on the admin socket")]
    AdminsOnly(&'static str),
    #[error("{0} is for the tenant itself, on its socket")]
    TenantsOnly(&'static str),
    #[error("an admin acting on a tenant's VM must give a reason (X-Bulkhead-Reason, at most 512 bytes)")]
    NoAdminReason,
    #[error("an admin acting for a tenant must give a reason (X-Bulkhead-Reason)")]
    NoAdminReasonToCreate,
    #[error("the body names tenant {named}, but this socket is tenant {socket}'s")]
    OtherTenant { named: String, socket: String },
    #[error("{what} {} is not a file tenant {tenant} may use", path.display())]
    FileRefused {
        what: &'static str,
        path: PathBuf,
        tenant: String,
    },
    #[error("{what} {} did not answer within {secs} s", path.display())]
    FileTooSlow {
        what: &'static str,
        path: PathBuf,
        secs: u64,
    },
    #[error("quota: tenant {tenant} has {used} of {max} {what} in use and asks for {asked} more")]
    Quota {
        tenant: String,
        what: &'static str,
        used: u64,
        max: u64,
        asked: u64,
    },

    // The VM is not in a state for this.
    #[error("VM {id} is not running ({state:?})")]
    NotLive { id: String, state: VmState },
    #[error("VM {0} is not running")]
    NotRunning(String),
    #[error("{}", format!("VM {id} is {state:?}, not {want:?}").to_lowercase())]
    WrongState {
        id: String,
        state: VmState,
        want: VmState,
    },
    #[error("VM {0} is still running: stop it first")]
    StillRunning(String),
    #[error("VM {0} has no control socket (it was started by an older daemon): it can not be snapshotted")]
    NoControl(String),
    #[error("VM {0} does not track dirty pages (create it with \"track_dirty_pages\": true): it takes full snapshots only")]
    DiffUntracked(String),
    #[error("VM {0} has no snapshot of its own since it started to take a diff against: take a full snapshot first")]
    DiffWithoutBase(String),
    #[error("snapshot {id} is the base of diff snapshot {diff}: delete that one first")]
    SnapshotIsBase { id: String, diff: String },
    #[error("VM {vm}'s chain of diff snapshots is {max} long: take a full snapshot")]
    ChainTooLong { vm: String, max: usize },
    #[error("disk {} is in use by another VM", .0.display())]
    DiskInUse(PathBuf),

    // The request itself is malformed.
    #[error("the body must be a JSON object")]
    NotAnObject,
    #[error("a snapshot's body is empty, {{\"kind\": \"full\"}} or {{\"kind\": \"diff\"}}")]
    SnapshotKind,
    #[error("the body is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("invalid VM settings: {0}")]
    Settings(#[source] serde_json::Error),
    #[error("cannot read the body: {0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the body did not arrive in time")]
    BodyTimeout,
    #[error("the body is larger than {0} bytes")]
    BodyTooLarge(usize),

    // The settings can not make a VM here.
    #[error("an admin creating a VM must name its tenant")]
    NoTenantNamed,
    #[error("no tenant {0}")]
    NoSuchTenant(String),
    #[error("\"{field}\" can not be set here: {why}")]
    DaemonField {
        field: &'static str,
        why: &'static str,
    },
    #[error("\"seccomp\": false is never allowed through the daemon")]
    SeccompOff,
    #[error(
        "\"console\" may only be \"none\": the daemon keeps the console in the VM's directory"
    )]
    Console,
    #[error("{what} {} must be an absolute path", path.display())]
    RelativePath { what: &'static str, path: PathBuf },
    #[error("no kernel given")]
    NoKernel,
    #[error("a VM made from a snapshot takes its machine from it; \"{0}\" can not be given")]
    SnapshotMachine(&'static str),
    #[error(transparent)]
    SnapshotSettings(crate::snapshot::RestoreSettingsError),
    #[error("console_limit {asked} is above tenant {tenant}'s cap of {cap} bytes")]
    ConsoleLimit {
        asked: u64,
        tenant: String,
        cap: u64,
    },
    #[error(transparent)]
    Invalid(ConfigError),

    // Come back later.
    #[error("too many requests: this socket's rate limit")]
    RateLimited,
    #[error("tenant {tenant} has {max} file checks still running; try again later")]
    ChecksBusy { tenant: String, max: usize },
    #[error("the audit log can not be written: requests are refused until it can")]
    AuditUnwritable(#[source] AuditError),

    // The daemon failed.
    #[error("snapshot {0}: its chain of diffs has no full snapshot at its root")]
    BrokenChain(String),
    #[error("cannot lay diff snapshot {id} over its chain: {source}")]
    Rebase {
        id: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot snapshot VM {id}: {source}")]
    Snapshot {
        id: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot read the {what}: {source}")]
    Read {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prepare VM {id}: {source}")]
    Prepare {
        id: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot create the VM's log: {0}")]
    VmLog(#[source] std::io::Error),
    #[error("cannot start VM {id}: {source}")]
    Start {
        id: String,
        #[source]
        source: LaunchError,
    },
    #[error("cannot make a VM id: {0}")]
    VmId(#[source] ConfigError),
    #[error("the request's worker failed")]
    Worker,
}
