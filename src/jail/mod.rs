//! The jail each VM process enters before it touches guest input: its directories, made so
//! that nothing in them can have been placed by anyone else; its own namespaces and a root
//! holding only its files; its cgroup with CPU, memory and pids limits; and dropping root,
//! every capability and the means to regain them. [`vm`] puts them together for one VM.

pub mod cgroup;
pub mod chroot;
pub mod dirs;
pub mod jailer;
pub mod privileges;
pub mod root;
pub mod vm;

pub use vm::{JailError, VmJail};

/// For tests that need root: true when running as root. Elsewhere they print why they skip,
/// except under CI=true (CI runs as root, as the daemon does, and a skip would hide a broken
/// jail).
#[cfg(test)]
fn test_as_root(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what} needs root"
    );
    println!("skipped: {what} needs root");
    false
}

/// This test binary, set to run only the test `name`: jail steps change their process for good
/// (root, credentials, namespaces), so their tests run them in a process of their own.
#[cfg(test)]
fn child_test(name: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["--exact", name, "--nocapture", "--test-threads=1"]);
    cmd
}
