//! The halt watchdog: with an in-kernel LAPIC a halted vCPU never leaves KVM, so the VMM
//! thread looks at each vCPU thread's scheduler state to notice a guest that can never run
//! again.
//!
//! Its timer ticks every 50 ms only while something is pending (a vCPU newly asleep, a check
//! not yet answered) and otherwise slows down to once a second: an idle VM must not wake its
//! host. At 20 wake-ups a second per VM, 2,300 idle VMs kept both cores of a benchmark host
//! busy and the next VM could not start.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{kick, VcpuThread};
use crate::vstate::vcpu::VcpuShared;

/// The watchdog's unit of time: its timer's period while something is pending.
pub(super) const BASE_TICK: Duration = Duration::from_millis(50);
/// The longest period, in base ticks (1 s), when nothing is pending.
const MAX_PERIOD: u32 = 20;
/// Base ticks a vCPU thread must sleep in KVM before it is asked whether it is stuck.
const SLEEP_TICKS_BEFORE_CHECK: u32 = 2;
/// Longest back-off, in base ticks, between checks of a vCPU that keeps sleeping but is not
/// stuck (an idle Linux guest): about 2 s.
const MAX_CHECK_BACKOFF: u32 = 40;

/// What one look found.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Tick {
    /// Every vCPU can never run again.
    pub(super) all_stuck: bool,
    /// The timer's next period, in base ticks.
    pub(super) period: u32,
}

/// Finds VMs that can never run again: every vCPU asleep in KVM and each, when kicked and
/// asked, halted with interrupts disabled or waiting for a startup IPI. With an in-kernel
/// LAPIC a halting vCPU never exits to user space, so this is the only way to notice.
pub(super) struct HaltWatchdog {
    vcpus: Vec<WatchedVcpu>,
    /// Base ticks since the start.
    tick: u64,
    /// The timer's current period, in base ticks.
    period: u32,
}

struct WatchedVcpu {
    stat: Option<File>,
    tid: libc::pid_t,
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
                    tid,
                    shared: t.shared.clone(),
                    sleeping_ticks: 0,
                    next_check: 0,
                    backoff: 1,
                }
            })
            .collect();
        HaltWatchdog {
            vcpus,
            tick: 0,
            period: 1,
        }
    }

    /// One look at every vCPU, `expirations` periods of the timer after the last;
    /// `output_pending`: the guest's writes wait in KVM's ring. The first vCPU is kicked then
    /// (its thread drains the ring when KVM_RUN returns) and the timer stays at its shortest
    /// period until they are out.
    pub(super) fn tick(&mut self, expirations: u64, output_pending: bool) -> Tick {
        if let (true, Some(first)) = (output_pending, self.vcpus.first()) {
            kick(first.tid);
        }
        let elapsed = expirations.max(1).saturating_mul(u64::from(self.period));
        self.tick = self.tick.saturating_add(elapsed);
        let elapsed = u32::try_from(elapsed).unwrap_or(u32::MAX);
        let mut all_stuck = !self.vcpus.is_empty();
        let mut pending = output_pending;
        let mut next_check: Option<u64> = None;
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
            v.sleeping_ticks = v.sleeping_ticks.saturating_add(elapsed);
            let stuck = v.shared.stuck.load(Ordering::Acquire);
            if !stuck && v.sleeping_ticks >= SLEEP_TICKS_BEFORE_CHECK && self.tick >= v.next_check {
                v.shared.check_halt.store(true, Ordering::Release);
                kick(v.tid);
                v.next_check = self.tick + u64::from(v.backoff);
                v.backoff = (v.backoff * 2).min(MAX_CHECK_BACKOFF);
            }
            // Newly asleep, or asked and not yet answered: look again soon.
            pending |= v.sleeping_ticks < SLEEP_TICKS_BEFORE_CHECK
                || v.shared.check_halt.load(Ordering::Acquire);
            if !stuck {
                next_check = Some(next_check.map_or(v.next_check, |n| n.min(v.next_check)));
            }
            all_stuck &= stuck;
        }
        let until_check = next_check.map(|n| n.saturating_sub(self.tick));
        self.period = next_period(self.period, pending, until_check);
        Tick {
            all_stuck,
            period: self.period,
        }
    }
}

/// The timer's next period in base ticks: one while something is pending, else twice the
/// last, but no later than the next due check and never above `MAX_PERIOD`.
fn next_period(current: u32, pending: bool, until_check: Option<u64>) -> u32 {
    if pending {
        return 1;
    }
    let mut period = current.saturating_mul(2).min(MAX_PERIOD);
    if let Some(until) = until_check {
        period = period.min(u32::try_from(until).unwrap_or(u32::MAX).max(1));
    }
    period.max(1)
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
    fn the_timer_slows_to_a_second_when_nothing_is_pending_and_speeds_up_when_something_is() {
        let mut period = 1;
        let mut seen = Vec::new();
        for _ in 0..7 {
            period = next_period(period, false, None);
            seen.push(period);
        }
        assert_eq!(seen, vec![2, 4, 8, 16, 20, 20, 20]);
        // A vCPU newly asleep or a check in flight: back to 50 ms at once.
        assert_eq!(next_period(20, true, None), 1);
        // Never past the next due check of a sleeping vCPU.
        assert_eq!(next_period(8, false, Some(5)), 5);
        assert_eq!(next_period(8, false, Some(0)), 1);
        assert_eq!(next_period(8, false, Some(100)), 16);
    }

    #[test]
    fn thread_state_is_read_after_the_command_name() {
        let me = File::open("/proc/thread-self/stat").unwrap();
        // The test thread is running while it reads its own state.
        assert_eq!(thread_state(&me), Some(b'R'));
    }
}
