//! Firecracker's API, request by request: its paths, bodies, status codes and
//! `{"fault_message"}` errors, and which calls it allows before and after InstanceStart.

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::model::{
    ActionType, BootSource, Drive, EntropyDevice, InstanceActionInfo, InstanceInfo, Logger,
    MachineConfiguration, MachineConfigurationPatch, Metrics, NetworkInterface, PartialDrive,
    PartialNetworkInterface, SnapshotCreateParams, SnapshotLoadParams, Vm, VmStateRequest, Vsock,
};
use super::state::Phase;
use super::Personality;

/// The version Kata pins, which `GET /version` and `--version` report.
pub const FIRECRACKER_VERSION: &str = "1.12.1";

const BEFORE: &str = "The requested operation is not supported before starting the microVM.";
const AFTER: &str = "The requested operation is not supported after starting the microVM.";

/// An answer: status and JSON body (none for 204).
#[derive(Debug, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: Option<Value>,
}

fn ok() -> Answer {
    Answer {
        status: 204,
        body: None,
    }
}

fn json_ok(v: Value) -> Answer {
    Answer {
        status: 200,
        body: Some(v),
    }
}

pub fn fault(message: impl Into<String>) -> Answer {
    Answer {
        status: 400,
        body: Some(json!({ "fault_message": message.into() })),
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Answer> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(fault("Empty PUT request."));
    }
    serde_json::from_slice(body).map_err(|e| {
        fault(format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

/// Features Firecracker has and bulkhead refuses, by path: never a 2xx that does nothing.
fn unsupported(path: &str) -> Option<&'static str> {
    let first = path.split('/').nth(1).unwrap_or("");
    Some(match first {
        "balloon" => "the balloon device",
        "mmds" => "the microVM metadata service (MMDS)",
        "hotplug" => "memory hotplug",
        "cpu-config" => "custom CPU templates",
        "pmem" => "pmem devices",
        "serial" => "serial output redirection",
        _ => return None,
    })
}

/// Answers one request.
pub fn route(p: &mut Personality, method: &str, path: &str, body: &[u8]) -> Answer {
    let path = path.trim_end_matches('/');
    let path = if path.is_empty() { "/" } else { path };
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    let started = p.phase != Phase::NotStarted;
    p.count_request(method, &parts, None);
    let answer = match (method, parts.as_slice()) {
        ("GET", [""]) => json_ok(
            serde_json::to_value(InstanceInfo {
                id: p.id.clone(),
                state: p.phase.name(),
                vmm_version: FIRECRACKER_VERSION.to_string(),
                app_name: "Firecracker",
            })
            .unwrap_or(Value::Null),
        ),
        ("GET", ["version"]) => json_ok(json!({ "firecracker_version": FIRECRACKER_VERSION })),
        ("GET", ["machine-config"]) => {
            json_ok(serde_json::to_value(&p.pending.machine).unwrap_or(Value::Null))
        }
        ("GET", ["vm", "config"]) => json_ok(p.pending.full_config()),
        (_, _) if started && is_pre_boot_only(method, &parts) => fault(AFTER),
        (_, _) if !started && is_post_boot_only(method, &parts) => fault(BEFORE),
        ("PUT", ["machine-config"]) => match parse::<MachineConfiguration>(body) {
            Ok(m) => p.pending.set_machine(m).map_or_else(|e| fault(e.to_string()), |()| ok()),
            Err(a) => a,
        },
        ("PATCH", ["machine-config"]) => match parse::<MachineConfigurationPatch>(body) {
            Ok(patch) => {
                let mut m = p.pending.machine.clone();
                m.vcpu_count = patch.vcpu_count.unwrap_or(m.vcpu_count);
                m.mem_size_mib = patch.mem_size_mib.unwrap_or(m.mem_size_mib);
                m.smt = patch.smt.unwrap_or(m.smt);
                m.track_dirty_pages = patch.track_dirty_pages.unwrap_or(m.track_dirty_pages);
                m.cpu_template = patch.cpu_template.or(m.cpu_template);
                m.huge_pages = patch.huge_pages.unwrap_or(m.huge_pages);
                p.pending.set_machine(m).map_or_else(|e| fault(e.to_string()), |()| ok())
            }
            Err(a) => a,
        },
        ("PUT", ["boot-source"]) => match parse::<BootSource>(body) {
            Ok(b) => match open_regular(&p.resolve(&b.kernel_image_path)) {
                Ok(()) => {
                    p.pending.boot = Some(b);
                    ok()
                }
                Err(e) => fault(format!(
                    "Boot source error: The kernel file cannot be opened: {e}"
                )),
            },
            Err(a) => a,
        },
        ("PUT", ["drives", id]) => match parse::<Drive>(body) {
            Ok(d) if d.drive_id != *id => {
                fault("The id from the path does not match the id from the body!")
            }
            Ok(d) => {
                let missing = d
                    .path_on_host
                    .as_ref()
                    .map(|f| p.resolve(f))
                    .filter(|f| std::fs::metadata(f).is_err());
                match missing {
                    Some(f) => fault(format!(
                        "Drive config error: Unable to create the virtio block device: Virtio backend error: Error manipulating the backing file: No such file or directory (os error 2) {}",
                        f.display()
                    )),
                    None => p.pending.put_drive(d).map_or_else(|e| fault(e.to_string()), |()| ok()),
                }
            }
            Err(a) => a,
        },
        ("PATCH", ["drives", id]) => match parse::<PartialDrive>(body) {
            Ok(d) if d.drive_id != *id => {
                fault("The id from the path does not match the id from the body!")
            }
            Ok(d) => p.patch_drive(d).map_or_else(|e| fault(e.to_string()), |()| ok()),
            Err(a) => a,
        },
        ("PUT", ["network-interfaces", id]) => match parse::<NetworkInterface>(body) {
            Ok(n) if n.iface_id != *id => fault(format!(
                "The id from the path [{id}] does not match the id from the body [{}]!",
                n.iface_id
            )),
            Ok(n) => p.pending.put_net(n).map_or_else(|e| fault(e.to_string()), |()| ok()),
            Err(a) => a,
        },
        ("PATCH", ["network-interfaces", id]) => match parse::<PartialNetworkInterface>(body) {
            Ok(n) if n.iface_id != *id => fault(format!(
                "The id from the path [{id}] does not match the id from the body [{}]!",
                n.iface_id
            )),
            Ok(n) if !p.pending.nets.iter().any(|o| o.iface_id == n.iface_id) => fault(
                "Network config error: Unable to update the net device: Failed perform action on device: Device not found",
            ),
            Ok(n) => {
                // Accepted, as Firecracker does; a running VM keeps the limits it started with,
                // and the log says so.
                log::warn!(
                    "PATCH /network-interfaces/{}: a running VM keeps the rate limiters it started with; the new ones are not applied",
                    n.iface_id
                );
                ok()
            }
            Err(a) => a,
        },
        ("PUT", ["vsock"]) => match parse::<Vsock>(body) {
            Ok(v) => {
                if v.vsock_id.is_some() {
                    log::warn!("PUT /vsock: vsock_id field is deprecated.");
                }
                p.pending.vsock = Some(v);
                ok()
            }
            Err(a) => a,
        },
        ("PUT", ["entropy"]) => match parse::<EntropyDevice>(body) {
            Ok(e) => {
                p.pending.entropy = Some(e);
                ok()
            }
            Err(a) => a,
        },
        ("PUT", ["logger"]) => match parse::<Logger>(body) {
            Ok(l) => p.set_logger(l).map_or_else(|e| fault(e.to_string()), |()| ok()),
            Err(a) => a,
        },
        ("PUT", ["metrics"]) => match parse::<Metrics>(body) {
            Ok(m) => p.set_metrics(m).map_or_else(|e| fault(e.to_string()), |()| ok()),
            Err(a) => a,
        },
        ("PUT", ["actions"]) => match parse::<InstanceActionInfo>(body) {
            Ok(a) => match a.action_type {
                ActionType::InstanceStart => p.start().map_or_else(|e| fault(e.to_string()), |()| ok()),
                ActionType::FlushMetrics => p.flush_metrics().map_or_else(|e| fault(e.to_string()), |()| ok()),
                ActionType::SendCtrlAltDel => p.ctrl_alt_del().map_or_else(|e| fault(e.to_string()), |()| ok()),
            },
            Err(a) => a,
        },
        ("PUT", ["snapshot", "create"]) => match parse::<SnapshotCreateParams>(body) {
            Ok(s) => p.snapshot_create(s).map_or_else(|e| fault(e.to_string()), |()| ok()),
            Err(a) => a,
        },
        ("PUT", ["snapshot", "load"]) => match parse::<SnapshotLoadParams>(body) {
            Ok(s) => p.snapshot_load(s).map_or_else(|e| fault(e.to_string()), |()| ok()),
            Err(a) => a,
        },
        ("PATCH", ["vm"]) => match parse::<Vm>(body) {
            Ok(vm) => p
                .pause(vm.state == VmStateRequest::Paused)
                .map_or_else(|e| fault(e.to_string()), |()| ok()),
            Err(a) => a,
        },
        _ => match unsupported(path) {
            Some(what) => fault(format!(
                "{method} {path}: {what} is not supported by bulkhead"
            )),
            None => fault(format!(
                "Invalid request method and/or path: {method} {}.",
                path.trim_start_matches('/')
            )),
        },
    };
    p.count_request(method, &parts, Some(answer.status >= 300));
    // As in Firecracker, configuring any boot resource (every pre-boot call but the logger's
    // and the metrics') rules out loading a snapshot into this process.
    let boot_resource = is_pre_boot_only(method, &parts)
        && !matches!(
            parts.as_slice(),
            ["logger" | "metrics"] | ["snapshot", "load"]
        );
    if boot_resource && answer.status < 300 {
        p.pending.boot_path = true;
    }
    answer
}

/// Calls Firecracker allows only before InstanceStart.
fn is_pre_boot_only(method: &str, parts: &[&str]) -> bool {
    matches!(
        (method, parts),
        (
            "PUT",
            ["machine-config" | "boot-source" | "vsock" | "entropy" | "logger" | "metrics"]
        ) | ("PATCH", ["machine-config"])
            | ("PUT", ["drives" | "network-interfaces", _])
            | ("PUT", ["snapshot", "load"])
    )
}

/// Calls Firecracker allows only after InstanceStart.
fn is_post_boot_only(method: &str, parts: &[&str]) -> bool {
    matches!(
        (method, parts),
        ("PATCH", ["drives" | "network-interfaces", _])
            | ("PATCH", ["vm"])
            | ("PUT", ["snapshot", "create"])
    )
}

/// Checks that `path` opens as a regular file, without waiting on a FIFO.
fn open_regular(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if f.metadata()?.is_file() {
        Ok(())
    } else {
        Err(std::io::Error::other("not a regular file"))
    }
}
