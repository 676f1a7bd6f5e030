//! bulkhead side by side with a peer VMM (Firecracker) and the bare-KVM floor: start-up, exit
//! cost, memory, density, and in the nested lane Linux boot and virtio-blk throughput. Each
//! figure is measured several times with the VMMs alternating run by run, and reported as
//! medians and ratios in one Markdown file (with the JSON behind it) and an SVG chart.
//!
//! Run through `scripts/bench`, which builds what this needs first:
//!
//!     scripts/bench [--peer-firecracker PATH] [--rounds N] [--lane-rounds N] [--no-lane]
//!                   [--density-cap N] [--out DIR]

mod lane;
mod launch;
mod memory;
mod report;
mod snapshot;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use launch::{Kind, Vmm};
use report::{Figure, Goal};

const GUEST_MIB: u64 = 128;
const STORM_SHORT: u64 = 10_000;
const STORM_LONG: u64 = 110_000;

struct Options {
    peer: Option<PathBuf>,
    bulkhead: PathBuf,
    floor: PathBuf,
    guest: PathBuf,
    rounds: usize,
    lane_rounds: usize,
    lane: bool,
    burst: usize,
    density_cap: usize,
    budget_mib: u64,
    out: PathBuf,
    /// Only the snapshot figures (a quick run of one part).
    snapshot_only: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench [--peer-firecracker PATH] [--rounds N] [--lane-rounds N] [--no-lane]\n\
         \x20            [--burst N] [--density-cap N] [--budget-mib N] [--out DIR]\n\
         \x20            [--snapshot-only]\n\
         \x20            [--bulkhead PATH] [--floor PATH] [--guest PATH]"
    );
    std::process::exit(2)
}

fn options(root: &Path) -> Options {
    let mut o = Options {
        peer: None,
        bulkhead: root.join("target/release/bulkhead"),
        floor: root.join("target/kvm-floor"),
        guest: root.join("target/guest-images/exitcodes"),
        rounds: 15,
        lane_rounds: 5,
        lane: true,
        burst: 50,
        density_cap: 3000,
        budget_mib: 4096,
        out: root.join("docs/bench"),
        snapshot_only: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        let number = |v: String| v.parse().unwrap_or_else(|_| usage());
        match a.as_str() {
            "--peer-firecracker" => o.peer = Some(PathBuf::from(value())),
            "--bulkhead" => o.bulkhead = PathBuf::from(value()),
            "--floor" => o.floor = PathBuf::from(value()),
            "--guest" => o.guest = PathBuf::from(value()),
            "--rounds" => o.rounds = number(value()),
            "--lane-rounds" => o.lane_rounds = number(value()),
            "--no-lane" => o.lane = false,
            "--burst" => o.burst = number(value()),
            "--density-cap" => o.density_cap = number(value()),
            "--budget-mib" => o.budget_mib = number(value()) as u64,
            "--out" => o.out = PathBuf::from(value()),
            "--snapshot-only" => o.snapshot_only = true,
            _ => usage(),
        }
    }
    if o.rounds == 0 || o.burst == 0 {
        usage();
    }
    o
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs `one` for each VMM in turn, `rounds` times, so every VMM sees the same machine.
fn alternate(
    vmms: &[Vmm],
    rounds: usize,
    mut one: impl FnMut(&Vmm, usize) -> Vec<f64>,
) -> Vec<Vec<Vec<f64>>> {
    let mut out: Vec<Vec<Vec<f64>>> = vmms.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (v, samples) in vmms.iter().zip(out.iter_mut()) {
            samples.push(one(v, round));
        }
    }
    out
}

/// Column `i` of each VMM's per-round results, as a figure's samples.
fn column(vmms: &[Vmm], results: &[Vec<Vec<f64>>], i: usize) -> Vec<(&'static str, Vec<f64>)> {
    vmms.iter()
        .zip(results)
        .map(|(v, r)| {
            (
                v.name(),
                r.iter().filter_map(|x| x.get(i).copied()).collect(),
            )
        })
        .collect()
}

