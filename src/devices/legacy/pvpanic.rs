//! The pvpanic device (ACPI `QEMU0001`): one I/O port through which a guest kernel says it
//! panicked, so the VM ends at once with its own status instead of spinning or rebooting, even
//! without `panic=` on the command line. A read tells the guest which events the device
//! understands; Linux writes only those.

use std::sync::Arc;

use crate::devices::BusDevice;
use crate::exit::{ExitSignal, VmExitReason};
use crate::telemetry::{Reporter, VmCounter};
use crate::warn_limited;

/// The kernel panicked.
const PANICKED: u8 = 1 << 0;
/// The kernel panicked with a crash kernel loaded, which it is about to start.
const CRASH_LOADED: u8 = 1 << 1;
/// What the device understands.
const CAPABILITIES: u8 = PANICKED | CRASH_LOADED;

pub struct PvPanic {
    exit: Arc<ExitSignal>,
    reporter: Reporter,
}

impl PvPanic {
    pub fn new(exit: Arc<ExitSignal>, reporter: Reporter) -> PvPanic {
        PvPanic { exit, reporter }
    }
}

impl BusDevice for PvPanic {
    fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        match (offset, data) {
            (0, [byte]) => {
                *byte = CAPABILITIES;
                true
            }
            _ => false,
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> bool {
        let (0, &[event]) = (offset, data) else {
            return false;
        };
        if event == 0 || event & !CAPABILITIES != 0 {
            return false;
        }
        if event & PANICKED != 0 {
            // The supervisor reports it, with the VM's ending.
            self.reporter.region().count(VmCounter::GuestPanics);
            self.exit.request(VmExitReason::GuestPanic);
        } else {
            // The crash kernel takes over; the VM goes on, and the counter says it happened.
            self.reporter.region().count(VmCounter::GuestCrashLoaded);
            warn_limited!("the guest kernel panicked and is starting its crash kernel (pvpanic)");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (PvPanic, Arc<ExitSignal>) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        (
            PvPanic::new(exit.clone(), Reporter::detached().unwrap()),
            exit,
        )
    }

    #[test]
    fn a_read_offers_both_events() {
        let (p, _) = device();
        let mut cap = [0];
        assert!(p.read(0, &mut cap));
        assert_eq!(cap, [PANICKED | CRASH_LOADED]);
    }

    #[test]
    fn a_panic_ends_the_vm_and_is_counted() {
        let (p, exit) = device();
        assert!(p.write(0, &[PANICKED]));
        assert_eq!(exit.reason(), Some(VmExitReason::GuestPanic));
        assert_eq!(p.reporter.region().vm_counter(VmCounter::GuestPanics), 1);
    }

    #[test]
    fn a_crash_kernel_start_is_counted_and_the_vm_goes_on() {
        let (p, exit) = device();
        assert!(p.write(0, &[CRASH_LOADED]));
        assert!(!exit.is_stopping());
        assert_eq!(
            p.reporter.region().vm_counter(VmCounter::GuestCrashLoaded),
            1
        );
        assert_eq!(p.reporter.region().vm_counter(VmCounter::GuestPanics), 0);
    }

    #[test]
    fn unknown_events_and_odd_accesses_are_refused() {
        let (p, exit) = device();
        for data in [&[0u8][..], &[4], &[0x81], &[1, 0]] {
            assert!(!p.write(0, data), "{data:?}");
        }
        assert!(!p.write(1, &[1]));
        assert!(!p.read(0, &mut [0, 0]));
        assert!(!exit.is_stopping());
    }
}
