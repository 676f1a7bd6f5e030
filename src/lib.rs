//! bulkhead: a minimal KVM virtual machine monitor for one tenant microVM per process.
//!
//! The data flows one way: [`config`] validates settings, [`builder`] turns them into a
//! ready-to-run [`vmm::Vmm`] (memory, VM, devices, kernel, vCPUs), and the running VM feeds
//! [`telemetry`]. Guest input is validated where it enters: the exit handlers in
//! [`vstate::vcpu`] and the devices in [`devices`].

pub mod api;
pub mod arch;
pub mod boot;
pub mod broker;
pub mod builder;
pub mod config;
pub mod control;
pub mod cpuid_cache;
pub mod devices;
pub mod exec;
pub mod exit;
pub mod handover;
pub mod hostfile;
pub mod jail;
pub mod logger;
pub mod process;
pub mod procfs;
pub mod residency;
pub mod seccomp;
pub mod signal;
pub mod snapshot;
pub mod supervisor;
pub mod telemetry;
pub mod test_hooks;
pub mod vmm;
pub mod vmproc;
pub mod vstate;

pub use builder::{build_vm, BuildError};
pub use config::{ConfigError, RawConfig, VmConfig};
pub use exit::VmExitReason;

/// An underlying error kept as the source of an error that must compare equal (settings errors
/// are compared in tests) or be cloned: two are equal when their messages are.
#[derive(Debug)]
pub struct Cause<E>(pub std::sync::Arc<E>);

impl<E> Clone for Cause<E> {
    fn clone(&self) -> Cause<E> {
        Cause(self.0.clone())
    }
}

impl<E> Cause<E> {
    pub fn new(e: E) -> Cause<E> {
        Cause(std::sync::Arc::new(e))
    }
}

impl<E: std::fmt::Display> std::fmt::Display for Cause<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: std::error::Error + 'static> std::error::Error for Cause<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl<E: std::fmt::Display> PartialEq for Cause<E> {
    fn eq(&self, other: &Cause<E>) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}

impl<E: std::fmt::Display> Eq for Cause<E> {}

/// An error and its sources, joined into one clear line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}
