//! The nested lane's figures: Linux boot to /init and virtio-blk throughput, from the RESULT
//! lines of scripts/stock-boot-bench and scripts/blk-bench.

use std::path::Path;
use std::process::Command;

use crate::report::{Figure, Goal};
use crate::Options;

/// The RESULT lines a lane script printed.
fn lane_script(root: &Path, script: &str, env: &[(&str, String)]) -> Vec<String> {
    eprintln!("bench: scripts/{script} in the nested lane");
    let out = Command::new(root.join("scripts").join(script))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run a lane script");
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        eprintln!(
            "bench: scripts/{script} failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    text.lines()
        .filter(|l| l.starts_with("RESULT ") && !l.contains("FAILED"))
        .map(str::to_string)
        .collect()
}

pub fn figures(root: &Path, o: &Options) -> Vec<Figure> {
    let peer = o
        .peer
        .as_ref()
        .map_or("none".to_string(), |p| p.display().to_string());
    let common = [
        ("BULKHEAD_BIN", o.bulkhead.display().to_string()),
        ("FIRECRACKER", peer),
    ];
    let mut env = common.to_vec();
    env.push(("ROUNDS", o.lane_rounds.to_string()));
    let mut boot: Vec<(&'static str, Vec<f64>)> =
        vec![("bulkhead", vec![]), ("firecracker", vec![])];
    for line in lane_script(root, "stock-boot-bench", &env) {
        // RESULT <vmm> init <ms> ms end <ms> ms
        let w: Vec<&str> = line.split_whitespace().collect();
        if let (Some(vmm), Some(init)) = (w.get(1), w.get(3).and_then(|s| s.parse::<f64>().ok())) {
            if let Some((_, v)) = boot.iter_mut().find(|(n, _)| n == vmm) {
                v.push(init / 1000.0);
            }
        }
    }
    boot.retain(|(_, v)| !v.is_empty());
    let mut read: Vec<(&'static str, Vec<f64>)> = vec![
        ("bulkhead", vec![]),
        ("firecracker", vec![]),
        ("l1-host", vec![]),
    ];
    let mut write = read.clone();
    for _ in 0..o.lane_rounds.clamp(1, 3) {
        for line in lane_script(root, "blk-bench", &common) {
            // RESULT <who>-<read|write> <size> MiB in <ms> ms: <rate> MiB/s
            let w: Vec<&str> = line.split_whitespace().collect();
            let (Some(who), Some(rate)) = (w.get(1), w.get(7).and_then(|s| s.parse::<f64>().ok()))
            else {
                continue;
            };
            let (name, table) = match *who {
                "guest-read" => ("bulkhead", &mut read),
                "guest-write" => ("bulkhead", &mut write),
                "firecracker-guest-read" => ("firecracker", &mut read),
                "firecracker-guest-write" => ("firecracker", &mut write),
                "host-read" => ("l1-host", &mut read),
                "host-write" => ("l1-host", &mut write),
                _ => continue,
            };
            if let Some((_, v)) = table.iter_mut().find(|(n, _)| *n == name) {
                v.push(rate);
            }
        }
    }
    read.retain(|(_, v)| !v.is_empty());
    write.retain(|(_, v)| !v.is_empty());
    let blk = "dd bs=1M of 128 MiB on a raw file (virtio-blk in the guest, the file itself on \
               the L1 host), write with fsync, read with L1's page cache dropped; a fresh boot \
               per phase; times from /proc/uptime (10 ms steps)";
    vec![
        Figure {
            key: "linux_boot",
            label: "Linux boot to /init (nested lane)".to_string(),
            unit: "s",
            higher_is_better: false,
            samples: boot,
            goals: vec![Goal::at_most("bulkhead", "firecracker", 0.95)],
            method: "Debian's stock cloud kernel (6.1) with an initramfs, 2 vCPUs, 256 MiB, in \
                     the nested lane (QEMU TCG L1 with KVM); VMM start to /init saying it is \
                     ready, from L1's /proc/uptime"
                .to_string(),
        },
        Figure {
            key: "blk_read",
            label: "virtio-blk sequential read (nested lane)".to_string(),
            unit: "MiB/s",
            higher_is_better: true,
            samples: read,
            goals: vec![Goal::at_least("bulkhead", "firecracker", 1.0)],
            method: blk.to_string(),
        },
        Figure {
            key: "blk_write",
            label: "virtio-blk sequential write (nested lane)".to_string(),
            unit: "MiB/s",
            higher_is_better: true,
            samples: write,
            goals: vec![Goal::at_least("bulkhead", "firecracker", 1.0)],
            method: blk.to_string(),
        },
    ]
}
