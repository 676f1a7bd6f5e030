//! Dropping what a VM process must not keep: every capability (the bounding set included, so
//! none can come back through an executable), root (a per-VM uid and gid, no supplementary
//! groups), the ability to gain privileges (no_new_privs), and unbounded open files and file
//! sizes. Each step is checked afterwards, not assumed.

use crate::procfs::ProcStatus;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("{what} failed: {source}")]
    Call {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("uid {uid} or gid {gid}: a jailed VM never runs as root")]
    Root { uid: u32, gid: u32 },
    #[error("after dropping, {what} is still {value}")]
    StillHeld { what: &'static str, value: String },
}

/// Resource limits for the jailed process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimits {
    pub open_files: u64,
    pub file_size_bytes: u64,
}

fn check(what: &'static str, rc: libc::c_int) -> Result<(), PrivilegeError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(PrivilegeError::Call {
            what,
            source: std::io::Error::last_os_error(),
        })
    }
}

/// The highest capability number this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// Sets the limits; both soft and hard, so the process can not raise them again.
pub fn set_rlimits(limits: Rlimits) -> Result<(), PrivilegeError> {
    for (resource, value, what) in [
        (
            libc::RLIMIT_NOFILE,
            limits.open_files,
            "setrlimit(RLIMIT_NOFILE)",
        ),
        (
            libc::RLIMIT_FSIZE,
            limits.file_size_bytes,
            "setrlimit(RLIMIT_FSIZE)",
        ),
    ] {
        let rl = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: `rl` is a valid rlimit the call only reads.
        check(what, unsafe { libc::setrlimit(resource, &rl) })?;
    }
    Ok(())
}

/// Becomes `uid:gid` for good, with no capabilities left in any set and no_new_privs on. Must
/// be called by root, on a process with one thread (set*id affect only the calling thread's
/// credentials at the kernel level; glibc broadcasts them, but a jail is entered first thing).
pub fn drop_to(uid: u32, gid: u32) -> Result<(), PrivilegeError> {
    if uid == 0 || gid == 0 {
        return Err(PrivilegeError::Root { uid, gid });
    }
    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes with root.
    for cap in 0..=last_cap() {
        // SAFETY: prctl with integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        // EINVAL: a capability this kernel does not have.
        if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(PrivilegeError::Call {
                what: "prctl(PR_CAPBSET_DROP)",
                source: std::io::Error::last_os_error(),
            });
        }
    }
    // SAFETY: prctl with integer arguments.
    check("prctl(PR_CAP_AMBIENT_CLEAR_ALL)", unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    })?;
    // SAFETY: an empty group list; setgroups reads nothing through the null pointer.
    check("setgroups", unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: set*id with integer arguments.
    check("setresgid", unsafe { libc::setresgid(gid, gid, gid) })?;
    // Leaving uid 0 clears the permitted, effective and ambient sets (no SECBIT_KEEP_CAPS).
    // SAFETY: as above.
    check("setresuid", unsafe { libc::setresuid(uid, uid, uid) })?;
    // SAFETY: prctl with integer arguments.
    check("prctl(PR_SET_NO_NEW_PRIVS)", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    verify(uid, gid)
}

/// Makes the calling thread alone `uid` (gid the same, no supplementary groups), for a
/// short-lived thread that acts as a user: checks a permission, or connects so that the
/// other end's SO_PEERCRED sees that user. The raw system calls change this thread's
/// credentials only (glibc's wrappers would change every thread's), so the thread must end
/// right after its work: it can not come back.
pub fn become_on_this_thread(uid: u32) -> std::io::Result<()> {
    become_user_on_this_thread(&User {
        uid,
        gid: uid,
        groups: Vec::new(),
    })
}

/// A user as the kernel checks permissions for it: uid, primary gid and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl User {
    /// `uid` as the password database describes it (its primary group and the groups it is a
    /// member of); a uid with no entry gets a gid equal to it and no other group.
    pub fn lookup(uid: u32) -> User {
        let mut pwd: libc::passwd = unsafe_zeroed_passwd();
        let mut buf = vec![0u8; 16 << 10];
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is to a live buffer of the stated length; getpwuid_r writes
        // only into them.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        if rc != 0 || found.is_null() {
            return User {
                uid,
                gid: uid,
                groups: Vec::new(),
            };
        }
        let gid = pwd.pw_gid;
        let mut groups = vec![0 as libc::gid_t; 256];
        let mut n = groups.len() as libc::c_int;
        // SAFETY: pw_name points into `buf`, alive here; `groups` holds `n` entries.
        let got = unsafe { libc::getgrouplist(pwd.pw_name, gid, groups.as_mut_ptr(), &mut n) };
        groups.truncate(if got < 0 { 0 } else { n.max(0) as usize });
        User { uid, gid, groups }
    }
}

