//! Start-to-exit time, CPU time and peak RSS of a whole `bulkhead run` on the freestanding
//! test guest, next to Firecracker on the same guest when ../shared/anchors/firecracker is
//! present. Run with `cargo bench --bench boot`; `BENCH_RUNS=N` sets the sample count.
//!
//! Both VMMs boot `exitcodes mode=reset`: it prints one line on the serial port and resets
//! through the i8042, the one way to end a VM that both understand. `BULKHEAD_COMPARE=PATH`
//! also runs another bulkhead binary, alternating run by run, and prints the difference of the
//! medians. Peak RSS is the larger of bulkhead's two processes (what wait4 reports).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Sample {
    wall: Duration,
    cpu: Duration,
    max_rss_kib: i64,
    status: i32,
}

fn run_once(cmd: &mut Command) -> Sample {
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not yet reaped; `status` and `usage` are valid for writes.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    assert_eq!(rc, pid, "wait4 failed");
    std::mem::forget(child); // already reaped by wait4
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Sample {
        wall,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss,
        status: if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        },
    }
}

fn report(name: &str, mut samples: Vec<Sample>) {
    assert!(
        samples.iter().all(|s| s.status == 0),
        "{name}: a run did not exit 0"
    );
    samples.sort_by_key(|s| s.wall);
    let n = samples.len();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = &samples[n / 2];
    let mut cpu: Vec<Duration> = samples.iter().map(|s| s.cpu).collect();
    cpu.sort();
    let mut rss: Vec<i64> = samples.iter().map(|s| s.max_rss_kib).collect();
    rss.sort();
    println!(
        "{name:<28} runs={n:<3} wall median={:>6.2} ms min={:>6.2} ms p90={:>6.2} ms  cpu median={:>5.2} ms  peak RSS median={:>5.1} MiB",
        ms(median.wall),
        ms(samples[0].wall),
        ms(samples[(n * 9 / 10).min(n - 1)].wall),
        ms(cpu[n / 2]),
        rss[n / 2] as f64 / 1024.0,
    );
}

fn main() {
    let Some(runs) = common::rounds("boot", 50) else {
        return;
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let guest = common::guest("exitcodes");
    let bulkhead = env!("CARGO_BIN_EXE_bulkhead");
    // BULKHEAD_COMPARE=PATH adds another bulkhead build (an earlier commit, say), run by run
    // in turn with this one, so both see the same machine.
    let compare = std::env::var("BULKHEAD_COMPARE").ok();
    let mut configs: Vec<(String, String, Vec<&str>)> = vec![
        ("bulkhead (seccomp on)".into(), bulkhead.into(), vec![]),
        (
            "bulkhead (--no-seccomp)".into(),
            bulkhead.into(),
            vec!["--no-seccomp"],
        ),
    ];
    if let Some(other) = &compare {
        configs.push((format!("{other} (seccomp on)"), other.clone(), vec![]));
    }
    let mut samples: Vec<Vec<Sample>> = configs.iter().map(|_| Vec::new()).collect();
    for _ in 0..runs {
        for ((_, binary, extra), out) in configs.iter().zip(samples.iter_mut()) {
            let mut cmd = Command::new(binary);
            cmd.args(["run", "--kernel"]).arg(&guest).args([
                "--cmdline",
                "mode=reset",
                "--log-level",
                "error",
            ]);
            cmd.args(extra);
            out.push(run_once(&mut cmd));
        }
    }
    let medians: Vec<f64> = samples
        .iter()
        .map(|s| {
            let mut w: Vec<Duration> = s.iter().map(|x| x.wall).collect();
            w.sort();
            w[w.len() / 2].as_secs_f64() * 1000.0
        })
        .collect();
    for ((name, _, _), s) in configs.iter().zip(samples) {
        report(name, s);
    }
    if compare.is_some() {
        println!(
            "median wall difference, this build minus the other: {:+.2} ms",
            medians[0] - medians[2]
        );
    }

    let firecracker = manifest.join("../shared/anchors/firecracker/firecracker");
    if !firecracker.exists() {
        println!(
            "firecracker anchor not found at {}; no side-by-side figure",
            firecracker.display()
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("bulkhead-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cfg = dir.join("fc.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"boot-source":{{"kernel_image_path":"{}","boot_args":"console=ttyS0 reboot=k mode=reset"}},"drives":[],"machine-config":{{"vcpu_count":1,"mem_size_mib":128}}}}"#,
            guest.display()
        ),
    )
    .expect("write fc config");
    let samples = (0..runs)
        .map(|i| {
            let sock = dir.join(format!("fc-{i}.sock"));
            let mut cmd = Command::new(&firecracker);
            cmd.arg("--api-sock")
                .arg(&sock)
                .arg("--config-file")
                .arg(&cfg);
            cmd.args(["--no-seccomp", "--level", "Error"]);
            let s = run_once(&mut cmd);
            let _ = std::fs::remove_file(&sock);
            s
        })
        .collect();
    report("firecracker (no seccomp)", samples);
    let _ = std::fs::remove_dir_all(&dir);
}
