//! The supervisor seen from outside: the metrics file while the VM runs and after, the time
//! limit, stopping on SIGTERM, a VM process that dies, the supervisor's own filter, and alert
//! delivery to a falcosidekick-style endpoint.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{guest, kvm_available, observed, scratch, Metrics, Observed, Run};

/// A `bulkhead run` of the `exitcodes` guest in echo mode: it waits for a console line, so it
/// runs until the test writes one (or stops it).
struct LiveVm {
    child: Child,
    metrics: PathBuf,
    alerts: PathBuf,
}

impl LiveVm {
    fn start(test: &str, extra: &[&str]) -> LiveVm {
        let dir = scratch(test);
        let (metrics, alerts) = (dir.join("vm.prom"), dir.join("alerts.jsonl"));
        let child = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
            .args(["run", "--kernel"])
            .arg(guest("exitcodes"))
            .args(["--cmdline", "mode=echo", "--metrics-file"])
            .arg(&metrics)
            .arg("--alerts")
            .arg(&alerts)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        LiveVm {
            child,
            metrics,
            alerts,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The VM process: the supervisor's only child.
    fn vm_process(&self) -> u32 {
        let path = format!("/proc/{0}/task/{0}/children", self.pid());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if let Some(pid) = text.split_whitespace().next() {
                return pid.parse().unwrap();
            }
            assert!(Instant::now() < deadline, "the VM process never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the metrics file to hold `line`; returns its text.
    fn metrics_with(&self, line: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&self.metrics).unwrap_or_default();
            if text.contains(line) {
                return text;
            }
            assert!(Instant::now() < deadline, "no {line:?} in {text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (up to a minute) for the run to end.
    fn finish(mut self) -> Observed {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("bulkhead did not end");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut stdout = String::new();
        let mut stderr = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        let run = Run {
            status: status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
            stdout,
            stderr,
            elapsed: Duration::ZERO,
        };
        observed(run, &self.metrics, &self.alerts)
    }
}

/// Parses `path` with Python's prometheus_client (the parser Prometheus' own tooling shares
/// its grammar with) and returns the family names it found. None, with the reason printed,
/// when this host lacks it outside CI.
fn python_families(path: &Path) -> Option<Vec<String>> {
    let script = "import sys\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        for f in text_string_to_metric_families(open(sys.argv[1]).read()):\n\
        \x20   print(f.name, f.type, len(f.samples))\n";
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string)
                .collect(),
        ),
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No module named") => {
            let why = "python3's prometheus_client is missing (scripts/setup installs it)";
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{why}");
            }
            eprintln!("SKIPPED the Python parse: {why}");
            None
        }
        Ok(o) => panic!(
            "prometheus_client refused {}: {}",
            path.display(),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("cannot run python3: {e}"),
    }
}

#[test]
fn the_metrics_file_is_rewritten_while_the_vm_runs_and_parses_with_prometheus_client() {
    let test = "the_metrics_file_is_rewritten_while_the_vm_runs_and_parses_with_prometheus_client";
    if !kvm_available(test) {
        return;
    }
    let mut vm = LiveVm::start(test, &["--vm-id", "vm-live", "--tenant", "acme"]);
    // Once the guest runs (it says so on the console), its series are there: they are
    // written before the VM process starts, not at the first tick a second later.
    let mut said = Vec::new();
    let mut byte = [0u8; 1];
    let stdout = vm.child.stdout.as_mut().unwrap();
    while !said.ends_with(b"echo: ready") {
        assert_eq!(stdout.read(&mut byte).unwrap(), 1, "the guest never spoke");
        said.push(byte[0]);
    }
    let early = std::fs::read_to_string(&vm.metrics).unwrap_or_default();
    assert!(
        early.contains("bulkhead_vm_running{vm_id=\"vm-live\",tenant=\"acme\"} 1")
            && early.contains("bulkhead_vcpu_exits_total{"),
        "{early:?}"
    );
    // A snapshot with the kernel's view of the threads, which the first one can not have.
    let running = vm.metrics_with("bulkhead_vm_process_threads{");
    let first = std::fs::metadata(&vm.metrics).unwrap().ino();
    let m = Metrics::parse(&running);
    // The kernel's view of the VM process: each of its threads runs under a filter.
    let threads = m.value("bulkhead_vm_process_threads", &[]);
    assert!(threads >= 2, "{running}");
    assert_eq!(m.value("bulkhead_seccomp_filtered_threads", &[]), threads);
    // The VM process holds none of the supervisor's outputs.
    let inner = vm.vm_process();
    for fd in std::fs::read_dir(format!("/proc/{inner}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        assert!(
            !target.to_string_lossy().contains("alerts.jsonl"),
            "the VM process holds the alerts file"
        );
    }
    // The supervisor confined itself too.
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Seccomp:") && l.ends_with('2')),
        "{status}"
    );
    // Replaced (a new inode by rename), not rewritten in place.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&vm.metrics).unwrap().ino() == first {
        assert!(
            Instant::now() < deadline,
            "the metrics file was not replaced"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let families = python_families(&vm.metrics);
    let metrics_path = vm.metrics.clone();
    vm.child.stdin.as_mut().unwrap().write_all(b"7\n").unwrap();
    let o = vm.finish();
    assert_eq!(o.run.status, 7, "{}", o.run.stderr);
    let m = &o.metrics;
    assert_eq!(m.value("bulkhead_vm_running", &[]), 0);
    assert_eq!(m.value("bulkhead_vm_exit", &[("reason", "guest_exit")]), 1);
    assert_eq!(m.value("bulkhead_vm_exit_status", &[]), 7);
    assert_eq!(m.value("bulkhead_guest_memory_bytes", &[]), 128 << 20);
    for (name, labels, _) in &m.samples {
        let has = |k: &str| labels.iter().any(|(lk, _)| lk == k);
        assert!(has("vm_id") && has("tenant"), "{name}{labels:?}");
        assert!(
            !labels.iter().any(|(k, _)| k == "port" || k == "address"),
            "{name}{labels:?}"
        );
    }
    if let Some(families) = families {
        for family in [
            "bulkhead_vcpu_exits counter",
            "bulkhead_unhandled_pio counter",
            "bulkhead_unhandled_mmio counter",
            "bulkhead_virtio_requests counter",
            "bulkhead_virtio_bytes counter",
            "bulkhead_virtio_violations counter",
            "bulkhead_alerts counter",
            "bulkhead_alerts_suppressed counter",
            "bulkhead_guest_memory_bytes gauge",
            "bulkhead_seccomp_filtered_threads gauge",
            "bulkhead_vm_running gauge",
        ] {
            assert!(
                families.iter().any(|f| f.starts_with(family)),
                "{family} missing from {families:?}"
            );
        }
        let last = python_families(&metrics_path).unwrap_or_default();
        assert!(
            last.iter().any(|f| f.starts_with("bulkhead_vm_exit gauge")),
            "{last:?}"
        );
    }
    assert!(o.alerts.is_empty(), "{:?}", o.alerts);
}

#[test]
fn a_vm_that_outlives_its_timeout_is_stopped_with_status_124() {
    if !kvm_available("a_vm_that_outlives_its_timeout_is_stopped_with_status_124") {
        return;
    }
    let start = Instant::now();
    let vm = LiveVm::start("timeout", &["--timeout", "1"]);
    let o = vm.finish();
    let took = start.elapsed();
    assert_eq!(o.run.status, 124, "{}", o.run.stderr);
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        o.run.stderr.contains("timed out after 1 s"),
        "{}",
        o.run.stderr
    );
    assert_eq!(
        o.metrics
            .value("bulkhead_vm_exit", &[("reason", "timeout")]),
        1
    );
    assert_eq!(o.metrics.value("bulkhead_vm_exit_status", &[]), 124);
    // Stopped in order: the guest's last console line made it out.
    assert!(o.run.stdout.contains("echo: ready"), "{}", o.run.stdout);
}

