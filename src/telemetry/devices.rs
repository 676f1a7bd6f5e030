//! Per-device counter snapshots, in the form reports and exports use.

use std::fmt;

use super::region::{DeviceCounter, DeviceSlot};
use super::vocabulary::Violation;

/// A copy of one device's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSnapshot {
    /// The device's name, e.g. `virtio-blk0`.
    pub device: String,
    /// Each counter, in [`DeviceCounter::ALL`] order.
    pub counters: Vec<(DeviceCounter, u64)>,
    /// Every refusal reason with its count (zeros included), in [`Violation::all`] order.
    pub refusals: Vec<(Violation, u64)>,
}

impl DeviceSnapshot {
    /// Copies `slot`'s counters.
    pub fn read(device: &str, slot: &DeviceSlot) -> DeviceSnapshot {
        DeviceSnapshot {
            device: device.to_string(),
            counters: DeviceCounter::ALL
                .iter()
                .map(|&c| (c, slot.get(c)))
                .collect(),
            refusals: Violation::all().map(|v| (v, slot.refusals(v))).collect(),
        }
    }

    pub fn get(&self, counter: DeviceCounter) -> u64 {
        self.counters
            .iter()
            .find(|(c, _)| *c == counter)
            .map_or(0, |(_, n)| *n)
    }

    /// All refusals together.
    pub fn total_refusals(&self) -> u64 {
        self.refusals
            .iter()
            .fold(0u64, |sum, (_, n)| sum.saturating_add(*n))
    }
}

/// One line: the counters, then only the refusal reasons that occurred, as `layer.reason`.
impl fmt::Display for DeviceSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.device)?;
        for (c, n) in &self.counters {
            write!(f, " {c}={n}")?;
        }
        write!(f, " refused={}", self.total_refusals())?;
        for (v, n) in self.refusals.iter().filter(|(_, n)| *n > 0) {
            write!(f, " {}.{}={n}", v.layer(), v.name())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::region::Region;
    use crate::telemetry::vocabulary::{ChainViolation, RequestViolation};

    #[test]
    fn the_line_lists_counters_and_only_the_refusals_that_happened() {
        let r = Region::anonymous().unwrap();
        let slot = r.device(0).unwrap();
        slot.add(DeviceCounter::Requests, 3);
        slot.refuse(ChainViolation::Loop.into());
        slot.refuse(ChainViolation::Loop.into());
        slot.refuse(RequestViolation::ReadOnly.into());
        let s = DeviceSnapshot::read("virtio-blk0", slot);
        assert_eq!(s.get(DeviceCounter::Requests), 3);
        assert_eq!(s.total_refusals(), 3);
        let text = s.to_string();
        assert!(text.starts_with("virtio-blk0: requests=3"), "{text}");
        assert!(text.contains("chain.loop=2"), "{text}");
        assert!(text.contains("request.read_only=1"), "{text}");
        assert!(!text.contains("zero_length"), "{text}");
    }
}
