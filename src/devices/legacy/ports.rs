//! bulkhead's guest ports: 0xf4 ends the VM with a status, 0xf5 marks boot complete.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::devices::BusDevice;
use crate::exit::{ExitSignal, VmExitReason};
use crate::telemetry::{monotonic_ns, Reporter};

/// A one-byte write of N ends the VM; `bulkhead run` exits with status N.
pub struct GuestExitPort(pub Arc<ExitSignal>);

impl BusDevice for GuestExitPort {
    fn read(&self, _offset: u64, _data: &mut [u8]) -> bool {
        false
    }

    fn write(&self, offset: u64, data: &[u8]) -> bool {
        match (offset, data) {
            (0, [status]) => {
                self.0.request(VmExitReason::GuestExit(*status));
                true
            }
            _ => false,
        }
    }
}

/// Any write logs the time since `bulkhead run` started and records it for the supervisor,
/// once.
pub struct BootCompletePort {
    seen: AtomicBool,
    reporter: Reporter,
    /// CLOCK_MONOTONIC nanoseconds when `bulkhead run` started.
    start_ns: u64,
}

impl BootCompletePort {
    pub fn new(reporter: Reporter, start_ns: u64) -> BootCompletePort {
        BootCompletePort {
            seen: AtomicBool::new(false),
            reporter,
            start_ns,
        }
    }

    /// True once the guest reported boot complete.
    pub fn seen(&self) -> bool {
        self.seen.load(Ordering::Relaxed)
    }
}

impl BusDevice for BootCompletePort {
    fn read(&self, _offset: u64, _data: &mut [u8]) -> bool {
        false
    }

    fn write(&self, _offset: u64, _data: &[u8]) -> bool {
        if !self.seen.swap(true, Ordering::Relaxed) {
            let now = monotonic_ns();
            self.reporter.region().set_boot_complete(now);
            let ms = now.saturating_sub(self.start_ns) / 1_000_000;
            log::info!("guest boot complete in {ms} ms");
        }
        true
    }
}

/// Port 0x80: Linux's I/O delay port. Writes vanish, reads are all-ones.
pub struct IoDelayPort;

impl BusDevice for IoDelayPort {
    fn read(&self, _offset: u64, data: &mut [u8]) -> bool {
        data.fill(0xff);
        true
    }

    fn write(&self, _offset: u64, _data: &[u8]) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_byte_write_ends_the_vm_with_that_status() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let port = GuestExitPort(exit.clone());
        assert!(port.write(0, &[42]));
        assert_eq!(exit.reason(), Some(VmExitReason::GuestExit(42)));
    }

    #[test]
    fn wide_write_or_read_of_the_exit_port_is_refused_and_does_not_exit() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let port = GuestExitPort(exit.clone());
        assert!(!port.write(0, &[1, 0]));
        assert!(!port.read(0, &mut [0u8]));
        assert!(!exit.is_stopping());
    }

    #[test]
    fn boot_complete_is_recorded_once_for_the_supervisor() {
        let port = BootCompletePort::new(Reporter::detached().unwrap(), monotonic_ns());
        assert!(!port.seen());
        assert!(port.write(0, &[1]));
        let first = port.reporter.region().boot_complete_ns();
        assert!(first.is_some());
        assert!(port.write(0, &[1]));
        assert!(port.seen());
        assert_eq!(port.reporter.region().boot_complete_ns(), first);
    }
}
