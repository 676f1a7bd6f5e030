//! Per-device counter snapshots, in the form reports and exports use.

use std::fmt;

use serde::Serialize;

/// A copy of one device's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceSnapshot {
    /// The device's name, e.g. `virtio-blk0`.
    pub device: String,
    pub requests: u64,
    pub bytes_from_guest: u64,
    pub bytes_to_guest: u64,
    pub interrupts: u64,
    pub dropped: u64,
    /// Every refusal reason as `layer.reason`, with its count (zeros included).
    pub refusals: Vec<(String, u64)>,
}

impl DeviceSnapshot {
    /// All refusals together.
    pub fn total_refusals(&self) -> u64 {
        self.refusals.iter().map(|(_, n)| n).sum()
    }
}

/// One line: the totals, then only the refusal reasons that occurred.
impl fmt::Display for DeviceSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: requests={} bytes_from_guest={} bytes_to_guest={} interrupts={} dropped={} refused={}",
            self.device,
            self.requests,
            self.bytes_from_guest,
            self.bytes_to_guest,
            self.interrupts,
            self.dropped,
            self.total_refusals()
        )?;
        for (name, count) in self.refusals.iter().filter(|(_, n)| *n > 0) {
            write!(f, " {name}={count}")?;
        }
        Ok(())
    }
}
