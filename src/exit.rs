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
    /// The guest powered off or reset the machine, or wrote 0 to the guest-exit port.
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
    /// `--on-violation stop-vm` ended the VM after an alert.
    pub const POLICY_STOP: i32 = 86;
    /// The guest kernel panicked and said so through the pvpanic device.
    pub const GUEST_PANIC: i32 = 87;
    /// `bulkhead exec`: the VM ended before the command's status came back (it never ran, or
    /// the guest stopped under it); the console's last lines are printed.
    pub const EXEC_NOT_RUN: i32 = 88;
    /// `--timeout` ended the VM (the status timeout(1) uses).
    pub const TIMEOUT: i32 = 124;
    /// The VM was stopped from outside (SIGTERM to `bulkhead run`): 128 + SIGTERM.
    pub const TERMINATED: i32 = 143;
    /// A VMM thread made a system call its seccomp filter forbids (128 + SIGSYS): the VM
    /// process was killed by SIGSYS. Other signals that kill it give 128 + their number.
    pub const SECCOMP_VIOLATION: i32 = 159;

    /// The status a shell reports for a child's wait status `wstatus`: its exit code, or 128
    /// plus the signal that killed it.
    pub fn of_wait(wstatus: i32) -> i32 {
        if libc::WIFEXITED(wstatus) {
            libc::WEXITSTATUS(wstatus)
        } else {
            128 + libc::WTERMSIG(wstatus)
        }
    }
}

/// Why a running VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExitReason {
    /// The guest wrote this status to the guest-exit port.
    GuestExit(u8),
    /// The guest reset the machine.
    Reset(ResetVia),
    /// The guest powered off (ACPI sleep state S5).
    PowerOff,
    /// The guest kernel panicked (it wrote PANICKED to the pvpanic port).
    GuestPanic,
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
    /// The supervisor asked the VM process to stop (SIGTERM).
    Stopped,
}

impl VmExitReason {
    /// The process exit status for this reason.
    pub fn status(&self) -> i32 {
        match self {
            VmExitReason::GuestExit(n) => i32::from(*n),
            VmExitReason::Reset(_) | VmExitReason::PowerOff => status::OK,
            VmExitReason::GuestPanic => status::GUEST_PANIC,
            VmExitReason::AllHalted => status::ALL_HALTED,
            VmExitReason::TripleFault { .. } => status::TRIPLE_FAULT,
            VmExitReason::InternalError { .. } => status::INTERNAL_ERROR,
            VmExitReason::FailEntry { .. } => status::FAIL_ENTRY,
            VmExitReason::UnhandledExit { .. } => status::UNHANDLED_EXIT,
            VmExitReason::VcpuFailed { .. } => status::VCPU_FAILED,
            VmExitReason::Stopped => status::TERMINATED,
        }
    }

    /// True when the guest ended itself on purpose.
    pub fn is_orderly(&self) -> bool {
        matches!(
            self,
            VmExitReason::GuestExit(_) | VmExitReason::Reset(_) | VmExitReason::PowerOff
        )
    }

    /// The name metrics use for this reason.
    pub fn label(&self) -> &'static str {
        match self {
            VmExitReason::GuestExit(_) => "guest_exit",
            VmExitReason::Reset(_) => "reset",
            VmExitReason::PowerOff => "power_off",
            VmExitReason::GuestPanic => "guest_panic",
            VmExitReason::AllHalted => "all_halted",
            VmExitReason::TripleFault { .. } => "triple_fault",
            VmExitReason::InternalError { .. } => "internal_error",
            VmExitReason::FailEntry { .. } => "fail_entry",
            VmExitReason::UnhandledExit { .. } => "unhandled_exit",
            VmExitReason::VcpuFailed { .. } => "vcpu_failed",
            VmExitReason::Stopped => "stopped",
        }
    }

    /// The reason as three numbers for the telemetry region's exit record. Text details stay
    /// behind (the VM process logs them itself).
    pub fn to_record(&self) -> (u64, u64, u64) {
        match *self {
            VmExitReason::GuestExit(n) => (1, u64::from(n), 0),
            VmExitReason::Reset(via) => (2, via as u64, 0),
            VmExitReason::AllHalted => (3, 0, 0),
            VmExitReason::TripleFault { vcpu } => (4, u64::from(vcpu), 0),
            VmExitReason::InternalError { vcpu, suberror } => {
                (5, u64::from(vcpu), u64::from(suberror))
            }
            VmExitReason::FailEntry { vcpu, reason } => (6, u64::from(vcpu), reason),
            VmExitReason::UnhandledExit { vcpu, .. } => (7, u64::from(vcpu), 0),
            VmExitReason::VcpuFailed { vcpu, .. } => (8, u64::from(vcpu), 0),
            VmExitReason::Stopped => (9, 0, 0),
            VmExitReason::PowerOff => (10, 0, 0),
            VmExitReason::GuestPanic => (11, 0, 0),
        }
    }

    /// The inverse of [`Self::to_record`], for numbers read from an untrusted region: None
    /// unless they name a reason.
    pub fn from_record(kind: u64, a: u64, b: u64) -> Option<VmExitReason> {
        let vcpu = u32::try_from(a).ok();
        Some(match kind {
            1 => VmExitReason::GuestExit(u8::try_from(a).ok()?),
            2 => VmExitReason::Reset(ResetVia::from_record(a)?),
            3 => VmExitReason::AllHalted,
            4 => VmExitReason::TripleFault { vcpu: vcpu? },
            5 => VmExitReason::InternalError {
                vcpu: vcpu?,
                suberror: u32::try_from(b).ok()?,
            },
            6 => VmExitReason::FailEntry {
                vcpu: vcpu?,
                reason: b,
            },
            7 => VmExitReason::UnhandledExit {
                vcpu: vcpu?,
                exit: "see the VM process's log".to_string(),
            },
            8 => VmExitReason::VcpuFailed {
                vcpu: vcpu?,
                error: "see the VM process's log".to_string(),
            },
            9 => VmExitReason::Stopped,
            10 => VmExitReason::PowerOff,
            11 => VmExitReason::GuestPanic,
            _ => return None,
        })
    }
}

