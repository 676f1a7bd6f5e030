//! bulkhead: a minimal KVM virtual machine monitor for one tenant microVM per process.
//!
//! The data flows one way: [`config`] validates settings, [`builder`] turns them into a
//! ready-to-run [`vmm::Vmm`] (memory, VM, devices, kernel, vCPUs), and the running VM feeds
//! [`telemetry`]. Guest input is validated where it enters: the exit handlers in
//! [`vstate::vcpu`] and the devices in [`devices`].

pub mod arch;
pub mod boot;
pub mod builder;
pub mod config;
pub mod devices;
pub mod exit;
pub mod logger;
pub mod seccomp;
pub mod signal;
pub mod telemetry;
pub mod vmm;
pub mod vstate;

pub use builder::{build_vm, BuildError};
pub use config::{ConfigError, RawConfig, VmConfig};
pub use exit::VmExitReason;