#[test]
fn sigterm_to_bulkhead_run_stops_the_vm_in_order() {
    if !kvm_available("sigterm_to_bulkhead_run_stops_the_vm_in_order") {
        return;
    }
    let vm = LiveVm::start("sigterm", &[]);
    vm.metrics_with("bulkhead_vm_running");
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) };
    let o = vm.finish();
    assert_eq!(o.run.status, 143, "{}", o.run.stderr);
    assert_eq!(
        o.metrics
            .value("bulkhead_vm_exit", &[("reason", "terminated")]),
        1
    );
}

#[test]
fn a_vm_process_killed_from_outside_is_reported_not_guessed() {
    if !kvm_available("a_vm_process_killed_from_outside_is_reported_not_guessed") {
        return;
    }
    let vm = LiveVm::start("killed", &[]);
    let inner = vm.vm_process();
    vm.metrics_with("bulkhead_vm_running");
    // SAFETY: kill(2) on a process this test started (through bulkhead).
    unsafe { libc::kill(inner as i32, libc::SIGKILL) };
    let o = vm.finish();
    assert_eq!(o.run.status, 137, "{}", o.run.stderr);
    assert!(
        o.run.stderr.contains("killed by signal 9"),
        "{}",
        o.run.stderr
    );
    assert_eq!(
        o.metrics.value("bulkhead_vm_exit", &[("reason", "killed")]),
        1
    );
}

