//! The isolation report for one VM (`GET /v1/vms/ID/report`): the facts an auditor asks for,
//! plane by plane, each tagged with how the daemon knows it: `claimed` (the VM's settings, as
//! the daemon gave them), `observed` (read from the kernel: /proc, cgroup files) or `tested`
//! (checked by the daemon against the other VMs and the host).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use serde::{Deserialize, Serialize};

use super::registry::Daemon;
use super::vms::{self, VmRecord, VmState};
use crate::api::markdown;
use crate::config::RawConfig;
use crate::procfs::{self, ProcStatus};

const SECCOMP_FACT: &str = "every thread is in seccomp filter mode";

/// How the daemon knows a fact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum How {
    /// From the VM's settings, as the daemon gave them.
    Claimed,
    /// Read from the kernel: /proc, cgroup files.
    Observed,
    /// Checked by the daemon against the other VMs and the host.
    Tested,
}

/// One fact, and whether it holds (none for a fact that is only stated).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fact {
    pub fact: String,
    pub how: How,
    pub value: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
}

/// The facts of each plane ISO/IEC 27017 CLD.9.5.1 asks about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Planes {
    pub memory: Vec<Fact>,
    pub compute: Vec<Fact>,
    pub storage: Vec<Fact>,
    pub network: Vec<Fact>,
    pub vsock: Vec<Fact>,
    pub management: Vec<Fact>,
}

impl Planes {
    fn each(&self) -> [(&'static str, &[Fact]); 6] {
        [
            ("memory", &self.memory),
            ("compute", &self.compute),
            ("storage", &self.storage),
            ("network", &self.network),
            ("vsock", &self.vsock),
            ("management", &self.management),
        ]
    }
}

/// A VM's isolation report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub vm: String,
    pub tenant: String,
    pub state: VmState,
    /// RFC 3339, UTC.
    pub generated: String,
    /// The bulkhead version that made it.
    pub bulkhead: String,
    pub failed_checks: usize,
    pub planes: Planes,
}

fn fact(what: &str, how: How, value: Value, ok: Option<bool>) -> Fact {
    Fact {
        fact: what.to_string(),
        how,
        value,
        ok,
    }
}

/// The mappings of guest RAM: the VM process's writable anonymous mappings made with
/// MAP_NORESERVE and MADV_DONTDUMP (`nr` and `dd` in smaps), which is how the builder maps it
/// and nothing else of the VMM is. Adjacent regions may show as one mapping.
fn guest_memory(pid: i32) -> Vec<Value> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut found = Vec::new();
    let mut header: Option<(u64, String, String)> = None;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                let perms = words.next().unwrap_or("").to_string();
                let inode = words.nth(2).unwrap_or("").to_string();
                header = Some((hi.saturating_sub(lo), perms, inode));
                continue;
            }
        }
        if let (Some(flags), Some((size, perms, inode))) = (line.strip_prefix("VmFlags:"), &header)
        {
            let flags: Vec<&str> = flags.split_whitespace().collect();
            if perms.starts_with("rw") && flags.contains(&"nr") && flags.contains(&"dd") {
                found.push(json!({
                    "bytes": size,
                    "private": !perms.ends_with('s'),
                    "inode": inode,
                    "mergeable": flags.contains(&"mg"),
                }));
            }
        }
    }
    found
}

/// The cgroup limits of process `pid`, read from each hierarchy it is in.
fn cgroup_limits(pid: i32) -> Value {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut limits = serde_json::Map::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (
            parts.next(),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        let path = path.trim_start_matches('/');
        let read = |base: &str, file: &str| {
            std::fs::read_to_string(Path::new(base).join(path).join(file))
                .ok()
                .map(|s| s.trim().to_string())
        };
        for c in controllers.split(',') {
            let files: &[&str] = match c {
                "cpu" => &["cpu.cfs_quota_us", "cpu.cfs_period_us"],
                "memory" => &["memory.limit_in_bytes"],
                "pids" => &["pids.max"],
                "" => &["cpu.max", "memory.max", "pids.max"],
                _ => &[],
            };
            let base = if c.is_empty() {
                "/sys/fs/cgroup".to_string()
            } else {
                format!("/sys/fs/cgroup/{c}")
            };
            for f in files {
                if let Some(v) = read(&base, f) {
                    limits.insert((*f).to_string(), json!(v));
                }
            }
        }
        if controllers
            .split(',')
            .any(|c| ["", "cpu", "memory", "pids"].contains(&c))
        {
            limits.insert(format!("path({controllers})"), json!(format!("/{path}")));
        }
    }
    Value::Object(limits)
}