fn startup(vmms: &[Vmm], rounds: usize) -> Vec<Figure> {
    eprintln!("bench: start-up, {rounds} rounds");
    let results = alternate(vmms, rounds, |v, round| {
        let tag = format!("startup-{round}");
        let run = launch::timed(v.command("mode=reset", &tag));
        v.clean(&tag);
        assert!(run.ok, "{} did not run the guest to its reset", v.name());
        vec![ms(run.wall), ms(run.cpu)]
    });
    let method = "process start to the VMM's exit after the guest (exitcodes mode=reset: one \
                  serial line, then an i8042 reset) ends itself; 1 vCPU, 128 MiB";
    vec![
        Figure {
            key: "startup_wall",
            label: "Start-up to guest exit, wall".to_string(),
            unit: "ms",
            higher_is_better: false,
            samples: column(vmms, &results, 0),
            goals: vec![
                Goal::at_most("bulkhead", "firecracker", 0.5),
                Goal::at_most("bulkhead", "floor", 1.1),
                Goal::Spread {
                    vmm: "bulkhead",
                    limit: 1.5,
                },
            ],
            method: method.to_string(),
        },
        Figure {
            key: "startup_cpu",
            label: "Start-up to guest exit, CPU".to_string(),
            unit: "ms",
            higher_is_better: false,
            samples: column(vmms, &results, 1),
            // The per-VM host cost issue's goal.
            goals: vec![Goal::at_most("bulkhead", "floor", 1.3)],
            method: format!("{method}; user plus system time of every process of the VMM"),
        },
    ]
}

fn exits(vmms: &[Vmm], rounds: usize) -> Figure {
    eprintln!("bench: port-I/O exits, {rounds} rounds");
    let results = alternate(vmms, rounds, |v, round| {
        let wall = |n: u64| {
            let tag = format!("storm-{round}-{n}");
            let run = launch::timed(v.command(&format!("mode=storm storm={n}"), &tag));
            v.clean(&tag);
            assert!(run.ok, "{} did not finish the exit storm", v.name());
            run.wall
        };
        let short = wall(STORM_SHORT);
        let long = wall(STORM_LONG);
        vec![long.saturating_sub(short).as_secs_f64() * 1e6 / (STORM_LONG - STORM_SHORT) as f64]
    });
    Figure {
        key: "exit_round_trip",
        label: "Port-I/O exit round trip".to_string(),
        unit: "µs",
        higher_is_better: false,
        samples: column(vmms, &results, 0),
        goals: vec![Goal::at_most("bulkhead", "floor", 1.03)],
        method: format!(
            "wall time of a guest doing {STORM_LONG} writes to the serial scratch register \
             less that of one doing {STORM_SHORT}, over the difference (start-up cancels out)"
        ),
    }
}

/// Starts an idle guest and waits for its "idle" line; None if it never came.
fn idle(v: &Vmm, tag: &str) -> Option<std::process::Child> {
    let mut child = memory::piped(v.command("mode=idle", tag))
        .spawn()
        .expect("start a VMM");
    if memory::wait_for_line(&mut child, "exitcodes: idle", Duration::from_secs(20)) {
        Some(child)
    } else {
        launch::kill(child);
        None
    }
}

fn footprint(vmms: &[Vmm], rounds: usize) -> Vec<Figure> {
    eprintln!("bench: memory, {rounds} rounds");
    let results = alternate(vmms, rounds, |v, round| {
        let tag = format!("mem-{round}");
        memory::drop_from_page_cache(&v.binary);
        let child =
            idle(v, &tag).unwrap_or_else(|| panic!("{}: the idle guest never came up", v.name()));
        // Let the VMM finish whatever follows the guest's first halt.
        std::thread::sleep(Duration::from_millis(300));
        let f = memory::footprint(child.id(), GUEST_MIB * 1024);
        launch::kill(child);
        v.clean(&tag);
        vec![
            f.peak_rss as f64 / 1024.0,
            f.overhead() as f64 / 1024.0,
            f.anon_overhead() as f64 / 1024.0,
        ]
    });
    let method = "an idle 128 MiB, 1-vCPU guest (exitcodes mode=idle), sampled 300 ms after it \
                  says so, the VMM's binary dropped from the page cache before each start; peak \
                  RSS is the sum of VmHWM over the VMM's processes";
    vec![
        Figure {
            key: "peak_rss",
            label: "Peak RSS, idle 128 MiB VM".to_string(),
            unit: "MiB",
            higher_is_better: false,
            samples: column(vmms, &results, 0),
            goals: Vec::new(),
            method: method.to_string(),
        },
        Figure {
            key: "vmm_overhead",
            label: "Peak RSS less guest pages touched".to_string(),
            unit: "MiB",
            higher_is_better: false,
            samples: column(vmms, &results, 1),
            goals: vec![Goal::at_most("bulkhead", "firecracker", 0.6)],
            method: format!(
                "{method}, less the resident pages of the guest-RAM mapping (the pages the \
                 guest touched)"
            ),
        },
        Figure {
            key: "vmm_anon",
            label: "Anonymous memory less guest pages touched".to_string(),
            unit: "MiB",
            higher_is_better: false,
            samples: column(vmms, &results, 2),
            goals: Vec::new(),
            method: "the same VM: Pss_Anon of every process (smaps_rollup: anonymous memory, \
                     a page two processes share after a fork counted half in each), less the \
                     guest's pages; what one more VM adds in user space, the binary and \
                     libraries being page cache that all of them share"
                .to_string(),
        },
    ]
}