#[test]
fn the_supervisor_is_confined_by_its_own_filter() {
    if !kvm_available("the_supervisor_is_confined_by_its_own_filter") {
        return;
    }
    let run = common::run_guest("hello", &["--test-hook", "supervisor-forbidden-syscall"]);
    assert_eq!(run.status, 159, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("seccomp violation: thread supervisor made forbidden system call 41"),
        "{}",
        run.stderr
    );
}

/// A loopback stand-in for falcosidekick: answers 400 to what falcosidekick rejects (an
/// unknown priority, an empty rule, no time, empty output_fields), 200 otherwise, and hands
/// back every accepted alert.
fn sidekick(expect: usize) -> (u16, std::thread::JoinHandle<Vec<serde_json::Value>>) {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let mut accepted = Vec::new();
        server.set_nonblocking(false).unwrap();
        while accepted.len() < expect {
            let (mut conn, _) = server.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let body = loop {
                let n = conn.read(&mut chunk).unwrap();
                assert!(n > 0, "the request ended early");
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                let Some((head, body)) = text.split_once("\r\n\r\n") else {
                    continue;
                };
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .expect("no Content-Length")
                    .parse()
                    .unwrap();
                if body.len() >= len {
                    assert!(head.starts_with("POST / HTTP/1.1"), "{head}");
                    break body[..len].to_string();
                }
            };
            let alert: serde_json::Value = serde_json::from_str(&body).unwrap();
            let ok = common::FALCO_PRIORITIES.contains(&alert["priority"].as_str().unwrap_or(""))
                && alert["rule"].as_str().is_some_and(|r| !r.is_empty())
                && alert["time"].is_string()
                && alert["output_fields"]
                    .as_object()
                    .is_some_and(|f| !f.is_empty());
            let answer: &[u8] = if ok {
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
            } else {
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
            };
            conn.write_all(answer).unwrap();
            assert!(ok, "falcosidekick would reject {alert}");
            accepted.push(alert);
        }
        accepted
    });
    (port, handle)
}

#[test]
fn alerts_are_posted_to_a_falcosidekick_endpoint() {
    if !kvm_available("alerts_are_posted_to_a_falcosidekick_endpoint") {
        return;
    }
    let (port, server) = sidekick(1);
    let url = format!("http://127.0.0.1:{port}/");
    let o = common::run_observed(
        "alerts-http",
        "attacks/triple_fault",
        &["--alerts-http", &url],
    );
    assert_eq!(o.run.status, 81, "{}", o.run.stderr);
    let posted = server.join().unwrap();
    assert_eq!(posted.len(), 1);
    assert_eq!(posted[0]["rule"], "triple_fault");
    assert_eq!(posted[0], o.alerts[0], "the POST and the alert line differ");
    assert_eq!(
        o.metrics
            .value("bulkhead_alert_deliveries_total", &[("outcome", "sent")]),
        1
    );
}

