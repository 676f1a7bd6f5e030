//! The i8042 keyboard controller, kept for its CPU reset command (0xfe to port 0x64).

use std::sync::{Arc, Mutex};

use vm_superio::{I8042Device, Trigger};

use super::ByteRegisters;
use crate::exit::{ExitSignal, VmExitReason};

/// Turns the controller's reset line into a VM exit.
pub struct ResetTrigger(Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(VmExitReason::Reset);
        Ok(())
    }
}

pub struct I8042 {
    inner: Mutex<I8042Device<ResetTrigger>>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitSignal>) -> I8042 {
        I8042 {
            inner: Mutex::new(I8042Device::new(ResetTrigger(exit))),
        }
    }
}

impl ByteRegisters for I8042 {
    fn read_byte(&self, offset: u8) -> u8 {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset)
    }

    fn write_byte(&self, offset: u8, value: u8) {
        // The only error is the reset trigger's, which is infallible.
        let _ = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(offset, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::BusDevice;

    #[test]
    fn reset_command_ends_the_vm_with_reset() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let dev = I8042::new(exit.clone());
        assert!(dev.write(4, &[0xfe]));
        assert_eq!(exit.reason(), Some(VmExitReason::Reset));
    }

    #[test]
    fn other_commands_do_not_end_the_vm() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let dev = I8042::new(exit.clone());
        assert!(dev.write(4, &[0x20]));
        assert!(dev.write(0, &[0x00]));
        assert!(!exit.is_stopping());
    }
}