/// Samples MemAvailable until stopped; returns the lowest value seen.
fn watch_available() -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let lowest = Arc::new(AtomicU64::new(u64::MAX));
    let (s, l) = (stop.clone(), lowest.clone());
    let handle = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            l.fetch_min(memory::available_kib(), Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(1));
        }
        l.load(Ordering::Relaxed)
    });
    (stop, handle)
}

fn burst(vmms: &[Vmm], n: usize, rounds: usize) -> Vec<Figure> {
    eprintln!("bench: {n} VMs at once, {rounds} rounds");
    let results = alternate(vmms, rounds, |v, round| {
        std::thread::sleep(Duration::from_millis(200));
        let before = memory::available_kib();
        let (stop, watcher) = watch_available();
        let start = Instant::now();
        let children: Vec<_> = (0..n)
            .map(|i| {
                v.command("mode=reset", &format!("burst-{round}-{i}"))
                    .spawn()
                    .expect("start a VMM")
            })
            .collect();
        let ok = children.into_iter().all(|c| launch::wait(c).0);
        let elapsed = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        let lowest = watcher.join().unwrap_or(before);
        for i in 0..n {
            v.clean(&format!("burst-{round}-{i}"));
        }
        assert!(ok, "{}: a VM of the burst failed", v.name());
        vec![
            n as f64 / elapsed.as_secs_f64(),
            before.saturating_sub(lowest) as f64 / 1024.0,
        ]
    });
    vec![
        Figure {
            key: "density_rate",
            label: format!("VMs started and ended, {n} at once"),
            unit: "VMs/s",
            higher_is_better: true,
            samples: column(vmms, &results, 0),
            goals: vec![Goal::at_least("bulkhead", "firecracker", 2.0)],
            method: format!(
                "{n} VMs (exitcodes mode=reset) started back to back and all reaped; {n} over \
                 the time from the first start to the last exit"
            ),
        },
        Figure {
            key: "density_memory",
            label: "Host memory held by the burst".to_string(),
            unit: "MiB",
            higher_is_better: false,
            samples: column(vmms, &results, 1),
            goals: Vec::new(),
            method: "the largest drop of MemAvailable during the burst, sampled every \
                     millisecond (kernel memory included)"
                .to_string(),
        },
    ]
}

