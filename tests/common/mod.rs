//! Shared helpers for the integration tests: build the test guests, run the real `bulkhead`
//! binary with a time limit, and decide what to do when /dev/kvm is missing.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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
