//! The sliding windows behind `pio_scan`, `mmio_scan` and `exit_storm`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::{EXIT_STORM_PER_SEC, EXIT_STORM_WINDOW_NS, SCAN_THRESHOLD, SCAN_WINDOW_NS};

const SECOND: u64 = 1_000_000_000;

/// What a scan that reached the threshold touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// The distinct ports or page numbers, in order.
    pub keys: Vec<u64>,
    /// The vCPUs that touched them.
    pub vcpus: Vec<u16>,
}

/// Distinct keys (ports or pages) seen within the last [`SCAN_WINDOW_NS`]. It never holds more
/// than [`SCAN_THRESHOLD`] keys: reaching it reports the scan and starts afresh, so each event
/// costs a constant amount of work however a guest hammers.
#[derive(Debug, Default)]
pub struct ScanWindow {
    /// Key → (when last seen, by which vCPU).
    seen: BTreeMap<u64, (u64, u16)>,
}

impl ScanWindow {
    /// Adds `key`, touched by `vcpu` at `now`; the scan, once there are enough keys.
    pub fn add(&mut self, now: u64, key: u64, vcpu: u16) -> Option<Scan> {
        self.seen
            .retain(|_, &mut (t, _)| now.saturating_sub(t) <= SCAN_WINDOW_NS);
        self.seen.insert(key, (now, vcpu));
        if self.seen.len() < SCAN_THRESHOLD {
            return None;
        }
        let seen = std::mem::take(&mut self.seen);
        let vcpus: BTreeSet<u16> = seen.values().map(|&(_, v)| v).collect();
        Some(Scan {
            keys: seen.into_keys().collect(),
            vcpus: vcpus.into_iter().collect(),
        })
    }
}

/// One vCPU's exit counts over the last storm window or so, from the VM's start.
#[derive(Debug)]
pub struct ExitHistory {
    samples: VecDeque<(u64, u64)>,
    storming: bool,
}

impl ExitHistory {
    /// The history of a vCPU that had made no exit at `start` (the VM's start).
    pub fn new(start: u64) -> ExitHistory {
        ExitHistory {
            samples: VecDeque::from([(start, 0)]),
            storming: false,
        }
    }

    /// Records `total` exits at `now`. Returns the exits per second when they have just gone
    /// above the threshold over the window ([`EXIT_STORM_WINDOW_NS`]): measured over the last
    /// window, or, while the VM is younger than one, over the exits made so far against the
    /// whole window's allowance (a window that holds them can only hold more). A storm is
    /// reported once, until the rate falls below half the threshold.
    pub fn sample(&mut self, now: u64, total: u64) -> Option<u64> {
        self.samples.push_back((now, total));
        // Keep the newest sample that is at least a window old, and everything after it.
        while self
            .samples
            .get(1)
            .is_some_and(|&(t, _)| now.saturating_sub(t) >= EXIT_STORM_WINDOW_NS)
        {
            self.samples.pop_front();
        }
        let &(t0, n0) = self.samples.front()?;
        let span = now.saturating_sub(t0).max(1);
        let exits = total.saturating_sub(n0);
        let allowed = EXIT_STORM_PER_SEC.saturating_mul(EXIT_STORM_WINDOW_NS) / SECOND;
        let over = if span >= EXIT_STORM_WINDOW_NS {
            exits.saturating_mul(EXIT_STORM_WINDOW_NS) / span > allowed
        } else {
            exits > allowed
        };
        let rate = exits.saturating_mul(SECOND) / span;
        if over && !self.storming {
            self.storming = true;
            return Some(rate);
        }
        if span >= EXIT_STORM_WINDOW_NS && rate < EXIT_STORM_PER_SEC / 2 {
            self.storming = false;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hammering_one_key_keeps_the_window_small_and_reports_nothing() {
        let mut w = ScanWindow::default();
        for i in 0..100_000u64 {
            assert_eq!(w.add(i, 0x4000, 0), None);
        }
        assert_eq!(w.seen.len(), 1);
    }

    #[test]
    fn a_scan_names_its_keys_and_every_vcpu_that_took_part() {
        let mut w = ScanWindow::default();
        let mut scan = None;
        for k in 0..SCAN_THRESHOLD as u64 {
            scan = w.add(k, 0x4000 + k, (k % 2) as u16);
        }
        let scan = scan.expect("no scan");
        assert_eq!(scan.keys.len(), SCAN_THRESHOLD);
        assert_eq!(scan.vcpus, vec![0, 1]);
        assert!(w.seen.is_empty());
    }

    #[test]
    fn keys_older_than_the_window_do_not_count() {
        let mut w = ScanWindow::default();
        for k in 0..SCAN_THRESHOLD as u64 - 1 {
            assert_eq!(w.add(0, k, 0), None);
        }
        assert_eq!(w.add(SCAN_WINDOW_NS + 1, 99, 0), None);
        assert_eq!(w.seen.len(), 1);
    }
}
