//! The ACPI power registers of a hardware-reduced board, as the FADT names them: sleep control
//! and sleep status (a guest powers off by writing SLP_TYP for S5 with SLP_EN), and the reset
//! register. Three one-byte ports; anything else a guest writes is refused and counted.

use std::sync::Arc;

use crate::devices::BusDevice;
use crate::exit::{ExitSignal, ResetVia, VmExitReason};

/// Port offsets from the block's base.
pub const SLEEP_CONTROL: u64 = 0;
pub const SLEEP_STATUS: u64 = 1;
pub const RESET: u64 = 2;
/// Ports in the block.
pub const POWER_PORTS_LEN: u64 = 3;
/// The value the FADT tells the guest to write to the reset register.
pub const RESET_VALUE: u8 = 1;
/// SLP_TYP for S5, as `\_S5` declares it.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Sleep control: SLP_EN (bit 5) and SLP_TYP (bits 2 to 4).
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;
/// Sleep status: WAK_STS (bit 7), which a guest clears by writing it before it sleeps.
const WAK_STS: u8 = 1 << 7;

/// Sleep control, sleep status and reset, at consecutive ports.
pub struct AcpiPower {
    exit: Arc<ExitSignal>,
}

impl AcpiPower {
    pub fn new(exit: Arc<ExitSignal>) -> AcpiPower {
        AcpiPower { exit }
    }
}

impl BusDevice for AcpiPower {
    fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        match (offset, data) {
            // Nothing is ever pending: the machine never wakes from a sleep it does not have.
            (SLEEP_CONTROL | SLEEP_STATUS, [byte]) => {
                *byte = 0;
                true
            }
            _ => false,
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> bool {
        let (offset, &[value]) = (offset, data) else {
            return false;
        };
        match offset {
            SLEEP_CONTROL => {
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if value & SLP_EN == 0 {
                    // Setting up a type without entering it changes nothing.
                    return value & !(SLP_TYP_MASK << SLP_TYP_SHIFT) == 0;
                }
                if sleep_type != S5_SLEEP_TYPE
                    || value & !(SLP_EN | SLP_TYP_MASK << SLP_TYP_SHIFT) != 0
                {
                    // Only S5 is declared; a sleep state the tables never offered is refused.
                    return false;
                }
                self.exit.request(VmExitReason::PowerOff);
                true
            }
            SLEEP_STATUS => value & !WAK_STS == 0,
            RESET if value == RESET_VALUE => {
                self.exit
                    .request(VmExitReason::Reset(ResetVia::AcpiRegister));
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn power() -> (AcpiPower, Arc<ExitSignal>) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        (AcpiPower::new(exit.clone()), exit)
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (p, exit) = power();
        // What Linux writes: clear WAK_STS, then SLP_TYP 5 with SLP_EN.
        assert!(p.write(SLEEP_STATUS, &[WAK_STS]));
        assert!(!exit.is_stopping());
        assert!(p.write(SLEEP_CONTROL, &[0x34]));
        assert_eq!(exit.reason(), Some(VmExitReason::PowerOff));
    }

    #[test]
    fn the_reset_value_resets_and_nothing_else_does() {
        let (p, exit) = power();
        assert!(!p.write(RESET, &[0xfe]));
        assert!(!p.write(RESET, &[RESET_VALUE, 0]));
        assert!(!exit.is_stopping());
        assert!(p.write(RESET, &[RESET_VALUE]));
        assert_eq!(
            exit.reason(),
            Some(VmExitReason::Reset(ResetVia::AcpiRegister))
        );
    }

    #[test]
    fn sleep_states_never_offered_and_odd_accesses_are_refused() {
        let (p, exit) = power();
        for value in [(3 << 2) | SLP_EN, (5 << 2) | SLP_EN | 1, 0xff, 1] {
            assert!(!p.write(SLEEP_CONTROL, &[value]), "{value:#x}");
        }
        assert!(p.write(SLEEP_CONTROL, &[5 << 2]), "a type without SLP_EN");
        assert!(!p.write(SLEEP_STATUS, &[1]));
        assert!(!p.write(SLEEP_CONTROL, &[0x34, 0]));
        assert!(!p.write(3, &[0]));
        assert!(!p.read(RESET, &mut [0]));
        assert!(!p.read(SLEEP_STATUS, &mut [0, 0]));
        let mut status = [0xff];
        assert!(p.read(SLEEP_STATUS, &mut status));
        assert_eq!(status, [0]);
        assert!(!exit.is_stopping());
    }
}