impl fmt::Display for VmExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExitReason::GuestExit(n) => write!(f, "guest exited with status {n}"),
            VmExitReason::Reset(via) => write!(f, "guest reset the machine {via}"),
            VmExitReason::PowerOff => write!(f, "guest powered off (ACPI S5)"),
            VmExitReason::GuestPanic => {
                write!(f, "the guest kernel panicked (it told the pvpanic device)")
            }
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
            VmExitReason::Stopped => write!(f, "the VM was stopped from outside"),
        }
    }
}

/// How the guest reset the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetVia {
    /// The i8042's reset line (command 0xfe, or the output port), also what the reset vector
    /// does when a kernel restarts through the BIOS.
    I8042 = 0,
    /// The ACPI reset register the FADT names.
    AcpiRegister = 1,
    /// A KVM system event (reset or shutdown requested inside the kernel).
    KvmSystemEvent = 2,
}

impl ResetVia {
    fn from_record(a: u64) -> Option<ResetVia> {
        [
            ResetVia::I8042,
            ResetVia::AcpiRegister,
            ResetVia::KvmSystemEvent,
        ]
        .into_iter()
        .find(|v| *v as u64 == a)
    }
}

impl fmt::Display for ResetVia {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResetVia::I8042 => "through the i8042",
            ResetVia::AcpiRegister => "through the ACPI reset register",
            ResetVia::KvmSystemEvent => "through a KVM system event",
        })
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
        assert_eq!(VmExitReason::Reset(ResetVia::I8042).status(), 0);
        assert_eq!(VmExitReason::PowerOff.status(), 0);
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
            VmExitReason::Stopped,
            VmExitReason::GuestPanic,
        ];
        let mut statuses: Vec<i32> = reasons.iter().map(VmExitReason::status).collect();
        statuses.push(status::RUNTIME_ERROR);
        statuses.push(status::BAD_INPUT);
        statuses.push(status::SECCOMP_VIOLATION);
        statuses.push(status::POLICY_STOP);
        statuses.push(status::TIMEOUT);
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
        signal.request(VmExitReason::Reset(ResetVia::I8042));
        assert!(signal.is_stopping());
        assert_eq!(signal.reason(), Some(VmExitReason::GuestExit(3)));
        assert_eq!(signal.event_fd().read().unwrap(), 2);
    }

    #[test]
    fn every_reason_survives_the_exit_record_and_garbage_does_not_decode() {
        let reasons = [
            VmExitReason::GuestExit(200),
            VmExitReason::Reset(ResetVia::I8042),
            VmExitReason::Reset(ResetVia::AcpiRegister),
            VmExitReason::Reset(ResetVia::KvmSystemEvent),
            VmExitReason::PowerOff,
            VmExitReason::GuestPanic,
            VmExitReason::AllHalted,
            VmExitReason::TripleFault { vcpu: 3 },
            VmExitReason::InternalError {
                vcpu: 1,
                suberror: 4,
            },
            VmExitReason::FailEntry {
                vcpu: 0,
                reason: 0x80000021,
            },
            VmExitReason::Stopped,
        ];
        for r in reasons {
            let (k, a, b) = r.to_record();
            assert_eq!(VmExitReason::from_record(k, a, b), Some(r.clone()));
        }
        assert_eq!(VmExitReason::from_record(1, 256, 0), None);
        assert_eq!(VmExitReason::from_record(4, u64::MAX, 0), None);
        assert_eq!(VmExitReason::from_record(0, 0, 0), None);
        assert_eq!(VmExitReason::from_record(99, 0, 0), None);
        assert_eq!(VmExitReason::from_record(2, 3, 0), None);
    }
}
