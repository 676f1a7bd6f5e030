//! A VM process's own cgroup, with CPU, memory and pids limits: cgroup v2 when its unified
//! hierarchy offers all three controllers, otherwise the v1 hierarchies that mount them (as on
//! this project's hosts, where cgroup2 has no controllers).

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup hierarchy offers the {0} controller")]
    NoController(&'static str),
    #[error("cgroup name {0:?}: use path components of A-Z a-z 0-9 . _ - only")]
    BadName(String),
    #[error("cgroup {path} already exists: a VM's cgroup is only ever one bulkhead made itself")]
    Exists { path: PathBuf },
    #[error("cannot create cgroup {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove cgroup {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The controllers a VM's cgroup uses.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// Where the controllers live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// The unified hierarchy's root.
    V2(PathBuf),
    /// One mount per controller, in `CONTROLLERS` order.
    V1([PathBuf; 3]),
}

/// What one VM may use; `None` leaves a limit unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// CPU time per period: `(quota_us, period_us)`, e.g. `(200_000, 100_000)` for two CPUs.
    pub cpu: Option<(u64, u64)>,
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
}

/// Finds the hierarchies in `/proc/self/mountinfo`.
pub fn detect() -> Result<Hierarchy, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let mountinfo = std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let v2_controllers =
        |root: &Path| std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    from_mountinfo(&mountinfo, v2_controllers)
}

/// The hierarchies `mountinfo` describes; `v2_controllers` reads a unified mount's
/// `cgroup.controllers`.
fn from_mountinfo(
    mountinfo: &str,
    v2_controllers: impl Fn(&Path) -> String,
) -> Result<Hierarchy, CgroupError> {
    let mut v1: [Option<PathBuf>; 3] = [None, None, None];
    for line in mountinfo.lines() {
        // mount id, parent, dev, root, mount point, options, optional fields, "-", fs type,
        // source, super options.
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split(' ').nth(4).map(PathBuf::from);
        let mut right = right.split(' ');
        let (fs, super_options) = (right.next(), right.nth(1).unwrap_or(""));
        let Some(mount_point) = mount_point else {
            continue;
        };
        match fs {
            Some("cgroup2") => {
                let offered = v2_controllers(&mount_point);
                let offered: Vec<&str> = offered.split_whitespace().collect();
                if CONTROLLERS.iter().all(|c| offered.contains(c)) {
                    return Ok(Hierarchy::V2(mount_point));
                }
            }
            Some("cgroup") => {
                let options: Vec<&str> = super_options.split(',').collect();
                for (slot, c) in v1.iter_mut().zip(CONTROLLERS) {
                    if slot.is_none() && options.contains(&c) {
                        *slot = Some(mount_point.clone());
                    }
                }
            }
            _ => {}
        }
    }
    let [cpu, memory, pids] = v1;
    Ok(Hierarchy::V1([
        cpu.ok_or(CgroupError::NoController("cpu"))?,
        memory.ok_or(CgroupError::NoController("memory"))?,
        pids.ok_or(CgroupError::NoController("pids"))?,
    ]))
}

/// A VM's cgroup: one directory under each hierarchy in use.
#[derive(Debug)]
pub struct VmCgroup {
    dirs: Vec<PathBuf>,
}

fn write(path: PathBuf, value: String) -> Result<(), CgroupError> {
    std::fs::write(&path, &value).map_err(|source| CgroupError::Write {
        path,
        value,
        source,
    })
}

