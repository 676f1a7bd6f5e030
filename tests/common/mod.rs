//! Shared helpers for the integration tests: build the test guests, run the real `bulkhead`
//! binary with a time limit, and decide what to do when /dev/kvm is missing.

#![allow(dead_code)]

pub mod lane;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Falco's priorities, most severe first: the only ones falcosidekick accepts.
pub const FALCO_PRIORITIES: [&str; 8] = [
    "Emergency",
    "Alert",
    "Critical",
    "Error",
    "Warning",
    "Notice",
    "Informational",
    "Debug",
];

/// What one run of the binary produced.
#[derive(Debug)]
pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// Lines of stdout equal to `line`.
    pub fn stdout_count(&self, line: &str) -> usize {
        self.stdout.lines().filter(|l| *l == line).count()
    }
}

/// True when KVM tests can run. Outside CI a missing /dev/kvm skips the test with a printed
/// reason; in CI (CI=true) it fails the test, so KVM tests are never skipped silently.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: /dev/kvm cannot be opened, and CI=true forbids skipping KVM tests");
        }
        eprintln!("SKIPPED {test}: /dev/kvm cannot be opened (set CI=true to make this a failure)");
    }
    ok
}

/// Path of a test guest, built from guest-images/ on first use.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let out = BUILT.get_or_init(|| {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../guest-images");
        let status = Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(manifest.join("guest-images"))
            .arg(format!("OUT={}", out.display()))
            .status()
            .expect("cannot run make to build the test guests");
        assert!(status.success(), "building the test guests failed");
        out
    });
    let path = out.join(name);
    assert!(
        path.exists(),
        "test guest {name} missing at {}",
        path.display()
    );
    path
}

/// A scratch directory unique to this test.
pub fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("cannot create scratch dir");
    dir
}

/// Runs `bulkhead` with `args`, killing it after `limit`.
pub fn bulkhead_with_limit(args: &[&str], limit: Duration) -> Run {
    command_with_limit(
        Command::new(env!("CARGO_BIN_EXE_bulkhead")).args(args),
        limit,
    )
}

/// Runs `cmd` with stdin closed, collecting its output, killing it after `limit`.
pub fn command_with_limit(cmd: &mut Command, limit: Duration) -> Run {
    command_with_input(cmd, None, limit)
}

/// Runs `cmd` with `input` on a pipe to its stdin (or stdin closed), killing it after `limit`.
pub fn command_with_input(cmd: &mut Command, input: Option<&[u8]>, limit: Duration) -> Run {
    let start = Instant::now();
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start bulkhead");
    if let Some(input) = input {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(input)
            .expect("cannot write to bulkhead's stdin");
    }
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait failed") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {limit:?}; stderr so far: {}",
                err_reader.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Run {
        status: code,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        elapsed,
    }
}

/// Runs `bulkhead` with `args` and a 60 s limit.
pub fn bulkhead(args: &[&str]) -> Run {
    bulkhead_with_limit(args, Duration::from_secs(60))
}

/// Runs a test guest: `bulkhead run --kernel <guest> <extra...>`, stdin closed.
pub fn run_guest(name: &str, extra: &[&str]) -> Run {
    run_guest_with_input(name, extra, None)
}

/// Runs a test guest with `input` (if any) on bulkhead's stdin, and a 60 s limit.
pub fn run_guest_with_input(name: &str, extra: &[&str], input: Option<&[u8]>) -> Run {
    let kernel = guest(name);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bulkhead"));
    cmd.arg("run").arg("--kernel").arg(kernel).args(extra);
    command_with_input(&mut cmd, input, Duration::from_secs(60))
}

/// A series' labels, as (name, value) pairs.
pub type Labels = Vec<(String, String)>;

/// The samples of a Prometheus text file: (name, labels, value).
#[derive(Debug, Default)]
pub struct Metrics {
    pub samples: Vec<(String, Labels, f64)>,
}

impl Metrics {
    /// Parses `name{k="v",...} value` lines; comments and blank lines are skipped, anything
    /// else fails the test.
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), Vec::new()),
                Some((name, rest)) => {
                    let body = rest
                        .strip_suffix('}')
                        .unwrap_or_else(|| panic!("bad labels in {line:?}"));
                    let mut labels = Vec::new();
                    for pair in body.split("\",").filter(|p| !p.is_empty()) {
                        let (k, v) = pair
                            .split_once("=\"")
                            .unwrap_or_else(|| panic!("bad label in {line:?}"));
                        labels.push((k.to_string(), v.trim_end_matches('"').to_string()));
                    }
                    (name.to_string(), labels)
                }
            };
            samples.push((name, labels, value));
        }
        Metrics { samples }
    }

    /// Values of the series named `name` whose labels include `labels`.
    pub fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| *v)
            .collect()
    }

    /// The one series named `name` with `labels`, as an integer; fails the test if absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        match self.matching(name, labels).as_slice() {
            [v] => *v as u64,
            other => panic!("{name}{labels:?}: {} series match", other.len()),
        }
    }

    /// The sum of every series named `name` with `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.matching(name, labels).iter().sum::<f64>() as u64
    }

    /// How often `device` refused for `layer.reason` (e.g. `chain.loop`).
    pub fn refusals(&self, device: &str, reason: &str) -> u64 {
        let (layer, reason) = reason.split_once('.').expect("layer.reason");
        self.value(
            "bulkhead_virtio_violations_total",
            &[("device", device), ("layer", layer), ("reason", reason)],
        )
    }

    /// All of `device`'s refusals.
    pub fn total_refusals(&self, device: &str) -> u64 {
        self.sum("bulkhead_virtio_violations_total", &[("device", device)])
    }
}

