//! A virtio device's handle on telemetry: its counters in the shared region, and the events
//! that carry the evidence of each refusal.

use super::events::{Event, Reporter};
use super::region::{DeviceCounter, DeviceSlot};
use super::vocabulary::Violation;

/// Where device `index` counts and reports.
#[derive(Debug, Clone)]
pub struct DeviceTelemetry {
    reporter: Reporter,
    index: u16,
}

/// The evidence of one refusal: the queue it happened on, and two words whose meaning
/// depends on the layer (see [`Event::Violation`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evidence {
    pub queue: Option<u16>,
    pub a: u64,
    pub b: u64,
}

impl DeviceTelemetry {
    pub fn new(reporter: Reporter, index: u16) -> DeviceTelemetry {
        DeviceTelemetry { reporter, index }
    }

    /// A device that reports nowhere anyone reads (unit tests).
    pub fn detached() -> Result<DeviceTelemetry, super::region::RegionError> {
        Ok(DeviceTelemetry::new(Reporter::detached()?, 0))
    }

    fn slot(&self) -> Option<&DeviceSlot> {
        self.reporter.region().device(usize::from(self.index))
    }

    #[inline]
    pub fn add(&self, counter: DeviceCounter, n: u64) {
        if let Some(s) = self.slot() {
            s.add(counter, n);
        }
    }

    pub fn get(&self, counter: DeviceCounter) -> u64 {
        self.slot().map_or(0, |s| s.get(counter))
    }

    /// How often the device refused for `v`.
    pub fn refusals(&self, v: impl Into<Violation>) -> u64 {
        self.slot().map_or(0, |s| s.refusals(v))
    }

    /// Counts a refusal and sends its evidence to the supervisor.
    pub fn refuse(&self, v: impl Into<Violation>, evidence: Evidence) {
        let violation = v.into();
        if let Some(s) = self.slot() {
            s.refuse(violation);
        }
        self.reporter.post(Event::Violation {
            device: self.index,
            violation,
            queue: evidence.queue,
            a: evidence.a,
            b: evidence.b,
        });
    }
}
