//! How the supervisor concludes a VM ended: from the kernel's wait status first, and from the
//! VM process's exit record only where that agrees with it.

use std::fmt;

use crate::exit::{status, VmExitReason};
use crate::telemetry::Rule;

/// Why the supervisor itself ended the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    Timeout {
        secs: u64,
    },
    Policy {
        rule: Rule,
    },
    /// `bulkhead run` got this signal (SIGTERM, SIGINT or SIGHUP).
    Signal {
        signal: i32,
    },
}

/// How a VM ended, as the supervisor reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEnd {
    /// The VM ended for this reason: the VM process said so, and its exit status agrees.
    Vm(VmExitReason),
    /// The VM process exited with this status and no record that explains it (1: a run-time
    /// failure, 2: bad input; it logged why).
    Process(i32),
    /// The VM process was killed by SIGSYS: a thread made a forbidden system call. The thread
    /// and call are there when the process managed to hand them over.
    SeccompViolation {
        thread: Option<String>,
        syscall: Option<u64>,
    },
    /// The VM process died from another signal nobody here sent.
    Killed { signal: i32 },
    /// The supervisor ended it.
    Stopped(StopCause),
}

/// The `reason` of `bulkhead_vm_exit` for a VM process killed by its seccomp filter, which
/// the Firecracker personality reports as a seccomp fault.
pub const EXIT_SECCOMP_VIOLATION: &str = "seccomp_violation";

impl VmEnd {
    /// The exit status of `bulkhead run`.
    pub fn status(&self) -> i32 {
        match self {
            VmEnd::Vm(r) => r.status(),
            VmEnd::Process(code) => *code,
            VmEnd::SeccompViolation { .. } => status::SECCOMP_VIOLATION,
            VmEnd::Killed { signal } => 128 + signal,
            VmEnd::Stopped(StopCause::Timeout { .. }) => status::TIMEOUT,
            VmEnd::Stopped(StopCause::Policy { .. }) => status::POLICY_STOP,
            VmEnd::Stopped(StopCause::Signal { signal }) => 128 + signal,
        }
    }

    /// The `reason` label of `bulkhead_vm_exit`.
    pub fn label(&self) -> &'static str {
        match self {
            VmEnd::Vm(r) => r.label(),
            VmEnd::Process(status::RUNTIME_ERROR) => "runtime_error",
            VmEnd::Process(status::BAD_INPUT) => "bad_input",
            VmEnd::Process(_) => "vm_process_exit",
            VmEnd::SeccompViolation { .. } => EXIT_SECCOMP_VIOLATION,
            VmEnd::Killed { .. } => "killed",
            VmEnd::Stopped(StopCause::Timeout { .. }) => "timeout",
            VmEnd::Stopped(StopCause::Policy { .. }) => "policy_stop",
            VmEnd::Stopped(StopCause::Signal { .. }) => "terminated",
        }
    }

    /// True when the guest ended itself on purpose.
    pub fn is_orderly(&self) -> bool {
        matches!(self, VmEnd::Vm(r) if r.is_orderly())
    }

    /// Concludes from a wait status (`exit` the exit code, or `signal` the killing signal),
    /// the VM process's exit record, its seccomp record, and what the supervisor did itself.
    pub fn conclude(
        exit: Option<i32>,
        signal: Option<i32>,
        record: Option<VmExitReason>,
        seccomp: Option<(u64, [u8; 16])>,
        stopped: Option<StopCause>,
    ) -> VmEnd {
        if signal == Some(libc::SIGSYS) {
            let (syscall, thread) = match seccomp {
                Some((nr, name)) => (Some(nr), thread_name(&name)),
                None => (None, None),
            };
            return VmEnd::SeccompViolation { thread, syscall };
        }
        match (exit, signal) {
            // The VM ended on its own (a triple fault, say) even if the supervisor had just
            // asked it to stop: its own reason stands.
            (Some(code), None) => match record {
                Some(r) if r.status() == code && r != VmExitReason::Stopped => VmEnd::Vm(r),
                // A jailed VM process is the first process of its pid namespace, which a
                // signal it sends itself can not kill: abort() ends it with this status.
                _ if code == 128 + libc::SIGABRT && stopped.is_none() => VmEnd::Killed {
                    signal: libc::SIGABRT,
                },
                _ => stopped.map_or(VmEnd::Process(code), VmEnd::Stopped),
            },
            (_, Some(signal)) => stopped.map_or(VmEnd::Killed { signal }, VmEnd::Stopped),
            (None, None) => VmEnd::Process(status::RUNTIME_ERROR),
        }
    }
}

