//! Snapshots through the daemon: a tenant snapshots its own VM and starts VMs from its own
//! snapshots, and nobody else's.
//!
//! A snapshot lives in `STATE_DIR/tenants/TENANT/snapshots/ID/` (directories 0700, files 0600,
//! all root's): its state file, its memory file and `snapshot.json` (who made it, from which
//! VM, when). The daemon writes them through the VM's control socket (the VM process only
//! writes into the descriptors it is sent) and reads them back only for the tenant whose
//! directory they are in. A tenant naming another tenant's snapshot is answered exactly as for
//! a missing one (404), the attempt is in the audit log with its reason, and it raises
//! `snapshot_cross_tenant`.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::error::ServeError;
use super::http::Reply;
use super::registry::{Daemon, Principal};
use super::vms::{now_rfc3339, VmRecord, VmState};
use crate::telemetry::Rule;

/// A full snapshot, or a diff: the pages changed since its parent.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[default]
    Full,
    Diff,
}

/// What `snapshot.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub id: String,
    pub tenant: String,
    /// The VM it was taken of.
    pub vm: String,
    pub created: String,
    pub vcpus: u32,
    pub mem_mib: u64,
    #[serde(default)]
    pub kind: Kind,
    /// A diff's base: the same VM's snapshot before it (or the one the VM started from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// The body of `POST /v1/vms/ID/snapshot`: empty, or the kind.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TakeBody {
    #[serde(default)]
    kind: Kind,
}

fn requested_kind(body: &[u8]) -> Result<Kind, ServeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Kind::Full);
    }
    serde_json::from_slice::<TakeBody>(body)
        .map(|b| b.kind)
        .map_err(|_| ServeError::SnapshotKind)
}

/// A snapshot's files.
#[derive(Debug, Clone)]
pub struct SnapshotPaths {
    pub dir: PathBuf,
}

impl SnapshotPaths {
    pub fn state(&self) -> PathBuf {
        self.dir.join("vm.state")
    }
    pub fn mem(&self) -> PathBuf {
        self.dir.join("vm.mem")
    }
    pub fn record(&self) -> PathBuf {
        self.dir.join("snapshot.json")
    }
    /// A diff's memory laid over its chain: the full memory of its moment, made when a VM is
    /// first started from it.
    pub fn rebased(&self) -> PathBuf {
        self.dir.join("vm.rebased.mem")
    }
}

/// A tenant's snapshot directory.
fn tenant_dir(d: &Daemon, tenant: &str) -> PathBuf {
    d.config
        .state_dir
        .join("tenants")
        .join(tenant)
        .join("snapshots")
}

fn paths(d: &Daemon, tenant: &str, id: &str) -> SnapshotPaths {
    SnapshotPaths {
        dir: tenant_dir(d, tenant).join(id),
    }
}