impl VmCgroup {
    /// Creates the cgroup `name` (e.g. `bulkhead/VM-ID`; parents are created as needed, the
    /// last component must not exist) and sets `limits` on it.
    pub fn create(h: &Hierarchy, name: &str, limits: &Limits) -> Result<VmCgroup, CgroupError> {
        let ok = !name.is_empty()
            && name.split('/').all(|c| {
                !c.is_empty()
                    && c != "."
                    && c != ".."
                    && c.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            });
        if !ok {
            return Err(CgroupError::BadName(name.to_string()));
        }
        let roots: Vec<PathBuf> = match h {
            Hierarchy::V2(root) => vec![root.clone()],
            Hierarchy::V1(mounts) => mounts.to_vec(),
        };
        let mut group = VmCgroup { dirs: Vec::new() };
        for root in roots {
            let dir = root.join(name);
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent).map_err(|source| CgroupError::Create {
                    path: parent.to_path_buf(),
                    source,
                })?;
                if let Hierarchy::V2(_) = h {
                    // Each level must hand the controllers down to the next.
                    let mut level = root.clone();
                    for part in Path::new(name).parent().into_iter().flat_map(Path::iter) {
                        write(
                            level.join("cgroup.subtree_control"),
                            "+cpu +memory +pids".into(),
                        )?;
                        level.push(part);
                    }
                    write(
                        level.join("cgroup.subtree_control"),
                        "+cpu +memory +pids".into(),
                    )?;
                }
            }
            match std::fs::create_dir(&dir) {
                Ok(()) => group.dirs.push(dir),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(CgroupError::Exists { path: dir });
                }
                Err(source) => return Err(CgroupError::Create { path: dir, source }),
            }
        }
        group.limit(h, limits)?;
        Ok(group)
    }

    fn limit(&self, h: &Hierarchy, limits: &Limits) -> Result<(), CgroupError> {
        let dir = |i: usize| {
            self.dirs
                .get(i)
                .or(self.dirs.first())
                .cloned()
                .unwrap_or_default()
        };
        match h {
            Hierarchy::V2(_) => {
                if let Some((quota, period)) = limits.cpu {
                    write(dir(0).join("cpu.max"), format!("{quota} {period}"))?;
                }
                if let Some(bytes) = limits.memory_bytes {
                    write(dir(0).join("memory.max"), bytes.to_string())?;
                    write(dir(0).join("memory.swap.max"), "0".into())?;
                }
                if let Some(pids) = limits.pids {
                    write(dir(0).join("pids.max"), pids.to_string())?;
                }
            }
            Hierarchy::V1(_) => {
                if let Some((quota, period)) = limits.cpu {
                    write(dir(0).join("cpu.cfs_period_us"), period.to_string())?;
                    write(dir(0).join("cpu.cfs_quota_us"), quota.to_string())?;
                }
                if let Some(bytes) = limits.memory_bytes {
                    write(dir(1).join("memory.limit_in_bytes"), bytes.to_string())?;
                }
                if let Some(pids) = limits.pids {
                    write(dir(2).join("pids.max"), pids.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    pub fn add(&self, pid: libc::pid_t) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            write(dir.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// The cgroup's directories, one per hierarchy.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Removes the cgroup; its processes must have ended.
    pub fn remove(self) -> Result<(), CgroupError> {
        for dir in self.dirs {
            std::fs::remove_dir(&dir)
                .map_err(|source| CgroupError::Remove { path: dir, source })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_MOUNTINFO: &str = "\
24 1 0:21 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
25 24 0:22 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
26 24 0:23 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
27 24 0:24 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
28 24 0:25 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
29 24 0:26 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn v1_is_used_when_cgroup2_lacks_the_controllers() {
        let h = from_mountinfo(V1_MOUNTINFO, |_| String::new()).unwrap();
        assert_eq!(
            h,
            Hierarchy::V1([
                "/sys/fs/cgroup/cpu".into(),
                "/sys/fs/cgroup/memory".into(),
                "/sys/fs/cgroup/pids".into()
            ])
        );
    }

    #[test]
    fn v2_is_used_when_it_offers_all_three_controllers() {
        let h = from_mountinfo(V1_MOUNTINFO, |p| {
            assert_eq!(p, Path::new("/sys/fs/cgroup/unified"));
            "cpuset cpu io memory hugetlb pids rdma".to_string()
        })
        .unwrap();
        assert_eq!(h, Hierarchy::V2("/sys/fs/cgroup/unified".into()));
    }

    #[test]
    fn a_missing_controller_is_named() {
        let no_pids: String = V1_MOUNTINFO
            .lines()
            .filter(|l| !l.contains("pids"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(matches!(
            from_mountinfo(&no_pids, |_| String::new()),
            Err(CgroupError::NoController("pids"))
        ));
    }

    #[test]
    fn names_that_could_leave_the_hierarchy_are_refused() {
        let h = Hierarchy::V1([
            "/nonexistent/a".into(),
            "/nonexistent/b".into(),
            "/nonexistent/c".into(),
        ]);
        for name in ["", "..", "bulkhead/../x", "/abs", "a//b", "a b"] {
            assert!(
                matches!(
                    VmCgroup::create(&h, name, &Limits::default()),
                    Err(CgroupError::BadName(_))
                ),
                "{name:?}"
            );
        }
    }

    #[test]
    fn a_process_moved_in_runs_under_the_limits_and_the_cgroup_goes_away_after_it() {
        if !crate::jail::test_as_root("creating cgroups") {
            return;
        }
        let h = detect().unwrap();
        let name = format!("bulkhead-test/cg-{}", std::process::id());
        let limits = Limits {
            cpu: Some((50_000, 100_000)),
            memory_bytes: Some(64 << 20),
            pids: Some(8),
        };
        let cg = VmCgroup::create(&h, &name, &limits).unwrap();
        // A second VM can not take the same cgroup.
        assert!(matches!(
            VmCgroup::create(&h, &name, &limits),
            Err(CgroupError::Exists { .. })
        ));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        cg.add(child.id() as libc::pid_t).unwrap();
        let membership = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        for controller in ["cpu", "memory", "pids"] {
            // v1: "ID:CONTROLLERS:/PATH" per hierarchy; v2: one "0::/PATH".
            let line = membership
                .lines()
                .find(|l| {
                    let controllers = l.split(':').nth(1).unwrap_or("");
                    match h {
                        Hierarchy::V1(_) => controllers.split(',').any(|c| c == controller),
                        Hierarchy::V2(_) => l.starts_with("0::"),
                    }
                })
                .unwrap_or_default();
            assert!(
                line.ends_with(&format!("/{name}")),
                "{controller}: {membership}"
            );
        }
        let read = |i: usize, file: &str| {
            std::fs::read_to_string(cg.dirs()[i.min(cg.dirs().len() - 1)].join(file))
                .unwrap()
                .trim()
                .to_string()
        };
        match &h {
            Hierarchy::V1(_) => {
                assert_eq!(read(0, "cpu.cfs_quota_us"), "50000");
                assert_eq!(read(1, "memory.limit_in_bytes"), (64u64 << 20).to_string());
                assert_eq!(read(2, "pids.max"), "8");
            }
            Hierarchy::V2(_) => {
                assert_eq!(read(0, "cpu.max"), "50000 100000");
                assert_eq!(read(0, "memory.max"), (64u64 << 20).to_string());
                assert_eq!(read(0, "pids.max"), "8");
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let dirs = cg.dirs().to_vec();
        cg.remove().unwrap();
        assert!(dirs.iter().all(|d| !d.exists()));
        for d in dirs {
            let _ = std::fs::remove_dir(d.parent().unwrap());
        }
    }
}