/// A run with its metrics file and alert lines collected.
#[derive(Debug)]
pub struct Observed {
    pub run: Run,
    pub metrics: Metrics,
    pub alerts: Vec<serde_json::Value>,
}

impl Observed {
    /// The alerts of `rule`.
    pub fn alerts_of(&self, rule: &str) -> Vec<&serde_json::Value> {
        self.alerts.iter().filter(|a| a["rule"] == rule).collect()
    }

    /// Alerts at `priority` or more severe (Falco's order), other than `except`.
    pub fn alerts_at_least(&self, priority: &str, except: &[&str]) -> Vec<&serde_json::Value> {
        let rank = |p: &str| {
            FALCO_PRIORITIES
                .iter()
                .position(|o| *o == p)
                .unwrap_or(usize::MAX)
        };
        let limit = rank(priority);
        self.alerts
            .iter()
            .filter(|a| rank(a["priority"].as_str().unwrap_or("")) <= limit)
            .filter(|a| !except.contains(&a["rule"].as_str().unwrap_or("")))
            .collect()
    }
}

/// Runs `bulkhead run --kernel <guest> <extra...>` with a metrics file and an alerts file in
/// a scratch directory named for `test`, and collects both.
pub fn run_observed(test: &str, guest_name: &str, extra: &[&str]) -> Observed {
    let dir = scratch(test);
    let metrics = dir.join("vm.prom");
    let alerts = dir.join("alerts.jsonl");
    let mut args = vec![
        "run".to_string(),
        "--kernel".to_string(),
        guest(guest_name).display().to_string(),
        "--metrics-file".to_string(),
        metrics.display().to_string(),
        "--alerts".to_string(),
        alerts.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = bulkhead(&args);
    observed(run, &metrics, &alerts)
}

/// Collects the metrics file and alerts file of a finished run.
pub fn observed(run: Run, metrics: &Path, alerts: &Path) -> Observed {
    let text = std::fs::read_to_string(metrics).unwrap_or_else(|e| {
        panic!(
            "no metrics file {}: {e}; stderr: {}",
            metrics.display(),
            run.stderr
        )
    });
    let alerts = std::fs::read_to_string(alerts)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad alert line {l:?}: {e}")))
        .collect();
    Observed {
        run,
        metrics: Metrics::parse(&text),
        alerts,
    }
}

/// A tap interface created for one test, deleted when dropped.
pub struct TestTap {
    pub name: String,
}

impl TestTap {
    /// Creates and brings up a tap, or None (with the reason printed) when this host can not.
    pub fn create(test: &str) -> Option<TestTap> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("bht{}x{n}", std::process::id() % 100_000);
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        };
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root || !ip(&["tuntap", "add", "dev", &name, "mode", "tap"]) {
            let why = "creating a tap needs root and the ip tool (iproute2)";
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: {why}");
            }
            eprintln!("SKIPPED {test}: {why}");
            return None;
        }
        let tap = TestTap { name };
        // No IPv6 chatter from the host side: the guest should see only the test's frame.
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.name),
            "1",
        );
        assert!(
            ip(&["link", "set", &tap.name, "up"]),
            "cannot bring {} up",
            tap.name
        );
        Some(tap)
    }

    /// Whether a process holds the tap open: a tap has carrier while it is attached.
    pub fn attached(&self) -> bool {
        std::fs::read_to_string(format!("/sys/class/net/{}/carrier", self.name))
            .is_ok_and(|c| c.trim() == "1")
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.name])
            .output();
    }
}

/// Reads one `\n`-terminated line from `stream` (without the newline).
pub fn read_line(stream: &mut std::os::unix::net::UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8];
    while stream.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Plays the host side of the `virtio` guest's vsock mode: through `stream` (connected to the
/// VM's socket) reaches the guest's port 1234 and checks its echo, then takes the guest's
/// connection to host port 5000 on `listener` and answers it.
pub fn vsock_host_side(
    mut stream: std::os::unix::net::UnixStream,
    listener: &std::os::unix::net::UnixListener,
) -> u32 {
    use std::io::Write;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(b"CONNECT 1234\n").unwrap();
    let ok = read_line(&mut stream);
    assert!(ok.starts_with("OK "), "answer to CONNECT: {ok:?}");
    stream.write_all(b"ping-from-host").unwrap();
    let mut echo = [0u8; 14];
    stream.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"ping-from-host");
    drop(stream);
    let (mut from_guest, _) = listener.accept().unwrap();
    from_guest
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut ping = [0u8; 15];
    from_guest.read_exact(&mut ping).unwrap();
    assert_eq!(&ping, b"ping-from-guest");
    from_guest.write_all(b"pong-from-host").unwrap();
    // Who the guest's connection came from, as the listener sees it.
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    use std::os::fd::AsRawFd;
    // SAFETY: `cred` and `len` are valid for the kernel to write; the socket is open.
    let rc = unsafe {
        libc::getsockopt(
            from_guest.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0);
    cred.uid
}

/// For tests that need root as well as KVM (the jail, the daemon: namespaces, mounts,
/// cgroups, set*id). Outside CI they skip with a printed reason when not root; CI runs as
/// root, and there a skip would hide a broken jail.
pub fn root_and_kvm_available(test: &str) -> bool {
    if !kvm_available(test) {
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: needs root, and CI=true forbids skipping"
    );
    eprintln!("SKIPPED {test}: needs root");
    false
}

/// `field` (e.g. `Uid:`) of task `task` of process `pid`, from /proc, trimmed; empty when
/// unreadable.
pub fn status_field(pid: u32, task: &str, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{task}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

/// The first child of process `pid` (its main thread's): a supervisor's VM process, say.
pub fn first_child(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