/// A snapshot id as the daemon makes them (so a path built from one stays one component).
fn is_snapshot_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `POST /v1/vms/ID/snapshot`: pauses the VM (unless paused already), writes its snapshot
/// into the tenant's directory, and resumes it. Answers 201 with the snapshot's id. With
/// `{"kind": "diff"}` (a VM that tracks dirty pages) the memory file holds only the pages
/// changed since the VM's last snapshot, which the record names as its parent.
pub fn take(d: &Arc<Daemon>, r: &VmRecord, body: &[u8]) -> Result<Reply, ServeError> {
    let kind = requested_kind(body)?;
    if !matches!(r.state, VmState::Running | VmState::Paused) {
        return Err(ServeError::NotLive {
            id: r.id.clone(),
            state: r.state,
        });
    }
    if kind == Kind::Diff && r.config.track_dirty_pages != Some(true) {
        return Err(ServeError::DiffUntracked(r.id.clone()));
    }
    let control = d.paths(&r.id).control();
    if !control.exists() {
        return Err(ServeError::NoControl(r.id.clone()));
    }
    // One snapshot (or deletion, or chain laid) at a time per daemon: the quota check, the
    // base and the write go together.
    let _one = TAKING.lock().unwrap_or_else(|e| e.into_inner());
    // The base as it is now, not as the request found it: a snapshot taken meanwhile has
    // emptied the VM's log since.
    let last = d.vms().get(&r.id).and_then(|vm| vm.last_snapshot.clone());
    let parent = match kind {
        Kind::Full => None,
        Kind::Diff => {
            let kept = last.filter(|p| read_record(&paths(d, &r.tenant, p)).is_some());
            let base = kept.ok_or_else(|| ServeError::DiffWithoutBase(r.id.clone()))?;
            if chain_length(d, &r.tenant, &base) >= MAX_CHAIN {
                return Err(ServeError::ChainTooLong {
                    vm: r.id.clone(),
                    max: MAX_CHAIN,
                });
            }
            Some(base)
        }
    };
    within_quota(d, &r.tenant, r.mem_mib)?;
    let id = crate::config::random_vm_id().map_err(ServeError::VmId)?;
    let paths = paths(d, &r.tenant, &id);
    let made = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&paths.dir);
    made.map_err(|source| ServeError::Snapshot {
        id: r.id.clone(),
        source: Box::new(source),
    })?;
    let keep_paused = r.state == VmState::Paused;
    // From the moment the VM may count this snapshot kept, its log no longer holds what
    // changed since the base: should the daemon die before the record is written, the VM
    // must not be left naming that base for its next diff.
    d.update(&r.id, |vm| vm.last_snapshot = None);
    let written = crate::snapshot::client::create(
        &control,
        &paths.state(),
        &paths.mem(),
        match kind {
            Kind::Full => crate::snapshot::SnapshotKind::Full,
            Kind::Diff => crate::snapshot::SnapshotKind::Diff,
        },
        keep_paused,
    );
    let record = SnapshotRecord {
        id: id.clone(),
        tenant: r.tenant.clone(),
        vm: r.id.clone(),
        created: now_rfc3339(),
        vcpus: r.vcpus,
        mem_mib: r.mem_mib,
        kind,
        parent,
    };
    let saved = written.map_err(Cause::from).and_then(|()| {
        let bytes = serde_json::to_vec(&record).map_err(Cause::from)?;
        write_private(&paths.record(), &bytes).map_err(Cause::from)
    });
    if let Err(source) = saved {
        let _ = std::fs::remove_dir_all(&paths.dir);
        // The VM may have counted this snapshot kept (its files were renamed before the
        // failure): its next snapshot must be a full one (last_snapshot stays cleared).
        return Err(ServeError::Snapshot {
            id: r.id.clone(),
            source,
        });
    }
    d.update(&r.id, |vm| vm.last_snapshot = Some(id.clone()));
    Ok(Reply::json(
        201,
        json!({ "snapshot": id, "vm": r.id, "kind": kind, "parent": record.parent }),
    ))
}

/// Why writing or reading back a snapshot failed ([`ServeError::Snapshot`]'s source).
type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Whether `tenant` may store `asked` MiB more of snapshots (an unknown tenant none).
fn within_quota(d: &Daemon, tenant: &str, asked: u64) -> Result<(), ServeError> {
    let max = d
        .config
        .tenants
        .get(tenant)
        .map_or(0, |t| t.max_snapshot_mib);
    let used: u64 = records(d, tenant).iter().map(|s| stored_mib(d, s)).sum();
    if used + asked > max {
        return Err(ServeError::Quota {
            tenant: tenant.to_string(),
            what: "MiB of snapshots",
            used,
            max,
            asked,
        });
    }
    Ok(())
}

/// What a snapshot holds on disk, for the tenant's quota: its memory's size, twice once a
/// diff's has been laid over its chain.
fn stored_mib(d: &Daemon, s: &SnapshotRecord) -> u64 {
    let rebased = paths(d, &s.tenant, &s.id).rebased().exists();
    s.mem_mib * if rebased { 2 } else { 1 }
}

