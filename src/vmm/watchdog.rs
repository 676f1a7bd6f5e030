//! The halt watchdog: with an in-kernel LAPIC a halted vCPU never leaves KVM, so the VMM
//! thread looks at each vCPU thread's scheduler state to notice a guest that can never run
//! again.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{kick, VcpuThread};
use crate::vstate::vcpu::VcpuShared;

/// Ticks a vCPU thread must sleep in KVM before it is asked whether it is stuck.
const SLEEP_TICKS_BEFORE_CHECK: u32 = 2;
/// Longest back-off, in ticks, between checks of a vCPU that keeps sleeping but is not stuck
/// (an idle Linux guest): about 2 s.
const MAX_CHECK_BACKOFF: u32 = 40;

/// Finds VMs that can never run again: every vCPU asleep in KVM and each, when kicked and
/// asked, halted with interrupts disabled or waiting for a startup IPI. With an in-kernel
/// LAPIC a halting vCPU never exits to user space, so this is the only way to notice.
pub(super) struct HaltWatchdog {
    vcpus: Vec<WatchedVcpu>,
    tick: u64,
}

struct WatchedVcpu {
    stat: Option<File>,
    pthread: libc::pthread_t,
    shared: Arc<VcpuShared>,
    sleeping_ticks: u32,
    next_check: u64,
    backoff: u32,
}

impl HaltWatchdog {
    pub(super) fn new(threads: &[VcpuThread]) -> HaltWatchdog {
        let vcpus = threads
            .iter()
            .map(|t| {
                let tid = t.shared.tid.load(Ordering::Acquire);
                WatchedVcpu {
                    // Opened now, before the VMM's seccomp filter forbids open.
                    stat: File::open(format!("/proc/self/task/{tid}/stat")).ok(),
                    pthread: t.handle.as_pthread_t(),
                    shared: t.shared.clone(),
                    sleeping_ticks: 0,
                    next_check: 0,
                    backoff: 1,
                }
            })
            .collect();
        HaltWatchdog { vcpus, tick: 0 }
    }

    /// One look at every vCPU. Returns true when the whole VM is stuck.
    pub(super) fn tick(&mut self) -> bool {
        self.tick += 1;
        let mut all_stuck = !self.vcpus.is_empty();
        for v in &mut self.vcpus {
            let asleep = v
                .stat
                .as_ref()
                .and_then(thread_state)
                .is_some_and(|s| s == b'S');
            if !asleep {
                v.sleeping_ticks = 0;
                v.backoff = 1;
                v.shared.stuck.store(false, Ordering::Relaxed);
                all_stuck = false;
                continue;
            }
            v.sleeping_ticks = v.sleeping_ticks.saturating_add(1);
            let stuck = v.shared.stuck.load(Ordering::Acquire);
            if !stuck && v.sleeping_ticks >= SLEEP_TICKS_BEFORE_CHECK && self.tick >= v.next_check {
                v.shared.check_halt.store(true, Ordering::Release);
                kick(v.pthread);
                v.next_check = self.tick + u64::from(v.backoff);
                v.backoff = (v.backoff * 2).min(MAX_CHECK_BACKOFF);
            }
            all_stuck &= stuck;
        }
        all_stuck
    }
}

/// The state letter from /proc/self/task/TID/stat ("R", "S", ...).
fn thread_state(stat: &File) -> Option<u8> {
    let mut buf = [0u8; 256];
    let n = stat.read_at(&mut buf, 0).ok()?;
    let text = buf.get(..n)?;
    // The command name is in parentheses and may contain spaces; the state follows the last ')'.
    let close = text.iter().rposition(|&b| b == b')')?;
    text.get(close + 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_state_is_read_after_the_command_name() {
        let me = File::open("/proc/thread-self/stat").unwrap();
        // The test thread is running while it reads its own state.
        assert_eq!(thread_state(&me), Some(b'R'));
    }
}
