//! The few legacy PC devices a microVM keeps: one 16550A serial port, the i8042 (only for
//! its reset line), the ACPI power registers, the pvpanic port, and bulkhead's own guest ports
//! for exit status and boot timing.

pub mod i8042;
pub mod ioapic;
pub mod ports;
pub mod power;
pub mod pvpanic;
pub mod serial;
pub mod vmgenid;

pub use i8042::I8042;
pub use ioapic::{Ioapic, MsiMessage, MsiRoutes};
pub use ports::{BootCompletePort, GuestExitPort, IoDelayPort};
pub use power::AcpiPower;
pub use pvpanic::PvPanic;
pub use serial::{EventFdTrigger, SerialPort};
pub use vmgenid::VmGenId;

use crate::devices::BusDevice;

/// A device whose registers are single bytes at offsets below 256 (the UART, the i8042).
/// The bus adapter below refuses any other access before the device sees it.
pub trait ByteRegisters: Send + Sync {
    fn read_byte(&self, offset: u8) -> u8;
    /// Writes a register; false refuses the write (an unimplemented command), which the bus
    /// counts.
    fn write_byte(&self, offset: u8, value: u8) -> bool;
}

impl<T: ByteRegisters> BusDevice for T {
    fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        let (Ok(offset), [byte]) = (u8::try_from(offset), data) else {
            return false;
        };
        *byte = self.read_byte(offset);
        true
    }

    fn write(&self, offset: u64, data: &[u8]) -> bool {
        let (Ok(offset), [byte]) = (u8::try_from(offset), data) else {
            return false;
        };
        self.write_byte(offset, *byte)
    }
}

/// I/O ports of the devices above.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
pub const SERIAL_PORT_LEN: u64 = 8;
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_PORT_BASE: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
pub const I8042_IRQ: u32 = 1;
/// The ACPI Generic Event Device's interrupt (hardware-reduced ACPI has no SCI): raised when the
/// VM generation ID changes. 3 is COM2's line on a PC, which bulkhead has no use for.
pub const GED_IRQ: u32 = 3;
/// The i8042's command port, and the command that pulses the CPU reset line.
pub const I8042_COMMAND_PORT: u8 = 0x64;
pub const I8042_PULSE_RESET: u8 = 0xfe;
pub const GUEST_EXIT_PORT: u64 = 0xf4;
pub const BOOT_COMPLETE_PORT: u64 = 0xf5;
/// Linux writes here to delay I/O; swallowing it keeps the unassigned-port counters about
/// things that matter.
pub const IO_DELAY_PORT: u64 = 0x80;
/// The pvpanic port, where QEMU puts it (so guest tooling that assumes it finds it).
pub const PVPANIC_PORT: u64 = 0x505;
/// ACPI sleep control, sleep status and reset registers.
pub const POWER_PORT_BASE: u64 = 0x600;