/// A file's device and inode, as its (resolved) path names it now: a symlink planted there
/// since is not followed.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The report for `r`, as JSON.
pub fn build(d: &Daemon, r: &VmRecord) -> Report {
    let cfg = &r.config;
    let vm_pid = r
        .pid
        .filter(|&p| r.state.is_live() && crate::procfs::start_time(p) == r.pid_start)
        .and_then(crate::procfs::first_child);
    let regions = crate::arch::x86_64::layout::ram_regions(r.mem_mib << 20);
    let memslots: Vec<Value> = (0..)
        .zip(&regions)
        .map(|(slot, (gpa, bytes))| json!({"slot": slot, "guest_address": format!("{gpa:#x}"), "bytes": bytes}))
        .collect();
    let mut memory = vec![
        fact(
            "guest RAM",
            How::Claimed,
            json!(format!("{} MiB", r.mem_mib)),
            None,
        ),
        fact(
            "memslots, as the builder registers them (one per RAM region, no other)",
            How::Claimed,
            json!(memslots),
            None,
        ),
    ];
    let mut compute = vec![fact("vCPUs", How::Claimed, json!(r.vcpus), None)];
    let mut network = vec![];
    if let Some(pid) = vm_pid {
        let ram = guest_memory(pid);
        let mapped: u64 = ram.iter().filter_map(|m| m["bytes"].as_u64()).sum();
        let private = mapped == r.mem_mib << 20
            && ram
                .iter()
                .all(|m| m["private"] == json!(true) && m["inode"] == json!("0"));
        let unmerged = ram.iter().all(|m| m["mergeable"] == json!(false));
        memory.push(fact(
            "guest RAM backing: private anonymous memory (no file, no inode), never merged, left out of core dumps",
            How::Observed,
            json!(ram),
            Some(private && unmerged),
        ));
        let alone = std::fs::read_dir(format!("/proc/{pid}/root/proc"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                    .count()
            })
            .unwrap_or(0);
        memory.push(fact(
            "no other process maps it: private anonymous memory is shared only with a fork, and the VM process is alone in its pid namespace",
            How::Tested,
            json!({ "processes_in_pid_namespace": alone }),
            Some(private && alone == 1),
        ));
        let tasks = procfs::threads(pid).unwrap_or_default();
        let threads: Vec<Value> = tasks
            .iter()
            .map(|t| {
                let f = ProcStatus::of_thread(pid, *t).unwrap_or_default();
                let name = std::fs::read_to_string(format!("/proc/{pid}/task/{t}/comm"))
                    .unwrap_or_default();
                json!({
                    "tid": t.to_string(), "name": name.trim(),
                    "seccomp": f.field("Seccomp").unwrap_or(""),
                    "filters": f.field("Seccomp_filters").unwrap_or(""),
                })
            })
            .collect();
        let all_filtered = !threads.is_empty() && threads.iter().all(|t| t["seccomp"] == "2");
        compute.push(fact(
            SECCOMP_FACT,
            How::Observed,
            json!(threads),
            Some(all_filtered),
        ));
        let f = ProcStatus::of_process(pid).unwrap_or_default();
        let field = |name: &str| f.field(name).unwrap_or("");
        let creds = json!({
            "uid": field("Uid"), "gid": field("Gid"), "groups": field("Groups"),
            "cap_eff": field("CapEff"), "cap_prm": field("CapPrm"), "cap_bnd": field("CapBnd"),
            "no_new_privs": field("NoNewPrivs"),
        });
        let unprivileged = f
            .numbers("Uid")
            .is_some_and(|ids| ids.iter().all(|&u| u != 0))
            && field("CapEff") == "0000000000000000"
            && field("CapBnd") == "0000000000000000"
            && field("NoNewPrivs") == "1";
        compute.push(fact(
            "the VM process is not root, holds no capability and can gain none",
            How::Observed,
            creds,
            Some(unprivileged),
        ));
        let mut spaces = serde_json::Map::new();
        let mut separate = true;
        for ns in ["mnt", "pid", "net", "ipc", "uts"] {
            let vm = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).ok();
            let host = std::fs::read_link(format!("/proc/self/ns/{ns}")).ok();
            separate &= vm.is_some() && vm != host;
            spaces.insert(ns.into(), json!(vm.map(|p| p.display().to_string())));
        }
        compute.push(fact(
            "namespaces of its own (not the host's)",
            How::Observed,
            Value::Object(spaces),
            Some(separate),
        ));
        compute.push(fact(
            "cgroup limits",
            How::Observed,
            cgroup_limits(pid),
            None,
        ));
        let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap_or_default();
        let ifaces: Vec<String> = dev
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(|s| s.trim().to_string())
            .collect();
        network.push(fact(
            "network interfaces in the VM process's namespace",
            How::Observed,
            json!(ifaces),
            Some(ifaces.iter().all(|i| i == "lo")),
        ));
    } else {
        compute.push(fact(
            "VM process",
            How::Observed,
            json!("not running"),
            None,
        ));
    }

    // Storage: each disk, its backing file, and that no other live VM has it writable.
    let others: Vec<(String, RawConfig)> = d
        .vms()
        .values()
        .filter(|o| o.id != r.id && o.state.is_live())
        .map(|o| (o.id.clone(), o.config.clone()))
        .collect();
    let mut storage = Vec::new();
    for disk in cfg.disks.iter().flatten() {
        let id = file_id(&disk.path);
        let shared_writable: Vec<&String> = others
            .iter()
            .filter(|(_, c)| {
                c.disks
                    .iter()
                    .flatten()
                    .any(|o| (!o.read_only || !disk.read_only) && file_id(&o.path) == id)
            })
            .map(|(oid, _)| oid)
            .collect();
        storage.push(fact(
            &format!("disk {}", disk.path.display()),
            How::Claimed,
            json!({ "read_only": disk.read_only, "id": disk.id }),
            None,
        ));
        storage.push(fact(
            &format!(
                "disk {}: no other VM has this file writable",
                disk.path.display()
            ),
            How::Tested,
            json!({ "dev_inode": id, "shared_with": shared_writable.len() }),
            Some(id.is_some() && shared_writable.is_empty()),
        ));
    }
    if storage.is_empty() {
        storage.push(fact("disks", How::Claimed, json!([]), None));
    }
    if cfg.nets.as_ref().map_or(true, |n| n.is_empty()) {
        network.push(fact("network devices", How::Claimed, json!([]), None));
    }

    let mut vsock = Vec::new();
    if let Some(v) = &cfg.vsock {
        let jail_root = d.config.run_dir.join("jail").join(&r.id).join("root");
        let host: PathBuf = jail_root
            .join(crate::jail::vm::SOCKET_DIR.trim_start_matches('/'))
            .join(v.uds.file_name().unwrap_or_default());
        vsock.push(fact("guest CID", How::Claimed, json!(v.cid), None));
        // Hybrid vsock: the host side of a VM's vsock is its sockets, not its CID, so a CID
        // need not be unique; what keeps VMs apart is where their sockets are.
        vsock.push(fact(
            "the host reaches this guest only through its own sockets (the CID addresses nothing on the host)",
            How::Claimed,
            json!({"host_side": "unix sockets", "cid": v.cid}),
            None,
        ));
        vsock.push(fact(
            "its sockets (PATH and PATH_PORT) are in its own jail directory, which no other VM sees",
            How::Tested,
            json!(host),
            Some(host.starts_with(&jail_root) && (!r.state.is_live() || host.exists())),
        ));
    } else {
        vsock.push(fact("vsock", How::Claimed, json!(null), None));
    }

    let tenant = d.config.tenants.get(&r.tenant);
    let management = vec![
        fact(
            "who may act on this VM: members of its tenant, through the tenant's socket",
            How::Claimed,
            json!({ "tenant": r.tenant, "uids": tenant.map(|t| t.uids.clone()) }),
            None,
        ),
        fact(
            "admins, through the admin socket, only with a reason that is audited and alerted",
            How::Claimed,
            json!({ "admins": d.config.admins }),
            None,
        ),
    ];
    let planes = Planes {
        memory,
        compute,
        storage,
        network,
        vsock,
        management,
    };
    let failed_checks = planes
        .each()
        .iter()
        .flat_map(|(_, facts)| facts.iter())
        .filter(|f| f.ok == Some(false))
        .count();
    Report {
        vm: r.id.clone(),
        tenant: r.tenant.clone(),
        state: r.state,
        generated: vms::now_rfc3339(),
        bulkhead: env!("CARGO_PKG_VERSION").to_string(),
        failed_checks,
        planes,
    }
}

