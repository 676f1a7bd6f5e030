//! `bulkhead jailer`: Firecracker's jailer, for the orchestrators that start Firecracker
//! through it (Kata's Go runtime, firecracker-go-sdk). Same flags, same directory layout and
//! pid file, so they run bulkhead's Firecracker personality unchanged:
//!
//! - the chroot is `CHROOT_BASE/EXEC_NAME/ID/root`, the exec file is copied to
//!   `CHROOT/EXEC_NAME`, and `/dev/kvm` and `/dev/net/tun` are made there for uid:gid;
//! - the process joins `--netns`, takes `--cgroup FILE=VALUE` settings and rlimits, enters a
//!   mount namespace of its own (and a pid namespace with `--new-pid-ns`), writes its pid to
//!   `CHROOT/EXEC_NAME.pid`, pivots into the chroot, drops to uid:gid and execs
//!   `/EXEC_NAME --id ID --start-time-us .. --start-time-cpu-us .. --parent-cpu-time-us ..
//!   ARGS`.
//!
//! bulkhead adds a `/proc` that shows only the jailed uid's processes (so its VMM can find its
//! own threads) and never follows a symlink in the paths it makes.

use std::ffi::CString;
use std::path::{Component, Path, PathBuf};

use super::chroot::{Chroot, ChrootError};
use super::privileges::{self, PrivilegeError, Rlimits};
use super::root::{self, RootError};

