//! The counters one VM keeps.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counters {
    ($(#[doc = $doc:literal] $name:ident),+ $(,)?) => {
        /// Lock-free counters for one VM.
        #[derive(Debug, Default)]
        pub struct VmCounters {
            $(#[doc = $doc] pub $name: AtomicU64,)+
        }

        /// A plain copy of [`VmCounters`] for reporting.
        #[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
        pub struct CounterSnapshot {
            $(#[doc = $doc] pub $name: u64,)+
        }

        impl VmCounters {
            /// Copies every counter.
            pub fn snapshot(&self) -> CounterSnapshot {
                CounterSnapshot { $($name: self.$name.load(Ordering::Relaxed),)+ }
            }
        }

        impl fmt::Display for CounterSnapshot {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut sep = "";
                $(
                    write!(f, "{sep}{}={}", stringify!($name), self.$name)?;
                    sep = " ";
                )+
                let _ = sep;
                Ok(())
            }
        }
    };
}

counters! {
    /// Port I/O reads of a port no device claims (answered with all-ones).
    pio_unassigned_reads,
    /// Port I/O writes to a port no device claims (dropped).
    pio_unassigned_writes,
    /// MMIO reads of an address no device claims (answered with all-ones).
    mmio_unassigned_reads,
    /// MMIO writes to an address no device claims (dropped).
    mmio_unassigned_writes,
    /// Accesses a device refused (bad size or offset).
    device_refused_accesses,
    /// All KVM exits handled in user space.
    vcpu_exits,
    /// Abnormal exits: triple fault, internal error, failed entry, unknown.
    vcpu_failures,
}

impl VmCounters {
    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reflects_increments_and_prints_every_counter() {
        let c = VmCounters::default();
        VmCounters::inc(&c.pio_unassigned_reads);
        VmCounters::inc(&c.pio_unassigned_reads);
        VmCounters::inc(&c.mmio_unassigned_writes);
        let s = c.snapshot();
        assert_eq!(s.pio_unassigned_reads, 2);
        assert_eq!(s.mmio_unassigned_writes, 1);
        let text = s.to_string();
        assert!(text.contains("pio_unassigned_reads=2"));
        assert!(text.contains("vcpu_failures=0"));
    }
}