#[test]
fn an_alert_endpoint_that_is_down_costs_the_vm_nothing() {
    if !kvm_available("an_alert_endpoint_that_is_down_costs_the_vm_nothing") {
        return;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/");
    let o = common::run_observed(
        "alerts-http-down",
        "attacks/triple_fault",
        &["--alerts-http", &url],
    );
    assert_eq!(o.run.status, 81, "{}", o.run.stderr);
    assert_eq!(o.alerts.len(), 1, "the alert still reaches the file");
    assert_eq!(
        o.metrics
            .value("bulkhead_alert_deliveries_total", &[("outcome", "dropped")]),
        1
    );
    assert_eq!(
        o.metrics
            .value("bulkhead_alert_deliveries_total", &[("outcome", "sent")]),
        0
    );
}

#[test]
fn sigsys_from_outside_is_ignored_by_the_supervisor_and_ends_the_vm_process_without_details() {
    if !kvm_available(
        "sigsys_from_outside_is_ignored_by_the_supervisor_and_ends_the_vm_process_without_details",
    ) {
        return;
    }
    let vm = LiveVm::start("sigsys-outside", &[]);
    let inner = vm.vm_process();
    vm.metrics_with("bulkhead_vm_running");
    // The supervisor ignores a SIGSYS nobody's filter raised, every time: it lives on to
    // report the VM process's end below.
    for _ in 0..2 {
        // SAFETY: kill(2) on a process this test started.
        unsafe { libc::kill(vm.pid() as i32, libc::SIGSYS) };
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill(2) on a process this test started (through bulkhead).
    unsafe { libc::kill(inner as i32, libc::SIGSYS) };
    let o = vm.finish();
    assert_eq!(o.run.status, 159, "{}", o.run.stderr);
    assert!(
        o.run.stderr.contains("(it reported no details)"),
        "{}",
        o.run.stderr
    );
    assert_eq!(o.alerts.len(), 1, "{:?}", o.alerts);
    let fields = &o.alerts[0]["output_fields"];
    assert_eq!(o.alerts[0]["rule"], "seccomp_violation");
    assert!(
        fields.get("thread").is_none() && fields.get("syscall").is_none(),
        "{fields}"
    );
}

/// Runs `bulkhead run --kernel GUEST EXTRA` with a fresh pseudo-terminal as its stdin (as an
/// operator's shell would give it); returns the run and the terminal's settings before and
/// after.
fn run_on_a_terminal(guest_name: &str, extra: &[&str]) -> (Run, libc::termios, libc::termios) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the locals; the name, settings and size
    // pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened for this test and are owned here alone.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let settings = |fd: &OwnedFd| {
        use std::os::fd::AsRawFd;
        // SAFETY: an all-zero termios is a valid buffer; tcgetattr fills it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `t` is valid for writes and `fd` is an open terminal.
        assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
        t
    };
    let before = settings(&slave);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bulkhead"));
    // bulkhead runs as the foreground job of its own session with the terminal as its
    // controlling terminal, as under an operator's shell.
    // SAFETY: setsid and ioctl are async-signal-safe, as pre_exec requires; stdin is the
    // terminal by then.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.arg("run")
        .arg("--kernel")
        .arg(guest(guest_name))
        .args(extra)
        .stdin(Stdio::from(slave.try_clone().expect("dup the terminal")))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let out = cmd.output().expect("cannot run bulkhead");
    let after = settings(&slave);
    drop(master);
    let run = Run {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    };
    (run, before, after)
}

#[test]
fn a_terminal_console_is_left_as_it_was_found_even_when_the_vm_process_is_killed() {
    if !kvm_available(
        "a_terminal_console_is_left_as_it_was_found_even_when_the_vm_process_is_killed",
    ) {
        return;
    }
    let same = |a: &libc::termios, b: &libc::termios| {
        (a.c_iflag, a.c_oflag, a.c_lflag, a.c_cflag) == (b.c_iflag, b.c_oflag, b.c_lflag, b.c_cflag)
    };
    // An orderly end: the VM process puts the terminal back itself.
    let (run, before, after) = run_on_a_terminal("hello", &["--cmdline", "exit=0"]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert!(same(&before, &after), "terminal left changed");
    // A VM process killed by its filter can not; the supervisor (itself confined) does.
    let (run, before, after) =
        run_on_a_terminal("hello", &["--test-hook", "vmm-forbidden-syscall"]);
    assert_eq!(run.status, 159, "{}", run.stderr);
    assert!(run.stderr.contains("thread vmm"), "{}", run.stderr);
    assert!(same(&before, &after), "terminal left raw");
}

#[test]
fn console_output_past_the_limit_is_dropped_and_counted_and_the_file_is_private() {
    let test = "console_output_past_the_limit_is_dropped_and_counted_and_the_file_is_private";
    if !common::kvm_available(test) {
        return;
    }
    let dir = common::scratch(test);
    let full = dir.join("full.log");
    let cut = dir.join("cut.log");
    let arg = |p: &std::path::Path| format!("file:{}", p.display());
    let whole = common::run_observed(test, "hello", &["--console", &arg(&full)]);
    assert_eq!(whole.run.status, 0, "{}", whole.run.stderr);
    let o = common::run_observed(
        &format!("{test}-cut"),
        "hello",
        &["--console", &arg(&cut), "--console-limit", "10"],
    );
    assert_eq!(o.run.status, 0, "{}", o.run.stderr);
    let all = std::fs::read(&full).unwrap();
    let kept = std::fs::read(&cut).unwrap();
    assert_eq!(kept.as_slice(), &all[..10]);
    assert_eq!(
        o.metrics.sum("bulkhead_console_dropped_bytes_total", &[]),
        (all.len() - 10) as u64
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cut).unwrap().permissions().mode() & 0o777,
        0o600
    );
}
