//! Per-VM counters that the vCPU and VMM threads bump without locks, and that reports read.
//!
//! Counting must never block a vCPU, so every counter is a relaxed atomic; a snapshot is a
//! consistent-enough copy for reporting, not a transaction.

pub mod counters;
pub mod devices;

pub use counters::{CounterSnapshot, VmCounters};
pub use devices::DeviceSnapshot;