/// A thread name from the record: printable ASCII up to the first NUL, or None.
fn thread_name(bytes: &[u8; 16]) -> Option<String> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let name = bytes.get(..end)?;
    (!name.is_empty() && name.iter().all(|b| b.is_ascii_graphic()))
        .then(|| String::from_utf8_lossy(name).into_owned())
}

impl fmt::Display for VmEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmEnd::Vm(r) => write!(f, "{r}"),
            VmEnd::Process(status::RUNTIME_ERROR) => write!(f, "the VM process failed"),
            VmEnd::Process(status::BAD_INPUT) => {
                write!(f, "the VM could not be built from its input")
            }
            VmEnd::Process(code) => {
                write!(f, "the VM process exited with status {code} and no reason")
            }
            VmEnd::SeccompViolation { thread, syscall } => {
                write!(f, "seccomp violation: the VM process was killed by SIGSYS")?;
                match (thread, syscall) {
                    (Some(t), Some(n)) => write!(f, " (thread {t}, system call {n})"),
                    (None, Some(n)) => write!(f, " (system call {n})"),
                    _ => write!(f, " (it reported no details)"),
                }
            }
            VmEnd::Killed { signal } => write!(f, "the VM process was killed by signal {signal}"),
            VmEnd::Stopped(StopCause::Timeout { secs }) => {
                write!(
                    f,
                    "timed out after {secs} s (--timeout); the VM was stopped"
                )
            }
            VmEnd::Stopped(StopCause::Policy { rule }) => {
                write!(f, "stopped by --on-violation stop-vm after alert {rule}")
            }
            VmEnd::Stopped(StopCause::Signal { signal }) => {
                write!(f, "stopped on signal {signal} to bulkhead run")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_believed_only_when_the_exit_status_agrees() {
        let triple = VmExitReason::TripleFault { vcpu: 0 };
        assert_eq!(
            VmEnd::conclude(Some(81), None, Some(triple.clone()), None, None),
            VmEnd::Vm(triple.clone())
        );
        assert_eq!(
            VmEnd::conclude(Some(0), None, Some(triple), None, None),
            VmEnd::Process(0)
        );
        assert_eq!(
            VmEnd::conclude(Some(2), None, None, None, None).label(),
            "bad_input"
        );
    }

    #[test]
    fn sigsys_is_a_seccomp_violation_with_or_without_details() {
        let mut name = [0u8; 16];
        name[..5].copy_from_slice(b"vcpu0");
        let with = VmEnd::conclude(None, Some(libc::SIGSYS), None, Some((41, name)), None);
        assert_eq!(
            with,
            VmEnd::SeccompViolation {
                thread: Some("vcpu0".into()),
                syscall: Some(41)
            }
        );
        assert_eq!(with.status(), 159);
        let garbage = [0xffu8; 16];
        let without = VmEnd::conclude(None, Some(libc::SIGSYS), None, Some((41, garbage)), None);
        assert!(matches!(
            without,
            VmEnd::SeccompViolation { thread: None, .. }
        ));
        assert_eq!(
            VmEnd::conclude(None, Some(libc::SIGSYS), None, None, None).to_string(),
            "seccomp violation: the VM process was killed by SIGSYS (it reported no details)"
        );
    }

    #[test]
    fn what_the_supervisor_did_decides_the_status_of_a_stopped_vm() {
        let timeout = StopCause::Timeout { secs: 5 };
        let end = VmEnd::conclude(None, Some(libc::SIGKILL), None, None, Some(timeout));
        assert_eq!((end.status(), end.label()), (124, "timeout"));
        let policy = StopCause::Policy {
            rule: Rule::PioScan,
        };
        let end = VmEnd::conclude(
            Some(143),
            None,
            Some(VmExitReason::Stopped),
            None,
            Some(policy),
        );
        assert_eq!((end.status(), end.label()), (86, "policy_stop"));
        let end = VmEnd::conclude(None, Some(libc::SIGKILL), None, None, None);
        assert_eq!((end.status(), end.label()), (137, "killed"));
        // A VM that ended on its own while being stopped keeps its own reason.
        let triple = VmExitReason::TripleFault { vcpu: 0 };
        let end = VmEnd::conclude(Some(81), None, Some(triple.clone()), None, Some(policy));
        assert_eq!(end, VmEnd::Vm(triple));
    }
}
