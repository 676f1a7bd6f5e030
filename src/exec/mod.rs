//! `bulkhead exec`: runs one command inside a fresh VM that sees the host's files, and returns
//! what the command printed and how it ended, for CI jobs and kernel tests.
//!
//! A front end over `bulkhead run`, like the daemon and the Firecracker personality: it writes
//! a settings file (typed [`RawConfig`]) and starts the supervisor. The VM boots the given
//! kernel with an initramfs made here ([`initramfs`]), whose init mounts the host's `/`
//! (shared read-only over virtio-fs) as its root with writable tmpfs on /tmp and /run and an
//! overlay on /var, and runs the command in the caller's directory as the caller's uid, with
//! the caller's environment. Its stdout and stderr come back over vsock, separately and in
//! order ([`streams`]), and its exit status last.
//!
//! Statuses: the command's own (128+N when signal N killed it); [`status::TIMEOUT`] (124)
//! when `--timeout` ended it; [`status::GUEST_PANIC`] (87) when the guest kernel panicked;
//! [`status::EXEC_NOT_RUN`] (88) when the VM ended before the command's status came back (the
//! console's last lines are printed); [`status::BAD_INPUT`] (2) for bad arguments or host
//! files. Only the command's own status is not followed by a line of bulkhead's on stderr.

pub mod initramfs;
pub mod modules;
pub mod streams;

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::api::launch::{Launch, Supervisor};
use crate::config::{RawConfig, RawShare, RawVsock};
use crate::exit::status;
use initramfs::{Modules, Spec, ROOT_TAG};
use streams::{Ending, Listening};

/// The guest's CID; any would do, the VM is alone with its host.
const GUEST_CID: u64 = 3;
/// Lines of the console shown when the command did not run to its end.
const CONSOLE_TAIL: usize = 40;