fn unsafe_zeroed_passwd() -> libc::passwd {
    // SAFETY: passwd is a plain C struct of integers and pointers; all-zero is a valid value
    // (null pointers), filled in by getpwuid_r before anything reads it.
    unsafe { std::mem::zeroed() }
}

/// Makes the calling thread alone `user`, as [`become_on_this_thread`] does with the user's
/// own gid and groups.
pub fn become_user_on_this_thread(user: &User) -> std::io::Result<()> {
    let (uid, gid) = (user.uid, user.gid);
    // SAFETY: set*id and setgroups with integer arguments and a group list of the length
    // given; they touch only this thread's credentials.
    let ok = unsafe {
        libc::syscall(libc::SYS_setgroups, user.groups.len(), user.groups.as_ptr()) == 0
            && libc::syscall(libc::SYS_setresgid, gid, gid, gid) == 0
            && libc::syscall(libc::SYS_setresuid, uid, uid, uid) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reads back what the kernel says about this process.
fn verify(uid: u32, gid: u32) -> Result<(), PrivilegeError> {
    let status = ProcStatus::of_this_thread().map_err(|source| PrivilegeError::Call {
        what: "reading /proc/thread-self/status",
        source,
    })?;
    let field = |name: &str| status.field(name).unwrap_or("").to_string();
    for (what, id) in [("Uid", uid), ("Gid", gid)] {
        // Real, effective, saved and filesystem ids.
        if status.numbers(what) != Some(vec![u64::from(id); 4]) {
            return Err(PrivilegeError::StillHeld {
                what,
                value: field(what),
            });
        }
    }
    const NONE: &str = "0000000000000000";
    for (what, want) in [
        ("Groups", ""),
        ("CapInh", NONE),
        ("CapPrm", NONE),
        ("CapEff", NONE),
        ("CapBnd", NONE),
        ("CapAmb", NONE),
        ("NoNewPrivs", "1"),
    ] {
        let value = field(what);
        if value != want {
            return Err(PrivilegeError::StillHeld { what, value });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHILD: &str = "BULKHEAD_PRIVILEGES_TEST_CHILD";

    /// The part that runs in a process of its own: dropping is for good.
    #[test]
    fn child_drops_everything() {
        if std::env::var(CHILD).is_err() {
            return;
        }
        set_rlimits(Rlimits {
            open_files: 64,
            file_size_bytes: 1 << 20,
        })
        .unwrap();
        drop_to(123_456, 123_456).unwrap();
        // Root's files are now out of reach, and privileges can not come back.
        assert!(std::fs::read_to_string("/etc/shadow").is_err());
        // SAFETY: setuid with an integer argument.
        assert_ne!(unsafe { libc::setuid(0) }, 0);
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `rl` is valid for writes.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) }, 0);
        assert_eq!((rl.rlim_cur, rl.rlim_max), (64, 64));
        println!("CHILD-OK");
    }

    #[test]
    fn a_dropped_process_has_no_capabilities_no_root_and_no_way_back() {
        if !crate::jail::test_as_root("dropping privileges") {
            return;
        }
        // Run the child test alone in a fresh process (one thread when it drops).
        let out = crate::jail::child_test("jail::privileges::tests::child_drops_everything")
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("CHILD-OK"), "{text}");
    }

    #[test]
    fn root_is_never_the_target() {
        assert!(matches!(drop_to(0, 1000), Err(PrivilegeError::Root { .. })));
        assert!(matches!(drop_to(1000, 0), Err(PrivilegeError::Root { .. })));
    }
}