impl Report {
    /// The number of threads the report saw, if every one of them is under seccomp (else 0):
    /// how a caller tells that a VM process is jailed and running.
    pub fn confined_threads(&self) -> usize {
        self.planes
            .compute
            .iter()
            .find(|f| f.fact == SECCOMP_FACT)
            .filter(|f| f.ok == Some(true))
            .and_then(|f| f.value.as_array().map(Vec::len))
            .unwrap_or(0)
    }

    /// The report as Markdown: one table per plane.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "# Isolation report: VM {} (tenant {})\n\nGenerated {} by bulkhead {}; state {}; {} failed checks.\n",
            self.vm,
            self.tenant,
            self.generated,
            self.bulkhead,
            serde_json::to_value(self.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            self.failed_checks,
        );
        for (plane, facts) in self.planes.each() {
            out.push_str(&format!("\n## {plane}\n\n"));
            let rows = facts.iter().map(|f| {
                let ok = match f.ok {
                    Some(true) => "yes",
                    Some(false) => "**NO**",
                    None => "",
                };
                let how = serde_json::to_value(f.how)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                vec![
                    markdown::cell(&f.fact),
                    how,
                    format!("`{}`", markdown::cell(&f.value.to_string())),
                    ok.to_string(),
                ]
            });
            markdown::table(&mut out, &["fact", "how", "value", "ok"], rows);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_renders_each_plane_as_a_table_and_marks_what_fails() {
        let facts = |ok| vec![fact("a | b", How::Tested, json!({"x": "y|z"}), ok)];
        let report = Report {
            vm: "vm1".into(),
            tenant: "acme".into(),
            state: VmState::Running,
            generated: "2026-12-05T00:00:00Z".into(),
            bulkhead: "0.1.0".into(),
            failed_checks: 1,
            planes: Planes {
                memory: facts(Some(false)),
                compute: facts(Some(true)),
                storage: facts(None),
                network: vec![],
                vsock: vec![],
                management: vec![],
            },
        };
        let md = report.markdown();
        assert!(
            md.starts_with("# Isolation report: VM vm1 (tenant acme)\n"),
            "{md}"
        );
        assert!(md.contains("state running; 1 failed checks"), "{md}");
        assert!(
            md.contains("## memory\n\n| fact | how | value | ok |\n|---|---|---|---|\n| a \\| b | tested | `{\"x\":\"y\\|z\"}` | **NO** |\n"),
            "{md}"
        );
        assert!(
            md.contains("| tested | `{\"x\":\"y\\|z\"}` | yes |"),
            "{md}"
        );
        // What a client reads back is the same report.
        let text = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&text).unwrap(), report);
    }
}