/// What `bulkhead exec` was asked to do.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    pub kernel: PathBuf,
    /// Extra host directories, shared read-write at the same path.
    pub shares: Vec<PathBuf>,
    pub mem_mib: u64,
    pub vcpus: u32,
    pub timeout: Option<u64>,
    /// Kernel modules to load before anything else (a kernel whose virtio drivers are modules).
    pub modules: Modules,
    /// More kernel command-line parameters.
    pub cmdline: Option<String>,
    pub virtiofsd: Option<PathBuf>,
    /// `--no-seccomp` (debugging only).
    pub no_seccomp: bool,
    pub command: Vec<OsString>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot make a private directory for the VM's files: {0}")]
    Scratch(#[source] std::io::Error),
    #[error("cannot write the initramfs: {0}")]
    Initramfs(#[source] std::io::Error),
    #[error("cannot listen for the guest's streams: {0}")]
    Listen(#[source] std::io::Error),
    #[error("cannot write the settings file {}: {source}", path.display())]
    Settings {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the current directory: {0}")]
    Cwd(#[source] std::io::Error),
    #[error("share {}: {source}", path.display())]
    Share {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find this program to start the VM with: {0}")]
    Exe(#[source] std::io::Error),
    #[error(transparent)]
    Launch(#[from] crate::api::launch::LaunchError),
}

impl ExecError {
    fn status(&self) -> i32 {
        match self {
            ExecError::Share { .. } | ExecError::Cwd(_) => status::BAD_INPUT,
            _ => status::RUNTIME_ERROR,
        }
    }
}

/// Runs the command and returns the status `bulkhead exec` exits with.
pub fn run(options: &ExecOptions, log_level: Option<&'static str>) -> i32 {
    match run_inner(options, log_level) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bulkhead exec: {}", crate::error_chain(&e));
            e.status()
        }
    }
}

fn run_inner(options: &ExecOptions, log_level: Option<&'static str>) -> Result<i32, ExecError> {
    // Ctrl-C reaches the whole process group: `bulkhead run` stops the VM in order, and this
    // process stays to say so and clean up. (A handler, not SIG_IGN, which the child would
    // inherit.)
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: installs a handler that does nothing, for one signal.
    unsafe { libc::signal(libc::SIGINT, ignore as *const () as libc::sighandler_t) };
    let scratch = Scratch::new().map_err(ExecError::Scratch)?;
    let dir = scratch.0.as_path();
    let cwd = std::env::current_dir().map_err(ExecError::Cwd)?;
    let mut shares = vec![RawShare {
        path: PathBuf::from("/"),
        tag: ROOT_TAG.to_string(),
        read_write: false,
    }];
    let mut spec_shares = Vec::new();
    for (index, path) in options.shares.iter().enumerate() {
        let at = std::fs::canonicalize(path).map_err(|source| ExecError::Share {
            path: path.clone(),
            source,
        })?;
        let tag = format!("share{index}");
        shares.push(RawShare {
            path: at.clone(),
            tag: tag.clone(),
            read_write: true,
        });
        spec_shares.push((tag, at, true));
    }
    let spec = Spec {
        cwd,
        // SAFETY: getuid and getgid have no preconditions and can not fail.
        uid: unsafe { libc::getuid() },
        // SAFETY: as above.
        gid: unsafe { libc::getgid() },
        groups: supplementary_groups(),
        shares: spec_shares,
        env: std::env::vars_os()
            .map(|(k, v)| {
                let mut entry = k;
                entry.push("=");
                entry.push(v);
                entry
            })
            .collect(),
        argv: options.command.clone(),
    };
    let initrd = dir.join("initramfs.cpio");
    let file = std::fs::File::create(&initrd).map_err(ExecError::Initramfs)?;
    initramfs::write(std::io::BufWriter::new(file), &spec, &options.modules)
        .map_err(ExecError::Initramfs)?;
    let uds = dir.join("vsock");
    let listening = Listening::bind(&uds).map_err(ExecError::Listen)?;
    let console = dir.join("console.log");
    let raw = RawConfig {
        kernel: Some(options.kernel.clone()),
        initrd: Some(initrd),
        cmdline: Some(format!(
            "quiet panic=-1 {}",
            options.cmdline.as_deref().unwrap_or("")
        )),
        vcpus: Some(options.vcpus),
        mem_mib: Some(options.mem_mib),
        console: Some(format!("file:{}", console.display())),
        vm_id: Some(format!("exec-{}", std::process::id())),
        vsock: Some(RawVsock {
            cid: GUEST_CID,
            uds: uds.clone(),
            buffer_mib: None,
        }),
        shares: Some(shares),
        virtiofsd: options.virtiofsd.clone(),
        timeout: options.timeout,
        ..RawConfig::default()
    };
    let settings = dir.join("settings.json");
    let json = raw.to_json();
    if json.is_empty() {
        // Settings are JSON strings: a path that is not UTF-8 can not be passed on.
        return Err(ExecError::Settings {
            path: settings,
            source: std::io::Error::other("a path (kernel, share or TMPDIR) is not UTF-8"),
        });
    }
    std::fs::write(&settings, json).map_err(|source| ExecError::Settings {
        path: settings.clone(),
        source,
    })?;
    let exe = std::env::current_exe().map_err(ExecError::Exe)?;
    let serving = listening.serve(std::io::stdout(), std::io::stderr());
    let supervisor = Supervisor::start(Launch {
        exe: &exe,
        config: &settings,
        log_level: Some(log_level.unwrap_or("warn")),
        no_seccomp: options.no_seccomp,
        inherit: Vec::new(),
        output: None,
        own_group: false,
        dies_with_us: true,
    })?;
    let pid = supervisor.pid();
    let wake = serving.paths().clone();
    // The VM's end wakes whichever stream the guest never opened.
    let reaper = std::thread::Builder::new()
        .name("exec-reaper".into())
        .spawn(move || {
            let run_status = crate::process::reap(pid);
            for path in &wake {
                let _ = std::os::unix::net::UnixStream::connect(path);
            }
            run_status
        })
        .map_err(|e| {
            ExecError::Launch(crate::api::launch::LaunchError::Watch { pid, source: e })
        })?;
    let mut serving = serving;
    let ending = serving.wait_for_status();
    let run_status = reaper.join().unwrap_or(status::RUNTIME_ERROR);
    let ending = ending.or_else(|| serving.finish());
    Ok(outcome(ending, run_status, &console, options.timeout))
}

/// The status `bulkhead exec` exits with, from what the guest said and how the VM ended.
fn outcome(ending: Option<Ending>, run_status: i32, console: &Path, timeout: Option<u64>) -> i32 {
    if let Some(code) = ending.as_ref().and_then(Ending::status) {
        return code;
    }
    let why = match (&ending, run_status) {
        (Some(Ending::NotRun(why)), _) => format!("the command did not run: {why}"),
        (_, status::TIMEOUT) => {
            eprintln!(
                "bulkhead exec: the command did not finish in {} s (--timeout)",
                timeout.unwrap_or(0)
            );
            return status::TIMEOUT;
        }
        (_, status::GUEST_PANIC) => {
            eprintln!("bulkhead exec: the guest kernel panicked; its console ends:");
            print_tail(console);
            return status::GUEST_PANIC;
        }
        // `bulkhead run` said what was wrong with the input.
        (_, status::BAD_INPUT) => return status::BAD_INPUT,
        // Stopped from outside (Ctrl-C, SIGTERM to the supervisor): as a shell reports it.
        (_, code @ (129 | 130 | status::TERMINATED)) => {
            eprintln!("bulkhead exec: stopped before the command finished");
            return code;
        }
        (_, code) => format!(
            "the VM ended (bulkhead run status {code}) before the command's status came back"
        ),
    };
    eprintln!("bulkhead exec: {why}; the guest console ends:");
    print_tail(console);
    status::EXEC_NOT_RUN
}

fn print_tail(console: &Path) {
    let Ok(file) = std::fs::File::open(console) else {
        eprintln!("  (no console output)");
        return;
    };
    let lines: Vec<String> = BufReader::new(file)
        .split(b'\n')
        .map_while(Result::ok)
        .map(|l| {
            String::from_utf8_lossy(&l)
                .trim_end_matches('\r')
                .to_string()
        })
        .collect();
    for line in &lines[lines.len().saturating_sub(CONSOLE_TAIL)..] {
        eprintln!("  | {line}");
    }
}

/// This process's supplementary groups.
fn supplementary_groups() -> Vec<u32> {
    // SAFETY: getgroups with a zero size only counts.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    let Ok(len) = usize::try_from(n) else {
        return Vec::new();
    };
    let mut groups = vec![0; len];
    // SAFETY: `groups` has room for `n` entries.
    let got = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
    groups.truncate(usize::try_from(got).unwrap_or(0));
    groups
}

/// A directory only this user may enter, removed with everything in it when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> std::io::Result<Scratch> {
        crate::hostfile::private_dir("bulkhead-exec").map(Scratch)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
