//! A process's children: signalling, reaping and killing them, one way for every process that
//! has some (the supervisor its VM process, the front ends their supervisors, the
//! personality's host process its front end). A pid is only ever one this process started
//! and has not reaped yet, so it can not name a stranger that reused it.

use crate::exit::status;

/// Sends `signal` to process `pid`.
pub fn signal(pid: i32, signal: libc::c_int) -> std::io::Result<()> {
    // SAFETY: kill(2) with integer arguments.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Child `pid`'s exit status as a shell shows it, if it has ended (it is then reaped);
/// None while it runs, or when it is not this process's child.
pub fn try_reap(pid: i32) -> Option<i32> {
    let mut wstatus = 0;
    // SAFETY: waitpid on a child of this process, with a valid status pointer.
    let rc = unsafe { libc::waitpid(pid, &mut wstatus, libc::WNOHANG) };
    (rc == pid).then(|| status::of_wait(wstatus))
}

/// Waits for child `pid` to end and reaps it: its exit status as a shell shows it, or
/// [`status::RUNTIME_ERROR`] when it can not be waited for.
pub fn reap(pid: i32) -> i32 {
    let mut wstatus = 0;
    loop {
        // SAFETY: waitpid on a child of this process, with a valid status pointer.
        let rc = unsafe { libc::waitpid(pid, &mut wstatus, 0) };
        if rc == pid {
            return status::of_wait(wstatus);
        }
        if rc < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return status::RUNTIME_ERROR;
        }
    }
}

/// Kills child `pid` and reaps it.
pub fn kill_and_reap(pid: i32) {
    let _ = signal(pid, libc::SIGKILL);
    reap(pid);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // The children are reaped by the functions under test, not by their std handles.
    #[allow(clippy::zombie_processes)]
    fn a_child_is_seen_running_then_killed_and_reaped_once() {
        let child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        assert_eq!(try_reap(pid), None);
        kill_and_reap(pid);
        // Reaped: no longer this process's child.
        assert_eq!(try_reap(pid), None);
        assert!(signal(pid, 0).is_err());
        let done = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        assert_eq!(reap(i32::try_from(done.id()).unwrap()), 7);
    }
}
