//! Why a VM ended, and the process exit status each reason maps to.
//!
//! A guest may choose any status 0-255 through the guest-exit port, so the VMM's own statuses
//! necessarily share that space; the VMM picks a block (80-89) that test guests avoid, and
//! always prints the reason on stderr so the two can be told apart.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Process exit statuses of `bulkhead run`. Documented in README.md.
pub mod status {
    /// The guest reset the machine through the i8042, or wrote 0 to the guest-exit port.
    pub const OK: i32 = 0;
    /// The VMM failed at run time (a KVM or host call failed after boot started).
    pub const RUNTIME_ERROR: i32 = 1;
    /// Bad input: flags, config file, kernel, initrd, or an unusable /dev/kvm.
    pub const BAD_INPUT: i32 = 2;
    /// Every vCPU halted with interrupts disabled (or never started), so the guest can not
    /// make progress.
    pub const ALL_HALTED: i32 = 80;
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    pub const TRIPLE_FAULT: i32 = 81;
    /// KVM could not emulate an instruction (KVM_EXIT_INTERNAL_ERROR).
    pub const INTERNAL_ERROR: i32 = 82;
    /// The hardware refused to enter the guest (KVM_EXIT_FAIL_ENTRY).
    pub const FAIL_ENTRY: i32 = 83;
    /// KVM reported an exit reason bulkhead does not handle.
    pub const UNHANDLED_EXIT: i32 = 84;
    /// A vCPU thread failed (KVM_RUN error or a panic).
    pub const VCPU_FAILED: i32 = 85;
    /// A VMM thread made a system call its seccomp filter forbids (128 + SIGSYS).
    pub const SECCOMP_VIOLATION: i32 = 159;
}

/// Why a running VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExitReason {
    /// The guest wrote this status to the guest-exit port.
    GuestExit(u8),
    /// The guest asked the i8042 to reset the machine.
    Reset,
    /// No vCPU can run any more.
    AllHalted,
    /// The given vCPU triple-faulted.
    TripleFault { vcpu: u32 },
    /// KVM could not emulate an instruction on the given vCPU.
    InternalError { vcpu: u32, suberror: u32 },
    /// Entering the guest failed on the given vCPU.
    FailEntry { vcpu: u32, reason: u64 },
    /// KVM returned an exit reason bulkhead does not handle.
    UnhandledExit { vcpu: u32, exit: String },
    /// A vCPU thread failed.
    VcpuFailed { vcpu: u32, error: String },
}

impl VmExitReason {
    /// The process exit status for this reason.
    pub fn status(&self) -> i32 {
        match self {
            VmExitReason::GuestExit(n) => i32::from(*n),
            VmExitReason::Reset => status::OK,
            VmExitReason::AllHalted => status::ALL_HALTED,
            VmExitReason::TripleFault { .. } => status::TRIPLE_FAULT,
            VmExitReason::InternalError { .. } => status::INTERNAL_ERROR,
            VmExitReason::FailEntry { .. } => status::FAIL_ENTRY,
            VmExitReason::UnhandledExit { .. } => status::UNHANDLED_EXIT,
            VmExitReason::VcpuFailed { .. } => status::VCPU_FAILED,
        }
    }

    /// True when the guest ended itself on purpose.
    pub fn is_orderly(&self) -> bool {
        matches!(self, VmExitReason::GuestExit(_) | VmExitReason::Reset)
    }
}

impl fmt::Display for VmExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExitReason::GuestExit(n) => write!(f, "guest exited with status {n}"),
            VmExitReason::Reset => write!(f, "guest reset the machine"),
            VmExitReason::AllHalted => {
                write!(f, "all vCPUs halted with interrupts disabled; the guest is stuck")
            }
            VmExitReason::TripleFault { vcpu } => write!(f, "vCPU {vcpu} triple-faulted"),
            VmExitReason::InternalError { vcpu, suberror } => write!(
                f,
                "KVM could not emulate an instruction on vCPU {vcpu} (internal error, suberror {suberror})"
            ),
            VmExitReason::FailEntry { vcpu, reason } => {
                write!(f, "entering the guest failed on vCPU {vcpu} (hardware reason {reason:#x})")
            }
            VmExitReason::UnhandledExit { vcpu, exit } => {
                write!(f, "vCPU {vcpu} stopped on an unhandled KVM exit: {exit}")
            }
            VmExitReason::VcpuFailed { vcpu, error } => write!(f, "vCPU {vcpu} failed: {error}"),
        }
    }
}

/// Where any thread asks for the VM to end. The first reason given wins; the eventfd wakes the
/// VMM thread, which then stops the vCPUs.
#[derive(Debug)]
pub struct ExitSignal {
    reason: Mutex<Option<VmExitReason>>,
    stopping: AtomicBool,
    evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<ExitSignal> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Asks for the VM to end for `reason`, unless it is already ending for another.
    pub fn request(&self, reason: VmExitReason) {
        {
            let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(reason);
            }
        }
        self.stopping.store(true, Ordering::Release);
        // The counter can only overflow after 2^64 - 1 requests; a failed write still leaves
        // `stopping` set, which every vCPU checks before it re-enters the guest.
        let _ = self.evt.write(1);
    }

    /// True once any thread asked for the VM to end.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// The reason the VM is ending, if it is.
    pub fn reason(&self) -> Option<VmExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Becomes readable when an exit is requested.
    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_chosen_status_passes_through_unchanged() {
        assert_eq!(VmExitReason::GuestExit(0).status(), 0);
        assert_eq!(VmExitReason::GuestExit(255).status(), 255);
        assert_eq!(VmExitReason::Reset.status(), 0);
    }

    #[test]
    fn each_abnormal_exit_has_its_own_status() {
        let reasons = [
            VmExitReason::AllHalted,
            VmExitReason::TripleFault { vcpu: 0 },
            VmExitReason::InternalError {
                vcpu: 0,
                suberror: 1,
            },
            VmExitReason::FailEntry { vcpu: 0, reason: 0 },
            VmExitReason::UnhandledExit {
                vcpu: 0,
                exit: "x".into(),
            },
            VmExitReason::VcpuFailed {
                vcpu: 0,
                error: "x".into(),
            },
        ];
        let mut statuses: Vec<i32> = reasons.iter().map(VmExitReason::status).collect();
        statuses.push(status::RUNTIME_ERROR);
        statuses.push(status::BAD_INPUT);
        statuses.push(status::SECCOMP_VIOLATION);
        let n = statuses.len();
        statuses.sort_unstable();
        statuses.dedup();
        assert_eq!(statuses.len(), n, "exit statuses must be distinct");
        assert!(reasons.iter().all(|r| !r.is_orderly()));
    }

    #[test]
    fn first_exit_request_wins_and_wakes_the_event() {
        let signal = ExitSignal::new().unwrap();
        assert!(!signal.is_stopping());
        signal.request(VmExitReason::GuestExit(3));
        signal.request(VmExitReason::Reset);
        assert!(signal.is_stopping());
        assert_eq!(signal.reason(), Some(VmExitReason::GuestExit(3)));
        assert_eq!(signal.event_fd().read().unwrap(), 2);
    }
}