/// The longest chain of diffs a VM may take or start from.
const MAX_CHAIN: usize = 64;

/// How many snapshots the chain ending at `id` holds (MAX_CHAIN once it is that long, or
/// loops).
fn chain_length(d: &Daemon, tenant: &str, id: &str) -> usize {
    let mut next = Some(id.to_string());
    let mut length = 0;
    while let Some(id) = next.filter(|_| length < MAX_CHAIN) {
        length += 1;
        next = read_record(&paths(d, tenant, &id)).and_then(|r| r.parent);
    }
    length
}

/// The memory file a VM started from snapshot `paths` maps: a full snapshot's own; for a
/// diff, its chain's diffs laid in turn over the full snapshot at its root, made once into
/// `vm.rebased.mem` beside it and kept there (clones of it share its page cache; deleting
/// the snapshot deletes it).
pub fn memory_of(
    d: &Arc<Daemon>,
    who: &Principal,
    tenant: &str,
    paths: &SnapshotPaths,
) -> Result<PathBuf, Reply> {
    // One at a time: two VMs started from one diff at once make its memory once.
    let _one = TAKING.lock().unwrap_or_else(|e| e.into_inner());
    memory_at_depth(d, who, tenant, paths, 0)
}

/// Removes the unfinished rebased memory files in `dir`.
fn remove_partials(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".vm.rebased.mem.") && name.ends_with(".partial") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn memory_at_depth(
    d: &Arc<Daemon>,
    who: &Principal,
    tenant: &str,
    paths: &SnapshotPaths,
    depth: usize,
) -> Result<PathBuf, Reply> {
    let record = read_record(paths)
        .ok_or_else(|| Reply::from(ServeError::NoSnapshot(paths.dir.display().to_string())))?;
    if record.kind == Kind::Full {
        return Ok(paths.mem());
    }
    let rebased = paths.rebased();
    if rebased.exists() {
        return Ok(rebased);
    }
    let Some(parent_id) = record.parent.as_deref().filter(|_| depth < MAX_CHAIN) else {
        return Err(ServeError::BrokenChain(record.id).into());
    };
    let parent = find(d, who, tenant, parent_id)?;
    let base = memory_at_depth(d, who, tenant, &parent, depth + 1)?;
    // Within the tenant's snapshot quota, counted once the chain below is laid; what a daemon
    // that died while making one left behind goes first (the caller holds TAKING: nobody else
    // is making one).
    remove_partials(&paths.dir);
    within_quota(d, tenant, record.mem_mib)?;
    static TEMPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = TEMPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Named for this daemon and this attempt: one that died half-way left its own behind.
    let temp = paths.dir.join(format!(
        ".vm.rebased.mem.{}.{n}.partial",
        std::process::id()
    ));
    let made = crate::snapshot::rebase::rebase(&base, &paths.mem(), &temp)
        .map_err(Cause::from)
        .and_then(|_| std::fs::rename(&temp, &rebased).map_err(Cause::from));
    if let Err(source) = made {
        let _ = std::fs::remove_file(&temp);
        return Err(ServeError::Rebase {
            id: record.id,
            source,
        }
        .into());
    }
    Ok(rebased)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

fn read_record(paths: &SnapshotPaths) -> Option<SnapshotRecord> {
    let bytes = std::fs::read(paths.record()).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The tenant that holds snapshot `id`, if any does.
fn owner_of(d: &Daemon, id: &str) -> Option<String> {
    let tenants = std::fs::read_dir(d.config.state_dir.join("tenants")).ok()?;
    tenants
        .flatten()
        .filter_map(|t| t.file_name().into_string().ok())
        .find(|t| read_record(&paths(d, t, id)).is_some_and(|r| r.id == id && &r.tenant == t))
}

/// Snapshot `id` of `tenant`, for `who`: another tenant's is answered as a missing one, and
/// raises `snapshot_cross_tenant`.
pub fn find(
    d: &Arc<Daemon>,
    who: &Principal,
    tenant: &str,
    id: &str,
) -> Result<SnapshotPaths, Reply> {
    let missing = || Reply::from(ServeError::NoSnapshot(id.to_string()));
    if !is_snapshot_id(id) {
        return Err(missing());
    }
    let mine = paths(d, tenant, id);
    if read_record(&mine).is_some_and(|r| r.tenant == tenant && r.id == id) {
        return Ok(mine);
    }
    let Some(owner) = owner_of(d, id) else {
        return Err(missing());
    };
    let caller = match who {
        Principal::Tenant { name, uid } => format!("tenant {name} (uid {uid})"),
        Principal::Admin { uid } => format!("admin uid {uid}, for tenant {tenant},"),
    };
    d.alert(
        Rule::SnapshotCrossTenant,
        "",
        &owner,
        format!("{caller} asked for snapshot {id}, which belongs to another tenant"),
        vec![("caller_tenant", json!(tenant)), ("snapshot", json!(id))],
    );
    let mut reply = missing();
    reply.audit_reason = Some(format!(
        "snapshot_cross_tenant: snapshot {id} belongs to {owner}"
    ));
    Err(reply)
}

/// Held while a snapshot is checked against its tenant's quota, given its base and written,
/// while one is deleted, and while a diff's memory is laid over its chain.
static TAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A tenant's snapshots.
fn records(d: &Daemon, tenant: &str) -> Vec<SnapshotRecord> {
    let Ok(entries) = std::fs::read_dir(tenant_dir(d, tenant)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|id| read_record(&paths(d, tenant, &id)).filter(|r| r.tenant == tenant))
        .collect()
}

/// `GET /v1/snapshots`: the caller's tenant's snapshots (an admin's: every tenant's).
pub fn list(d: &Arc<Daemon>, who: &Principal) -> Reply {
    let tenants: Vec<String> = match who {
        Principal::Tenant { name, .. } => vec![name.clone()],
        Principal::Admin { .. } => d.config.tenants.keys().cloned().collect(),
    };
    let mut found: Vec<SnapshotRecord> = tenants.iter().flat_map(|t| records(d, t)).collect();
    found.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
    Reply::json(200, json!({ "snapshots": found }))
}

/// `DELETE /v1/snapshots/ID`: a tenant deletes one of its snapshots (another tenant's is
/// answered as a missing one, and alerted).
pub fn delete(d: &Arc<Daemon>, who: &Principal, id: &str) -> Reply {
    let Principal::Tenant { name, .. } = who else {
        return Reply::from(ServeError::TenantsOnly("deleting a snapshot"));
    };
    let paths = match find(d, who, name, id) {
        Ok(p) => p,
        Err(refused) => return refused,
    };
    // Not while a diff is being taken (it may have chosen this one as its base) or a chain
    // laid.
    let _one = TAKING.lock().unwrap_or_else(|e| e.into_inner());
    // A diff's chain needs every snapshot before it.
    if let Some(diff) = records(d, name)
        .into_iter()
        .find(|s| s.parent.as_deref() == Some(id))
    {
        return Reply::from(ServeError::SnapshotIsBase {
            id: id.to_string(),
            diff: diff.id,
        });
    }
    match std::fs::remove_dir_all(&paths.dir) {
        Ok(()) => Reply::text(204, "application/json", Vec::new()),
        Err(source) => Reply::from(ServeError::Snapshot {
            id: id.to_string(),
            source: Box::new(source),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_daemons_own_ids_name_a_snapshot_directory() {
        assert!(is_snapshot_id("0a1b2c3d4e5f"));
        for bad in ["", "..", "a/b", "a.b", &"x".repeat(65)] {
            assert!(!is_snapshot_id(bad), "{bad}");
        }
    }
}
