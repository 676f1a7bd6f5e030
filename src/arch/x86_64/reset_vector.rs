//! The reset vector: the real-mode code at F000:FFF0 where a CPU starts after reset. bulkhead
//! has no firmware, but Linux may reboot through the BIOS (it jumps here in real mode): with
//! `reboot=b`, and an EFI-enabled kernel on a hardware-reduced ACPI machine whose command line
//! has no `reboot=`. The few bytes here pull the machine's reset line the way a BIOS would:
//! through the i8042.

use crate::vstate::dirty::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::layout::RESET_VECTOR;
use super::ArchError;

/// `mov al, value; out port, al; cli; hlt; jmp back to the hlt`.
pub fn code(port: u8, value: u8) -> [u8; 9] {
    [0xb0, value, 0xe6, port, 0xfa, 0xf4, 0xeb, 0xfd, 0x90]
}

/// Writes the reset vector: a restart writes `value` to I/O port `port`.
pub fn write(mem: &GuestMemoryMmap, port: u8, value: u8) -> Result<(), ArchError> {
    mem.write_slice(&code(port, value), GuestAddress(RESET_VECTOR))
        .map_err(|source| ArchError::GuestWrite {
            what: "reset vector",
            addr: RESET_VECTOR,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::HIMEM_START;

    #[test]
    fn the_reset_code_fits_below_1_mib_and_writes_its_port() {
        let code = code(0x64, 0xfe);
        assert!(RESET_VECTOR + code.len() as u64 <= HIMEM_START);
        assert_eq!(&code[..4], &[0xb0, 0xfe, 0xe6, 0x64]);
        // The jump lands on the hlt: offset 6 + 2 - 3 = 5.
        assert_eq!(code[5], 0xf4);
        assert_eq!(8i32 + i32::from(code[7] as i8), 5);
    }
}