#[derive(Debug, thiserror::Error)]
pub enum JailerError {
    #[error("--id {0:?}: letters, digits and '-' only, at most 64")]
    Id(String),
    #[error("--exec-file {0}: must be an existing absolute path to a file")]
    ExecFile(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--uid and --gid must both be 0 or both not")]
    MixedRoot,
    #[error("{0}: a symlink where the jail makes its files")]
    Symlink(PathBuf),
    #[error("--cgroup {0:?}: expected FILE=VALUE with a controller's file name (or a relative --parent-cgroup)")]
    Cgroup(String),
    #[error("--resource-limit {0:?}: expected fsize=N or no-file=N")]
    Limit(String),
    #[error(transparent)]
    Root(#[from] RootError),
    #[error(transparent)]
    Chroot(#[from] ChrootError),
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
}

/// The jailer's settings, as Firecracker's jailer takes them.
#[derive(Debug, Clone, Default)]
pub struct JailerOptions {
    pub id: String,
    pub exec_file: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base_dir: PathBuf,
    pub netns: Option<PathBuf>,
    pub cgroup_version: u8,
    pub cgroups: Vec<String>,
    pub parent_cgroup: Option<String>,
    pub resource_limits: Vec<String>,
    pub daemonize: bool,
    pub new_pid_ns: bool,
    /// What follows `--`: the VMM's own arguments.
    pub args: Vec<String>,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JailerError {
    let path = path.to_path_buf();
    move |source| JailerError::Io { what, path, source }
}

fn now_us(clock: libc::clockid_t) -> u64 {
    // SAFETY: an all-zero timespec is valid, and clock_gettime only writes it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1000
}

/// Writes `pid` to the new file `name` in the chroot.
fn write_pid_file(jail: &Chroot, name: &str, pid: libc::pid_t) -> Result<(), JailerError> {
    let mut f = jail.new_file(Path::new(name), 0o644)?;
    std::io::Write::write_all(&mut f, pid.to_string().as_bytes())
        .map_err(io("writing", &jail.root.path.join(name)))
}

/// Applies `--cgroup FILE=VALUE` settings under `PARENT/ID` and moves this process in.
fn cgroups(o: &JailerOptions, exec_name: &str) -> Result<(), JailerError> {
    let parent = o
        .parent_cgroup
        .clone()
        .unwrap_or_else(|| exec_name.to_string());
    for setting in &o.cgroups {
        let (file, value) = setting
            .split_once('=')
            .filter(|(f, _)| f.contains('.') && !f.contains('/'))
            .ok_or_else(|| JailerError::Cgroup(setting.clone()))?;
        let base = if o.cgroup_version == 2 {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            let controller = file.split('.').next().unwrap_or("");
            PathBuf::from("/sys/fs/cgroup").join(controller)
        };
        let dir = base.join(&parent).join(&o.id);
        std::fs::create_dir_all(&dir).map_err(io("creating the cgroup", &dir))?;
        if o.cgroup_version == 2 {
            // Each level above must hand the controller down.
            let controller = file.split('.').next().unwrap_or("");
            let mut level = base.clone();
            for part in Path::new(&parent).components() {
                let _ = std::fs::write(
                    level.join("cgroup.subtree_control"),
                    format!("+{controller}"),
                );
                level.push(part);
            }
            let _ = std::fs::write(
                level.join("cgroup.subtree_control"),
                format!("+{controller}"),
            );
        }
        if o.cgroup_version != 2 && file.starts_with("cpuset.") {
            // A v1 cpuset needs its CPUs and memory nodes before it takes a process.
            for f in ["cpuset.cpus", "cpuset.mems"] {
                for level in [base.join(&parent), dir.clone()] {
                    let current = std::fs::read_to_string(level.join(f)).unwrap_or_default();
                    if current.trim().is_empty() {
                        let from = std::fs::read_to_string(base.join(f)).unwrap_or_default();
                        let _ = std::fs::write(level.join(f), from.trim());
                    }
                }
            }
        }
        let target = dir.join(file);
        std::fs::write(&target, value).map_err(io("writing", &target))?;
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, "0").map_err(io("joining", &procs))?;
    }
    Ok(())
}

fn rlimits(o: &JailerOptions) -> Result<Rlimits, JailerError> {
    let mut limits = Rlimits {
        open_files: 2048,
        file_size_bytes: libc::RLIM_INFINITY,
    };
    for l in &o.resource_limits {
        let bad = || JailerError::Limit(l.clone());
        let (name, value) = l.split_once('=').ok_or_else(bad)?;
        let value: u64 = value.parse().map_err(|_| bad())?;
        match name {
            "fsize" => limits.file_size_bytes = value,
            "no-file" => limits.open_files = value,
            _ => return Err(bad()),
        }
    }
    Ok(limits)
}

/// The shared objects (the dynamic loader included) this process has mapped.
fn shared_libraries() -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut libs: Vec<PathBuf> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.starts_with('/') && (p.ends_with(".so") || p.contains(".so.")))
        .map(PathBuf::from)
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

/// The program interpreter this program asks for (its ELF PT_INTERP), if any.
fn interpreter() -> Option<PathBuf> {
    let elf = std::fs::read("/proc/self/exe").ok()?;
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let (size, count) = (usize::from(u16_at(0x36)?), usize::from(u16_at(0x38)?));
    const PT_INTERP: u32 = 3;
    (0..count).find_map(|i| {
        let ph = phoff + i * size;
        if u32_at(ph)? != PT_INTERP {
            return None;
        }
        let off = usize::try_from(u64_at(ph + 8)?).ok()?;
        let len = usize::try_from(u64_at(ph + 32)?).ok()?;
        let bytes = elf.get(off..off + len)?;
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        Some(PathBuf::from(std::str::from_utf8(bytes.get(..end)?).ok()?))
    })
}

/// Forks; the parent leaves at once (status 0) and the child goes on.
fn detach() -> Result<(), JailerError> {
    // SAFETY: the jailer is single-threaded; the child goes on running ordinary code.
    match unsafe { libc::fork() } {
        -1 => Err(io("forking", Path::new("/"))(
            std::io::Error::last_os_error(),
        )),
        0 => Ok(()),
        // SAFETY: _exit has no preconditions.
        _ => unsafe { libc::_exit(0) },
    }
}

/// Sets up the jail and execs the VMM; returns only on failure.
pub fn run(o: &JailerOptions) -> JailerError {
    match jail_and_exec(o) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn jail_and_exec(o: &JailerOptions) -> Result<std::convert::Infallible, JailerError> {
    if (o.uid == 0) != (o.gid == 0) {
        // Half root is no jail: root's uid with another gid, or the reverse.
        return Err(JailerError::MixedRoot);
    }
    let parent_ok = o.parent_cgroup.as_deref().map_or(true, |p| {
        !p.is_empty()
            && Path::new(p)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
    });
    if !parent_ok {
        return Err(JailerError::Cgroup(
            o.parent_cgroup.clone().unwrap_or_default(),
        ));
    }
    let ok_id = !o.id.is_empty()
        && o.id.len() <= 64
        && o.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !ok_id {
        return Err(JailerError::Id(o.id.clone()));
    }
    let exec_name = o
        .exec_file
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|_| o.exec_file.is_absolute() && o.exec_file.is_file())
        .ok_or_else(|| JailerError::ExecFile(o.exec_file.clone()))?
        .to_string();
    let start_us = now_us(libc::CLOCK_REALTIME);
    let start_cpu_us = now_us(libc::CLOCK_PROCESS_CPUTIME_ID);
    if o.chroot_base_dir
        .components()
        .any(|c| matches!(c, Component::ParentDir))
        || !o.chroot_base_dir.is_absolute()
    {
        return Err(JailerError::ExecFile(o.chroot_base_dir.clone()));
    }
    // Every level down to the chroot is root's alone, and nothing an earlier occupant (who
    // ran as uid:gid, or as root inside) left there is taken over: the jail's own files must
    // be absent, and everything is made through its parent's descriptor.
    let jail = Chroot::open(&o.chroot_base_dir, &exec_name, &o.id)?;
    let chroot = jail.root.path.clone();
    let pid_file = format!("{exec_name}.pid");
    jail.refuse_stale(&[
        exec_name.as_str(),
        pid_file.as_str(),
        "dev",
        "proc",
        "etc",
        "usr",
        "lib",
        "lib64",
    ])?;
    let binary = chroot.join(&exec_name);
    let mut from = std::fs::File::open(&o.exec_file).map_err(io("reading", &o.exec_file))?;
    let mut to = jail.new_file(Path::new(&exec_name), 0o755)?;
    std::io::copy(&mut from, &mut to).map_err(io("copying the exec file to", &binary))?;
    drop(to);
    jail.device(Path::new("dev/kvm"), Path::new("/dev/kvm"), o.uid, o.gid)?;
    jail.device(
        Path::new("dev/net/tun"),
        Path::new("/dev/net/tun"),
        o.uid,
        o.gid,
    )?;
    jail.dir(Path::new("proc"))?;
    // The one place the VMM may write (its sockets, its work directory), as Firecracker's
    // jailer gives it: kept as the caller made it (Kata makes it before starting the jailer).
    jail.own_dir("run", o.uid, o.gid)?;
    cgroups(o, &exec_name)?;
    let limits = rlimits(o)?;
    if let Some(ns) = &o.netns {
        root::join_network(ns)?;
    }
    if o.daemonize {
        // A new session, keeping this pid (the one the caller knows) unless this process
        // already leads a process group, which setsid refuses.
        // SAFETY: setsid has no preconditions.
        if unsafe { libc::setsid() } < 0 {
            detach()?;
            // SAFETY: as above.
            unsafe { libc::setsid() };
        }
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(io("opening", Path::new("/dev/null")))?;
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 of a descriptor this process owns onto stdio.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    if o.new_pid_ns {
        // SAFETY: unshare with a flag only; the jailer is single-threaded.
        if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
            return Err(io("entering a new pid namespace", Path::new("/"))(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: as in `detach`.
        let child = unsafe { libc::fork() };
        if child < 0 {
            return Err(io("forking", Path::new("/"))(
                std::io::Error::last_os_error(),
            ));
        }
        if child > 0 {
            // The pid file names the VMM, as Firecracker's jailer writes it.
            let written = write_pid_file(&jail, &pid_file, child);
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(i32::from(written.is_err())) };
        }
    } else {
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        write_pid_file(&jail, &pid_file, pid)?;
    }
    root::enter_namespaces(&o.id)?;
    // The VMM is this program, which the dynamic loader needs its libraries for: exactly
    // those this process has mapped, read-only at their own paths.
    // Opened again in the new mount namespace: a descriptor from the old one leads to mounts
    // this namespace can not mount on.
    let jail = Chroot::open(&o.chroot_base_dir, &exec_name, &o.id)?;
    let libs = shared_libraries();
    for lib in &libs {
        jail.bind_read_only(lib, lib)?;
    }
    // The loader itself, at the path the program names it by (often a symlink's).
    if let Some(interp) = interpreter().filter(|i| !libs.contains(i)) {
        if let Ok(real) = std::fs::canonicalize(&interp) {
            jail.bind_read_only(&real, &interp)?;
        }
    }
    // Nothing can be placed where the loader looks for its configuration (ld.so.preload,
    // ld.so.cache): an empty, read-only /etc.
    jail.empty_read_only(Path::new("etc"))?;
    // The VMM finds its own threads (and its own binary) here; others' processes are hidden
    // from it. Not for a root VMM outside a pid namespace of its own: root sees through
    // hidepid, and the host's processes' roots would be a way out of the chroot.
    if o.new_pid_ns {
        root::mount_proc_with(&chroot, "subset=pid")?;
    } else if o.uid != 0 {
        root::mount_proc_with(&chroot, "subset=pid,hidepid=invisible")?;
    } else {
        log::warn!("jailer: no /proc in the chroot of a root VMM without --new-pid-ns: the VMM's halt watchdog is off");
    }
    // The chroot's root stays root's: the VMM can not add a file to it.
    root::pivot(&chroot)?;
    privileges::set_rlimits(limits)?;
    if o.uid != 0 {
        privileges::drop_to(o.uid, o.gid)?;
    } else {
        log::warn!(
            "jailer: --uid 0 keeps the VMM root inside its chroot, as Firecracker's jailer does"
        );
    }
    let parent_cpu_us = now_us(libc::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(start_cpu_us);
    let program = format!("/{exec_name}");
    let mut argv: Vec<String> = vec![
        program.clone(),
        "--id".into(),
        o.id.clone(),
        "--start-time-us".into(),
        start_us.to_string(),
        "--start-time-cpu-us".into(),
        start_cpu_us.to_string(),
        "--parent-cpu-time-us".into(),
        parent_cpu_us.to_string(),
    ];
    argv.extend(o.args.iter().cloned());
    let cstrings: Vec<CString> = argv
        .iter()
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
    let mut ptrs: Vec<*const libc::c_char> = cstrings.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let prog =
        CString::new(program.as_bytes()).map_err(|_| JailerError::ExecFile(binary.clone()))?;
    // Nothing of the caller's goes along: no descriptor but stdio, no environment.
    // SAFETY: close_range closes descriptors only; nothing here uses those above stdio.
    unsafe { libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0) };
    let env: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: `prog` and every argv entry are valid NUL-terminated strings that outlive the
    // call, both arrays end with a null pointer; execve only returns on failure.
    unsafe { libc::execve(prog.as_ptr(), ptrs.as_ptr(), env.as_ptr()) };
    Err(io("executing", &binary)(std::io::Error::last_os_error()))
}
