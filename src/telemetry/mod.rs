//! Telemetry: the one vocabulary of what bulkhead counts and alerts on, the shared region and
//! event channel that carry it from the VM process to its supervisor, and the exports built
//! from it (metrics and alerts).
//!
//! The VM process only counts and posts (relaxed atomics and a lock-free ring in shared
//! memory: no lock on a vCPU's path, and at most one eventfd write per supervisor drain to wake
//! it; a count alone makes no system call). The supervisor reads, decides and
//! writes outputs, treating everything it reads as untrusted. This module imports nothing
//! from `devices`: devices report into it.

pub mod alert;
pub mod device;
pub mod devices;
pub mod engine;
pub mod events;
pub mod expected;
pub mod metrics;
pub mod policy;
pub mod region;
pub mod ring;
pub mod vocabulary;

pub use alert::{Alert, AlertContext};
pub use device::{DeviceTelemetry, Evidence};
pub use devices::DeviceSnapshot;
pub use engine::{Engine, Firing};
pub use events::{monotonic_ns, request_evidence, Event, Limits, Reporter};
pub use metrics::{Exposition, MetricsSnapshot, SupervisorFacts};
pub use policy::{OnViolation, Response};
pub use region::{DeviceCounter, Page, Region, RegionError, VcpuRow, MAX_DEVICES, MAX_VCPUS};
pub use vocabulary::{
    ChainViolation, ExitKind, ImageFormat, Priority, RequestViolation, Rule, TransportViolation,
    Violation, VmCounter,
};
