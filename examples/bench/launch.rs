//! The three things measured side by side, and how each is started on the test guest
//! `exitcodes` with a given `mode=`: bulkhead, the peer VMM (Firecracker, with `--no-seccomp`
//! as the issue asks), and the bare-KVM floor (`benches/floor/kvm-floor.c`).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bulkhead,
    Firecracker,
    Floor,
}

pub struct Vmm {
    pub kind: Kind,
    pub binary: PathBuf,
    /// Where per-run files go (Firecracker's config files and API sockets).
    scratch: PathBuf,
    guest: PathBuf,
}

impl Vmm {
    pub fn new(kind: Kind, binary: PathBuf, scratch: &Path, guest: &Path) -> Vmm {
        Vmm {
            kind,
            binary,
            scratch: scratch.to_path_buf(),
            guest: guest.to_path_buf(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Bulkhead => "bulkhead",
            Kind::Firecracker => "firecracker",
            Kind::Floor => "floor",
        }
    }

    /// A command that boots the guest with 1 vCPU and 128 MiB, with `args` on its command line
    /// (`mode=reset`, say). `tag` keeps concurrent Firecracker runs' files apart. Output goes
    /// to /dev/null unless the caller changes it.
    pub fn command(&self, args: &str, tag: &str) -> Command {
        let mut cmd = Command::new(&self.binary);
        match self.kind {
            Kind::Bulkhead => {
                cmd.args(["run", "--kernel"]).arg(&self.guest).args([
                    "--cmdline",
                    args,
                    "--mem-mib",
                    "128",
                    "--log-level",
                    "error",
                ]);
            }
            Kind::Firecracker => {
                let config = self.scratch.join(format!("fc-{tag}.json"));
                let sock = self.scratch.join(format!("fc-{tag}.sock"));
                let _ = fs::remove_file(&sock);
                let json = serde_json::json!({
                    "boot-source": {
                        "kernel_image_path": self.guest,
                        "boot_args": format!("console=ttyS0 reboot=k panic=1 pci=off {args}"),
                    },
                    "drives": [],
                    "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
                });
                fs::write(&config, json.to_string()).expect("write the Firecracker config");
                cmd.arg("--api-sock")
                    .arg(&sock)
                    .arg("--config-file")
                    .arg(&config)
                    .args(["--no-seccomp", "--level", "Error"]);
            }
            Kind::Floor => {
                cmd.args(["--mem", "128", "--cmdline", args]);
                if args.contains("mode=idle") {
                    cmd.arg("--idle");
                }
                cmd.arg(&self.guest);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group, so one signal reaches bulkhead's two processes.
        cmd.process_group(0);
        cmd
    }

    /// Removes the files a Firecracker run `tag` left.
    pub fn clean(&self, tag: &str) {
        if self.kind == Kind::Firecracker {
            let _ = fs::remove_file(self.scratch.join(format!("fc-{tag}.json")));
            let _ = fs::remove_file(self.scratch.join(format!("fc-{tag}.sock")));
        }
    }
}

/// One finished run.
pub struct Run {
    pub wall: Duration,
    /// User plus system time of the process and the children it reaped (bulkhead's VM process).
    pub cpu: Duration,
    pub ok: bool,
}

/// Starts `cmd`, waits for it, and returns its wall and CPU time.
pub fn timed(mut cmd: Command) -> Run {
    let start = Instant::now();
    let child = cmd.spawn().expect("start a VMM");
    let (ok, cpu) = wait(child);
    Run {
        wall: start.elapsed(),
        cpu,
        ok,
    }
}

/// Reaps `child`; returns whether it exited 0, and its CPU time with its reaped children's.
pub fn wait(child: Child) -> (bool, Duration) {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not yet reaped; `status` and `usage` are valid for writes.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4: {}", std::io::Error::last_os_error());
    // Already reaped: dropping the Child must not wait again.
    std::mem::forget(child);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    (ok, tv(usage.ru_utime) + tv(usage.ru_stime))
}

/// Ends a VMM left running (an idle guest) and everything in its process group.
pub fn kill(child: Child) {
    signal(&child);
    let _ = wait(child);
}

/// Sends SIGKILL to the child's process group, without reaping it.
pub fn signal(child: &Child) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on our own child's process group, not yet reaped; no memory is involved.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
}
