//! Pausing the vCPUs in place, for a snapshot: the VMM thread asks, kicks every vCPU out of
//! KVM_RUN, and waits until each has parked on the gate. A parked vCPU is outside KVM_RUN with
//! its last exit fully handled (KVM completes a pending port or MMIO read on the KVM_RUN that
//! returns EINTR for the kick), so its registers are consistent; while parked it saves its own
//! state when asked, on its own thread, which owns its vCPU descriptor.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::vcpu_state::{VcpuState, VcpuStateError};

/// What the gate holds.
#[derive(Debug, Default)]
struct Gate {
    paused: bool,
    /// vCPUs parked on the gate now.
    parked: usize,
    /// Set while the VMM collects states: each parked vCPU fills its slot.
    collecting: bool,
    saved: Vec<Option<Result<VcpuState, VcpuStateError>>>,
}

/// The vCPUs' pause gate, shared by every vCPU thread and the VMM thread.
#[derive(Debug)]
pub struct PauseGate {
    vcpus: usize,
    /// A cheap check for the vCPU's EINTR path: nothing to do unless this is set.
    requested: AtomicBool,
    gate: Mutex<Gate>,
    changed: Condvar,
}

/// Why the vCPUs could not be paused or their state collected.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("{parked} of {vcpus} vCPUs paused within {waited:?}")]
    Timeout {
        parked: usize,
        vcpus: usize,
        waited: Duration,
    },
    #[error("the VM is not paused")]
    NotPaused,
    #[error("vCPU {index}: {source}")]
    Save {
        index: usize,
        #[source]
        source: VcpuStateError,
    },
}

impl PauseGate {
    pub fn new(vcpus: usize) -> PauseGate {
        PauseGate {
            vcpus,
            requested: AtomicBool::new(false),
            gate: Mutex::new(Gate::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_until<'a>(
        &'a self,
        mut gate: MutexGuard<'a, Gate>,
        timeout: Duration,
        done: impl Fn(&Gate) -> bool,
    ) -> (MutexGuard<'a, Gate>, bool) {
        let deadline = Instant::now() + timeout;
        while !done(&gate) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (gate, false);
            }
            gate = match self.changed.wait_timeout(gate, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        (gate, true)
    }

    /// Asks every vCPU to park, calls `kick` to make each leave KVM_RUN, and waits until all
    /// have parked or `timeout` passed (then the pause is taken back).
    pub fn pause(&self, kick: impl Fn(), timeout: Duration) -> Result<(), PauseError> {
        {
            let mut gate = self.lock();
            gate.paused = true;
            self.requested.store(true, Ordering::Release);
        }
        kick();
        let vcpus = self.vcpus;
        let (gate, all) = self.wait_until(self.lock(), timeout, |g| g.parked == vcpus);
        if !all {
            let parked = gate.parked;
            drop(gate);
            self.resume();
            return Err(PauseError::Timeout {
                parked,
                vcpus,
                waited: timeout,
            });
        }
        Ok(())
    }

    /// Pauses the vCPUs before they first run: each parks on the gate before its first
    /// KVM_RUN, and needs no kick.
    pub fn start_paused(&self) {
        let mut gate = self.lock();
        gate.paused = true;
        self.requested.store(true, Ordering::Release);
    }

    pub fn vcpus(&self) -> usize {
        self.vcpus
    }

    pub fn is_paused(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Lets every parked vCPU run again.
    pub fn resume(&self) {
        let mut gate = self.lock();
        gate.paused = false;
        gate.collecting = false;
        gate.saved.clear();
        self.requested.store(false, Ordering::Release);
        drop(gate);
        self.changed.notify_all();
    }

    /// Has every parked vCPU save its state, and returns them in vCPU order.
    pub fn collect(&self, timeout: Duration) -> Result<Vec<VcpuState>, PauseError> {
        let mut gate = self.lock();
        if !gate.paused || gate.parked != self.vcpus {
            return Err(PauseError::NotPaused);
        }
        gate.saved = (0..self.vcpus).map(|_| None).collect();
        gate.collecting = true;
        self.changed.notify_all();
        let (mut gate, all) =
            self.wait_until(gate, timeout, |g| g.saved.iter().all(Option::is_some));
        gate.collecting = false;
        let saved = std::mem::take(&mut gate.saved);
        if !all {
            let parked = saved.iter().filter(|s| s.is_some()).count();
            return Err(PauseError::Timeout {
                parked,
                vcpus: self.vcpus,
                waited: timeout,
            });
        }
        saved
            .into_iter()
            .enumerate()
            .map(|(index, s)| match s {
                Some(Ok(state)) => Ok(state),
                Some(Err(source)) => Err(PauseError::Save { index, source }),
                None => Err(PauseError::NotPaused),
            })
            .collect()
    }

    /// Called by vCPU `index` when KVM_RUN returned for a kick: parks it while a pause is asked
    /// for, saving its state with `save` when the VMM collects. Returns at once otherwise, and
    /// when `stopping` says the VM is ending.
    pub fn park_if_asked(
        &self,
        index: usize,
        stopping: impl Fn() -> bool,
        mut save: impl FnMut() -> Result<VcpuState, VcpuStateError>,
    ) {
        if !self.requested.load(Ordering::Acquire) {
            return;
        }
        let mut gate = self.lock();
        if !gate.paused {
            return;
        }
        gate.parked += 1;
        self.changed.notify_all();
        while gate.paused && !stopping() {
            let slot_empty = gate.saved.get(index).is_some_and(Option::is_none);
            if gate.collecting && slot_empty {
                // Saved without the lock, so the vCPUs save side by side.
                drop(gate);
                let state = save();
                gate = self.lock();
                if let Some(slot) = gate.saved.get_mut(index).filter(|s| s.is_none()) {
                    *slot = Some(state);
                }
                self.changed.notify_all();
                continue;
            }
            // Woken by resume, by a collection, or to look at `stopping` again.
            gate = match self.changed.wait_timeout(gate, Duration::from_millis(100)) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        gate.parked -= 1;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_pause_waits_for_every_vcpu_and_a_resume_lets_them_go() {
        let gate = Arc::new(PauseGate::new(2));
        let stop = Arc::new(AtomicBool::new(false));
        let kicked = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..2)
            .map(|i| {
                let (gate, stop, kicked) = (gate.clone(), stop.clone(), kicked.clone());
                std::thread::spawn(move || {
                    let mut parks = 0;
                    while !stop.load(Ordering::Acquire) {
                        if kicked.swap(false, Ordering::AcqRel) || gate.is_paused() {
                            gate.park_if_asked(i, || false, || Err(VcpuStateError::Size("test")));
                            parks += 1;
                        }
                        std::thread::yield_now();
                    }
                    parks
                })
            })
            .collect();
        gate.pause(
            || kicked.store(true, Ordering::Release),
            Duration::from_secs(5),
        )
        .unwrap();
        let err = gate.collect(Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, PauseError::Save { .. }), "{err}");
        gate.resume();
        stop.store(true, Ordering::Release);
        for t in threads {
            assert!(t.join().unwrap() >= 1);
        }
    }

    #[test]
    fn a_pause_no_vcpu_answers_times_out_and_is_taken_back() {
        let gate = PauseGate::new(1);
        let err = gate.pause(|| {}, Duration::from_millis(20)).unwrap_err();
        assert!(matches!(err, PauseError::Timeout { parked: 0, .. }));
        assert!(!gate.is_paused());
        assert!(matches!(
            gate.collect(Duration::from_millis(1)),
            Err(PauseError::NotPaused)
        ));
    }
}