fn max_idle(vmms: &[Vmm], budget_mib: u64, cap: usize) -> Figure {
    let mut samples: Vec<(&'static str, Vec<f64>)> =
        vmms.iter().map(|v| (v.name(), Vec::new())).collect();
    let mut endings = Vec::new();
    // Each VMM twice, the second pass in the reverse order (A B C C B A): the first packing of
    // a run found the host less able to give memory than later ones (2026-12-07, pack order
    // bulkhead, Firecracker, bulkhead, Firecracker: 2868, 2494, 2984, 2669 VMs), and one pass
    // in a fixed order handed that to whichever VMM came first.
    let at_start = memory::available_kib();
    for v in vmms.iter().chain(vmms.iter().rev()) {
        eprintln!(
            "bench: idle {}s within {budget_mib} MiB (at most {cap})",
            v.name()
        );
        // The pass before's VM processes (not the launcher's children) may still be giving
        // memory back: a pass that started meanwhile would count it as room of its own.
        settle_after_packing(at_start);
        let before = memory::available_kib();
        let mut running = Vec::new();
        let mut fitted = 0usize;
        let ending = loop {
            if fitted == cap {
                break format!("{}: reached the cap of {cap}", v.name());
            }
            let tag = format!("idle-{}", running.len());
            let Some(child) = idle(v, &tag) else {
                break format!(
                    "{}: VM {} did not come up within 20 s",
                    v.name(),
                    fitted + 1
                );
            };
            running.push((child, tag));
            let used = before.saturating_sub(memory::available_kib());
            if used > budget_mib * 1024 {
                break format!(
                    "{}: VM {} took the host past {budget_mib} MiB",
                    v.name(),
                    fitted + 1
                );
            }
            fitted += 1;
        };
        eprintln!("bench: {ending}");
        // All at once: one by one, each teardown would wait on the rest still running.
        for (child, _) in &running {
            launch::signal(child);
        }
        for (child, tag) in running {
            let _ = launch::wait(child);
            v.clean(&tag);
        }
        if let Some((_, runs)) = samples.iter_mut().find(|(name, _)| *name == v.name()) {
            runs.push(fitted as f64);
        }
        endings.push(ending);
    }
    // And after the last: the figures that follow would measure the teardown.
    settle_after_packing(at_start);
    Figure {
        key: "density_idle",
        label: format!("Idle 128 MiB VMs within {budget_mib} MiB"),
        unit: "VMs",
        higher_is_better: true,
        samples,
        // Fewer VMs than Firecracker in the same memory is not acceptable for a provider.
        goals: vec![Goal::at_least("bulkhead", "firecracker", 1.0)],
        method: format!(
            "idle VMs (exitcodes mode=idle) started one at a time until MemAvailable fell by \
             more than {budget_mib} MiB, one did not come up, or {cap} ran; two runs each, \
             the second pass in the reverse order ({})",
            endings.join("; ")
        ),
    }
}

/// Waits, before each packing pass and after the last, until the host has its memory back
/// (within 64 MiB of `available_kib`, what it had before the packing test, for at most 60 s),
/// then 3 s more. Thousands of VMs just ended; the kernel frees what they held for seconds after the last is reaped, and a
/// restore started meanwhile measured the teardown: bulkhead's personality restore went from
/// 4.8-5.3 ms to 6.9-8.2 three rounds into the snapshot figures, 2026-12-06.
fn settle_after_packing(available_kib: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while memory::available_kib() + 64 * 1024 < available_kib && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
}

fn host_facts() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let output = |cmd: &mut Command| {
        cmd.output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    serde_json::json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "kernel": kernel.trim(),
        "date": output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
        "commit": output(Command::new("git").args(["rev-parse", "--short", "HEAD"])),
    })
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let o = options(&root);
    let scratch = std::env::temp_dir().join(format!("bulkhead-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch directory");
    let mut vmms = vec![Vmm::new(
        Kind::Bulkhead,
        o.bulkhead.clone(),
        &scratch,
        &o.guest,
    )];
    if let Some(peer) = &o.peer {
        vmms.push(Vmm::new(
            Kind::Firecracker,
            peer.clone(),
            &scratch,
            &o.guest,
        ));
    }
    vmms.push(Vmm::new(Kind::Floor, o.floor.clone(), &scratch, &o.guest));
    for v in &vmms {
        assert!(
            v.binary.exists(),
            "{} not found at {}",
            v.name(),
            v.binary.display()
        );
    }

    let meta = serde_json::json!({
        "host": host_facts(),
        "rounds": o.rounds,
        "lane_rounds": if o.lane { o.lane_rounds } else { 0 },
        "peer": o.peer.as_ref().map(|p| p.display().to_string()),
        "guest": o.guest.display().to_string(),
    });
    // Let the builds that scripts/bench just ran settle: their page cache writeback and
    // freed memory otherwise land in the first start-up rounds.
    std::thread::sleep(Duration::from_secs(3));
    let mut figures = Vec::new();
    if !o.snapshot_only {
        figures.extend(startup(&vmms, o.rounds));
        figures.push(exits(&vmms, o.rounds.div_ceil(3)));
        figures.extend(footprint(&vmms, o.rounds.div_ceil(3)));
        figures.extend(burst(&vmms, o.burst, o.rounds.div_ceil(5)));
        figures.push(max_idle(&vmms, o.budget_mib, o.density_cap));
    }
    figures.extend(snapshot::figures(
        &o.bulkhead,
        o.peer.as_deref(),
        &o.guest,
        &scratch,
        o.rounds,
    ));
    if o.lane && !o.snapshot_only {
        figures.extend(lane::figures(&root, &o));
    }
    let _ = std::fs::remove_dir_all(&scratch);

    let host = &meta["host"];
    let header = format!(
        "Measured {} on {} ({} CPUs, Linux {}), bulkhead {}; {} rounds{}.",
        host["date"].as_str().unwrap_or(""),
        host["cpu"].as_str().unwrap_or("?"),
        host["cpus"],
        host["kernel"].as_str().unwrap_or("?"),
        host["commit"].as_str().unwrap_or("?"),
        o.rounds,
        if o.peer.is_some() {
            ", the peer run with --no-seccomp"
        } else {
            ""
        }
    );
    let table = report::markdown(&figures, &header);
    let json = serde_json::to_string_pretty(&report::json(&figures, meta)).expect("json");
    std::fs::create_dir_all(&o.out).expect("output directory");
    let md = o.out.join("results.md");
    std::fs::write(
        &md,
        format!("# bulkhead benchmark results\n\n{table}\n## Data\n\n```json\n{json}\n```\n"),
    )
    .expect("write results.md");
    let svg = o.out.join("ratios.svg");
    std::fs::write(&svg, report::svg(&figures, "bulkhead against its peers"))
        .expect("write ratios.svg");
    println!("{table}");
    eprintln!("bench: wrote {} and {}", md.display(), svg.display());
}
