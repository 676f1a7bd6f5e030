//! The checks themselves, each mapped to the CLD.9.5.1 planes it evidences.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::api::client::{Answer, ClientError};

use super::host::{
    as_json, can_open_as, create, files_under, get, request_as, status, uid_of, wait_ended,
    wait_running, Host,
};
use super::{Check, ATTACKS, TENANT_A, TENANT_B};

/// True when a create was refused the way the daemon promises for a file the tenant may not
/// use: 403, naming the tenant. Any other failure (a 500, a lost connection, a 422 for a
/// path that is merely malformed) proves nothing about isolation.
fn refused_as_promised(r: &Result<String, Value>, tenant: &str) -> bool {
    let Err(e) = r else { return false };
    let promised = format!("is not a file tenant {tenant} may use");
    e["status"] == json!(403)
        && e["answer"]["error"]
            .as_str()
            .is_some_and(|m| m.ends_with(&promised))
}

/// True when the socket refused the connection itself: its mode lets only its owner in. An
/// answer of any status, or another failure, is not that.
fn permission_denied(a: &Result<Answer, ClientError>) -> bool {
    matches!(a, Err(ClientError::Connect { source, .. })
        if source.kind() == std::io::ErrorKind::PermissionDenied)
}

pub(super) fn run_checks(h: &Host) -> Vec<Check> {
    let mut checks = Vec::new();
    let (a, b) = (TENANT_A, TENANT_B);
    let vm_a = create(
        h,
        a,
        json!({"kernel": h.file(a.0, "exitcodes"), "cmdline": "mode=idle",
               "disks": [{"path": h.file(a.0, "disk.img")}],
               "vsock": {"cid": 71_001, "uds": "/run/x"}}),
    );
    // B's socket is named as A's guest's connection to port 5000 would be: before the jail,
    // the two met in one directory.
    let vm_b = create(
        h,
        b,
        json!({"kernel": h.file(b.0, "exitcodes"), "cmdline": "mode=idle",
               "disks": [{"path": h.file(b.0, "disk.img")}],
               "vsock": {"cid": 71_002, "uds": "/run/x_5000"}}),
    );
    let (Ok(vm_a), Ok(vm_b)) = (vm_a.clone(), vm_b.clone()) else {
        checks.push(Check {
            id: "vms_start",
            planes: &["compute"],
            claim: "each tenant's VM starts under the daemon",
            pass: false,
            evidence: json!({"tenant_a": vm_a.err(), "tenant_b": vm_b.err()}),
        });
        return checks;
    };
    let report_a = wait_running(h, a, &vm_a);
    let report_b = wait_running(h, b, &vm_b);
    let info_a = get(h, a, &format!("/v1/vms/{vm_a}"));
    let info_b = get(h, b, &format!("/v1/vms/{vm_b}"));
    let pid_a = info_a["vm_process_pid"].as_i64().unwrap_or(0);
    let pid_b = info_b["vm_process_pid"].as_i64().unwrap_or(0);

    // Management plane: nothing of B's VM is reachable from A's socket.
    let missing = "00000000000000000000000000000000";
    let mut answers = Vec::new();
    let mut same = true;
    for &(method, suffix) in crate::api::serve::routes::VM_ENDPOINTS {
        let theirs = request_as(
            a.1,
            &h.socket(Some(a.0)),
            method,
            &format!("/v1/vms/{vm_b}{suffix}"),
            None,
            None,
        );
        let none = request_as(
            a.1,
            &h.socket(Some(a.0)),
            method,
            &format!("/v1/vms/{missing}{suffix}"),
            None,
            None,
        );
        let (st, sn) = (status(&theirs), status(&none));
        same &= st == json!(404)
            && sn == json!(404)
            && as_json(&theirs)["error"] == json!(format!("no VM {vm_b}"))
            && as_json(&none)["error"] == json!(format!("no VM {missing}"));
        answers.push(json!({"request": format!("{method} /v1/vms/B{suffix}"), "status": st, "missing_vm_status": sn}));
    }
    let listed = get(h, a, "/v1/vms");
    let lists_b = listed["vms"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|v| v["id"] == json!(vm_b));
    checks.push(Check {
        id: "api_cross_tenant",
        planes: &["management"],
        claim: "tenant A can not list, read, stop, pause, resume or delete B's VM, nor read its metrics, alerts or report; each answer is the one for a VM that does not exist",
        pass: same && !lists_b,
        evidence: json!({"answers": answers, "a_lists_b": lists_b}),
    });
    let foreign = request_as(b.1, &h.socket(Some(a.0)), "GET", "/v1/vms", None, None);
    let tenant_on_admin = request_as(a.1, &h.socket(None), "GET", "/v1/vms", None, None);
    checks.push(Check {
        id: "sockets_per_tenant",
        planes: &["management"],
        claim: "B's uid can not use A's socket, and no tenant can use the admin socket",
        pass: permission_denied(&foreign) && permission_denied(&tenant_on_admin),
        evidence: json!({"b_on_a_socket": status(&foreign), "a_on_admin_socket": status(&tenant_on_admin)}),
    });
    let no_reason = request_as(
        0,
        &h.socket(None),
        "GET",
        &format!("/v1/vms/{vm_a}"),
        None,
        None,
    );
    let with_reason = request_as(
        0,
        &h.socket(None),
        "GET",
        &format!("/v1/vms/{vm_a}"),
        None,
        Some("bulkhead audit: break-glass check"),
    );
    checks.push(Check {
        id: "admin_break_glass",
        planes: &["management", "logs"],
        claim: "an admin acting on a tenant's VM is refused without a reason, and allowed with one",
        pass: status(&no_reason) == json!(403) && status(&with_reason) == json!(200),
        evidence: json!({"without_reason": status(&no_reason), "with_reason": status(&with_reason)}),
    });

    // Storage: A can not start a VM on B's files.
    let link = h.file(a.0, "link-to-b");
    let _ = std::os::unix::fs::symlink(h.file(b.0, "disk.img"), &link);
    let mut refusals = Vec::new();
    for (what, body) in [
        ("B's kernel", json!({"kernel": h.file(b.0, "exitcodes")})),
        (
            "B's disk",
            json!({"kernel": h.file(a.0, "exitcodes"), "disks": [{"path": h.file(b.0, "disk.img")}]}),
        ),
        (
            "B's disk through a symlink in A's directory",
            json!({"kernel": h.file(a.0, "exitcodes"), "disks": [{"path": link}]}),
        ),
    ] {
        let r = create(h, a, body);
        refusals.push(
            json!({"attempt": what, "refused": refused_as_promised(&r, a.0), "answer": r.err()}),
        );
    }
    checks.push(Check {
        id: "create_with_other_tenants_files",
        planes: &["storage", "management"],
        claim:
            "tenant A can not create a VM with B's kernel or disk, directly or through a symlink",
        pass: refusals.iter().all(|r| r["refused"] == json!(true)),
        evidence: json!(refusals),
    });
    let root_a = PathBuf::from(format!("/proc/{pid_a}/root"));
    let seen = files_under(&root_a);
    let b_disk = h.file(b.0, "disk.img");
    let b_disk_inside = root_a.join(b_disk.strip_prefix("/").unwrap_or(&b_disk));
    checks.push(Check {
        id: "vm_process_cannot_open_other_files",
        planes: &["storage"],
        claim: "A's VM process sees only its own files (kernel, disk, /dev/kvm, its vsock socket): B's disk does not exist in its root",
        pass: pid_a > 0 && !b_disk_inside.exists() && !seen.is_empty()
            && seen.iter().all(|f| f == "/dev/kvm" || f == "/vsock/x" || f.contains(a.0)),
        evidence: json!({"files_in_a_root": seen, "b_disk_visible": b_disk_inside.exists()}),
    });

    // Memory: A's VM process can not read B's.
    let uid_a = uid_of(pid_a).unwrap_or(0);
    let reads_b = can_open_as(uid_a, PathBuf::from(format!("/proc/{pid_b}/mem")));
    let mem_fact = |r: &Value| {
        r["planes"]["memory"]
            .as_array()
            .and_then(|m| {
                m.iter().find(|f| {
                    f["fact"]
                        .as_str()
                        .is_some_and(|t| t.starts_with("guest RAM backing"))
                })
            })
            .cloned()
            .unwrap_or(Value::Null)
    };
    checks.push(Check {
        id: "memory_private",
        planes: &["memory"],
        claim: "each VM's RAM is private anonymous memory in a process alone in its pid namespace, and A's VM process uid can not open B's memory",
        pass: uid_a != 0 && !reads_b && mem_fact(&report_a)["ok"] == json!(true) && mem_fact(&report_b)["ok"] == json!(true),
        evidence: json!({"a_uid": uid_a, "a_opens_b_mem": reads_b, "a_ram": mem_fact(&report_a), "b_ram": mem_fact(&report_b)}),
    });

    // vsock and network.
    let a_port_5000 = root_a.join("vsock/x_5000");
    let b_socket = h.dir.join("run/jail").join(&vm_b).join("root/vsock/x_5000");
    checks.push(Check {
        id: "vsock_paths_apart",
        planes: &["network"],
        claim: "the socket A's guest reaches for host port 5000 is in A's jail: B's socket of that name, in B's jail, is out of its reach",
        pass: b_socket.exists() && !a_port_5000.exists(),
        evidence: json!({"b_socket_on_host": b_socket, "b_socket_exists": b_socket.exists(),
                         "a_sees_a_socket_at_its_port_5000_path": a_port_5000.exists()}),
    });
    let net_a = std::fs::read_link(format!("/proc/{pid_a}/ns/net")).ok();
    let net_b = std::fs::read_link(format!("/proc/{pid_b}/ns/net")).ok();
    let ifaces = |pid: i64| {
        std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
            .unwrap_or_default()
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next().map(|s| s.trim().to_string()))
            .collect::<Vec<_>>()
    };
    checks.push(Check {
        id: "network_namespaces_apart",
        planes: &["network"],
        claim: "each VM process has a network namespace of its own with nothing but loopback; the guests have no network device between them",
        pass: net_a.is_some() && net_a != net_b && ifaces(pid_a) == ["lo"] && ifaces(pid_b) == ["lo"],
        evidence: json!({"a_netns": net_a.map(|p| p.display().to_string()), "b_netns": net_b.map(|p| p.display().to_string()),
                         "a_interfaces": ifaces(pid_a), "b_interfaces": ifaces(pid_b)}),
    });

    // Compute: seccomp everywhere, jailed.
    let failed = |r: &Value| r["failed_checks"].as_u64().unwrap_or(u64::MAX);
    checks.push(Check {
        id: "jailed_and_confined",
        planes: &["compute", "memory"],
        claim: "every VM process is jailed (own namespaces, not root, no capabilities, no_new_privs) and every thread is under seccomp",
        pass: failed(&report_a) == 0 && failed(&report_b) == 0,
        evidence: json!({"tenant_a": report_a["planes"]["compute"], "tenant_b": report_b["planes"]["compute"]}),
    });

    // The attack corpus, run in A's compartment while B's VM runs on.
    let mut results = Vec::new();
    let mut all_detected = true;
    for attack in ATTACKS {
        let outcome = match create(h, a, json!({"kernel": h.file(a.0, attack)})) {
            Ok(id) => {
                let ended = wait_ended(h, a, &id);
                let alerts = request_as(
                    a.1,
                    &h.socket(Some(a.0)),
                    "GET",
                    &format!("/v1/vms/{id}/alerts"),
                    None,
                    None,
                );
                let text = alerts
                    .map(|x| String::from_utf8_lossy(&x.body).to_string())
                    .unwrap_or_default();
                let detected = text.lines().any(|l| {
                    serde_json::from_str::<Value>(l).is_ok_and(|v| v["rule"] == json!(attack))
                });
                all_detected &= detected;
                json!({"attack": attack, "detected": detected, "vm_end": ended["exit"]})
            }
            Err(e) => {
                all_detected = false;
                json!({"attack": attack, "detected": false, "refused": e})
            }
        };
        results.push(outcome);
    }
    let b_after = get(h, b, &format!("/v1/vms/{vm_b}"));
    let b_alerts = request_as(
        b.1,
        &h.socket(Some(b.0)),
        "GET",
        &format!("/v1/vms/{vm_b}/alerts"),
        None,
        None,
    )
    .map(|x| x.body.len())
    .unwrap_or(usize::MAX);
    checks.push(Check {
        id: "attack_corpus",
        planes: &["compute", "memory", "logs"],
        claim: "every attack from the corpus run in A's VMs is detected (its alert raised) and contained: B's VM runs on with no alert",
        pass: all_detected && b_after["state"] == json!("running") && b_alerts == 0,
        evidence: json!({"attacks": results, "b_state_after": b_after["state"], "b_alert_bytes": b_alerts}),
    });

    // Logs: every refused cross-tenant attempt is in the audit log, the chain holds.
    let audit_path = h.dir.join("audit.jsonl");
    let audit_text = std::fs::read_to_string(&audit_path).unwrap_or_default();
    let cross = audit_text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| {
            e["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("cross_tenant"))
        })
        .count();
    let chain = crate::api::serve::audit_log::verify_file(&audit_path);
    let intact = matches!(chain, Ok(Ok(_)));
    let alerts = std::fs::read_to_string(h.dir.join("state/alerts.jsonl")).unwrap_or_default();
    let cross_alerts = alerts
        .lines()
        .filter(|l| l.contains("\"management_cross_tenant\""))
        .count();
    let override_alerts = alerts
        .lines()
        .filter(|l| l.contains("\"management_admin_override\""))
        .count();
    checks.push(Check {
        id: "audit_trail",
        planes: &["logs", "management"],
        claim: "every refused cross-tenant request is in the hash-chained audit log and raised management_cross_tenant; the admin's override raised management_admin_override; the chain verifies",
        pass: intact && cross == answers.len() && cross_alerts == cross && override_alerts == 1,
        evidence: json!({"cross_tenant_entries": cross, "cross_tenant_requests": answers.len(),
                         "cross_tenant_alerts": cross_alerts, "admin_override_alerts": override_alerts,
                         "chain_intact": intact}),
    });

    for (t, id) in [(a, &vm_a), (b, &vm_b)] {
        let _ = request_as(
            t.1,
            &h.socket(Some(t.0)),
            "POST",
            &format!("/v1/vms/{id}/stop"),
            None,
            None,
        );
        wait_ended(h, t, id);
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_promised_403_counts_as_a_refused_create() {
        let answer = |status: u16, error: &str| -> Result<String, Value> {
            Err(json!({"status": status, "answer": {"error": error}}))
        };
        let promised = "disk /srv/b/disk.img is not a file tenant tenant-a may use";
        assert!(refused_as_promised(&answer(403, promised), "tenant-a"));
        assert!(!refused_as_promised(&answer(500, promised), "tenant-a"));
        assert!(!refused_as_promised(&answer(403, "quota: no"), "tenant-a"));
        assert!(!refused_as_promised(&answer(403, promised), "tenant-b"));
        assert!(!refused_as_promised(&Ok("vm-1".into()), "tenant-a"));
        let no_connection: Result<String, Value> =
            Err(json!({"status": "no connection: refused", "answer": null}));
        assert!(!refused_as_promised(&no_connection, "tenant-a"));
    }

    #[test]
    fn only_a_connection_refused_for_permission_counts_as_a_closed_socket() {
        let connect = |kind| -> Result<Answer, ClientError> {
            Err(ClientError::Connect {
                path: PathBuf::from("/run/x.sock"),
                source: std::io::Error::from(kind),
            })
        };
        assert!(permission_denied(&connect(
            std::io::ErrorKind::PermissionDenied
        )));
        assert!(!permission_denied(&connect(std::io::ErrorKind::NotFound)));
        assert!(!permission_denied(&connect(
            std::io::ErrorKind::ConnectionRefused
        )));
    }
}
