//! The IOAPIC, in user space, for VMs whose irqchip is split (local APICs in KVM, no PIC and
//! no PIT): the guest programs redirection entries here, and each unmasked pin becomes an MSI
//! route in KVM, so a device's irqfd reaches its vCPU without leaving the kernel. Only the
//! register writes that change a route come to user space, a few dozen per boot.
//!
//! Why not KVM's own IOAPIC: a VM with the in-kernel PIC, IOAPIC and PIT takes the kernel
//! 5 to 20 ms to tear down (each of their I/O-bus registrations waits out an SRCU grace
//! period), several times the whole run of a small guest. A hardware-reduced ACPI guest uses
//! neither PIC nor PIT.
//!
//! Every pin is delivered edge-triggered, as the irqfds raise them: a redirection entry that
//! asks for level triggering still works (the guest's EOI needs nothing from us), and a
//! delivery mode that no IOAPIC driver uses for a device (SMI, INIT, ExtINT, reserved) is
//! refused and keeps the pin silent.

use std::sync::Mutex;

use crate::devices::BusDevice;
use crate::warn_limited;

/// The guest-visible register window (IOREGSEL at 0x00, IOWIN at 0x10).
pub const IOAPIC_LEN: u64 = 0x20;
/// Pins, as `KVM_CAP_SPLIT_IRQCHIP` reserves GSIs for them.
pub const PINS: usize = 24;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARBITRATION: u32 = 0x02;
const REG_TABLE: u32 = 0x10;
/// Version 0x11 (the 82093AA, no EOI register), with the highest pin number in bits 16-23.
const VERSION: u32 = 0x11 | ((PINS as u32 - 1) << 16);

const RTE_MASKED: u64 = 1 << 16;
/// Delivery status (bit 12) and remote IRR (bit 14) are read-only; they stay 0 because
/// every pin is delivered edge-triggered.
const RTE_READ_ONLY: u64 = (1 << 12) | (1 << 14);
const DELIVERY_FIXED: u64 = 0;
const DELIVERY_LOWEST: u64 = 1;
const DELIVERY_NMI: u64 = 4;

/// One MSI, as the local APICs take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u32,
    pub data: u32,
}

/// Where the IOAPIC's routes go (KVM's GSI routing table). Pin n is GSI n.
pub trait MsiRoutes: Send + Sync {
    /// Replaces every pin's route: `None` for a masked or refused pin.
    fn set_routes(&self, routes: &[Option<MsiMessage>; PINS]) -> Result<(), std::io::Error>;
}

/// What a redirection entry asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Masked,
    Deliver(MsiMessage),
    /// A delivery mode no device interrupt uses.
    Refused {
        delivery_mode: u64,
    },
}

/// Translates a redirection entry into the MSI that delivers it (Intel 82093AA datasheet,
/// section 3.2.4; SDM volume 3, section 11.11 for the MSI format).
fn route(rte: u64) -> Route {
    if rte & RTE_MASKED != 0 {
        return Route::Masked;
    }
    let vector = rte & 0xff;
    let delivery_mode = (rte >> 8) & 0x7;
    if !matches!(
        delivery_mode,
        DELIVERY_FIXED | DELIVERY_LOWEST | DELIVERY_NMI
    ) {
        return Route::Refused { delivery_mode };
    }
    let logical = (rte >> 11) & 1;
    let destination = (rte >> 56) & 0xff;
    let address = 0xfee0_0000 | (destination << 12) | (logical << 2);
    // Bit 15 of the data (trigger mode) stays 0: edge, as the irqfds raise the pins.
    let data = vector | (delivery_mode << 8);
    Route::Deliver(MsiMessage {
        address: address as u32,
        data: data as u32,
    })
}

struct State {
    select: u32,
    entries: [u64; PINS],
    /// The routes last given to KVM, so a write that changes none costs no ioctl.
    routes: [Option<MsiMessage>; PINS],
}

pub struct Ioapic {
    id: u32,
    state: Mutex<State>,
    router: Box<dyn MsiRoutes>,
}

impl Ioapic {
    /// An IOAPIC with APIC id `id` (as the MADT and MP table say), every pin masked.
    pub fn new(id: u8, router: Box<dyn MsiRoutes>) -> Ioapic {
        Ioapic {
            id: u32::from(id) << 24,
            state: Mutex::new(State {
                select: 0,
                entries: [RTE_MASKED; PINS],
                routes: [None; PINS],
            }),
            router,
        }
    }

    fn read_register(&self, state: &State) -> u32 {
        match state.select {
            REG_ID | REG_ARBITRATION => self.id,
            REG_VERSION => VERSION,
            r => match table_slot(r) {
                Some((pin, high)) => {
                    let entry = state.entries.get(pin).copied().unwrap_or(RTE_MASKED);
                    if high {
                        (entry >> 32) as u32
                    } else {
                        entry as u32
                    }
                }
                // Unimplemented registers read as 0, as on the 82093AA.
                None => 0,
            },
        }
    }

    /// Writes the selected register; false refuses the write (a read-only register, or an
    /// entry whose delivery mode is refused).
    fn write_register(&self, state: &mut State, value: u32) -> bool {
        // The ID register is writable on hardware, but a moved IOAPIC would no longer match
        // the ACPI tables; no guest rewrites it, and the write is refused.
        let Some((pin, high)) = table_slot(state.select) else {
            return false;
        };
        let Some(entry) = state.entries.get_mut(pin) else {
            return false;
        };
        let value = u64::from(value);
        *entry = if high {
            (*entry & 0xffff_ffff) | (value << 32)
        } else {
            (*entry & !0xffff_ffff) | (value & !RTE_READ_ONLY)
        };
        let (route, accepted) = match route(*entry) {
            Route::Masked => (None, true),
            Route::Deliver(msi) => (Some(msi), true),
            Route::Refused { delivery_mode } => {
                warn_limited!(
                    "IOAPIC pin {pin}: delivery mode {delivery_mode} refused, the pin stays silent"
                );
                (None, false)
            }
        };
        let mut routes = state.routes;
        let Some(slot) = routes.get_mut(pin) else {
            return false;
        };
        if *slot != route {
            *slot = route;
            match self.router.set_routes(&routes) {
                Ok(()) => state.routes = routes,
                Err(e) => warn_limited!("IOAPIC pin {pin}: KVM refused the new route: {e}"),
            }
        }
        accepted
    }
}

/// The IOAPIC's state, as a snapshot keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoapicState {
    pub select: u32,
    pub entries: Vec<u64>,
}

impl Ioapic {
    pub fn save(&self) -> IoapicState {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        IoapicState {
            select: state.select,
            entries: state.entries.to_vec(),
        }
    }

    /// Sets a saved state, and gives KVM the routes its entries make. An entry with a refused
    /// delivery mode stays silent, as it did when it was written. False when the state does not
    /// have one entry per pin or KVM refused the routes.
    pub fn restore(&self, saved: &IoapicState) -> bool {
        let Ok(entries) = <[u64; PINS]>::try_from(saved.entries.as_slice()) else {
            return false;
        };
        let mut routes = [None; PINS];
        for (slot, entry) in routes.iter_mut().zip(entries) {
            if let Route::Deliver(msi) = route(entry) {
                *slot = Some(msi);
            }
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.select = saved.select & 0xff;
        state.entries = entries;
        if self.router.set_routes(&routes).is_err() {
            return false;
        }
        state.routes = routes;
        true
    }
}

/// The pin and half (true for bits 32-63) of a redirection-table register.
fn table_slot(register: u32) -> Option<(usize, bool)> {
    let index = register.checked_sub(REG_TABLE)? as usize;
    (index < 2 * PINS).then_some((index / 2, index % 2 == 1))
}

impl BusDevice for Ioapic {
    fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        let Ok(out) = <&mut [u8; 4]>::try_from(data) else {
            return false;
        };
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let value = match offset {
            IOREGSEL => state.select,
            IOWIN => self.read_register(&state),
            _ => return false,
        };
        *out = value.to_le_bytes();
        true
    }

    fn write(&self, offset: u64, data: &[u8]) -> bool {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return false;
        };
        let value = u32::from_le_bytes(bytes);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match offset {
            IOREGSEL => {
                state.select = value & 0xff;
                true
            }
            IOWIN => self.write_register(&mut state, value),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<[Option<MsiMessage>; PINS]>>);

    impl MsiRoutes for Arc<Recorder> {
        fn set_routes(&self, routes: &[Option<MsiMessage>; PINS]) -> Result<(), std::io::Error> {
            self.0.lock().unwrap().push(*routes);
            Ok(())
        }
    }

    fn ioapic() -> (Ioapic, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        (Ioapic::new(2, Box::new(rec.clone())), rec)
    }

    fn write_reg(io: &Ioapic, reg: u32, value: u32) -> bool {
        assert!(io.write(IOREGSEL, &reg.to_le_bytes()));
        io.write(IOWIN, &value.to_le_bytes())
    }

    fn read_reg(io: &Ioapic, reg: u32) -> u32 {
        assert!(io.write(IOREGSEL, &reg.to_le_bytes()));
        let mut data = [0; 4];
        assert!(io.read(IOWIN, &mut data));
        u32::from_le_bytes(data)
    }

    #[test]
    fn identity_registers_say_24_pins_and_the_tables_id() {
        let (io, _) = ioapic();
        assert_eq!(read_reg(&io, REG_ID), 2 << 24);
        assert_eq!(read_reg(&io, REG_VERSION), 0x0017_0011);
        assert_eq!(read_reg(&io, REG_ARBITRATION), 2 << 24);
        assert_eq!(read_reg(&io, 0x03), 0);
    }

    #[test]
    fn pins_start_masked_and_route_nothing() {
        let (io, rec) = ioapic();
        for pin in 0..PINS as u32 {
            assert_eq!(read_reg(&io, REG_TABLE + 2 * pin), 1 << 16);
        }
        assert!(rec.0.lock().unwrap().is_empty());
    }

    #[test]
    fn unmasking_a_pin_routes_it_as_an_edge_msi_to_its_destination() {
        let (io, rec) = ioapic();
        // Linux's order: high half (destination APIC 3), then the low half unmasked.
        assert!(write_reg(&io, REG_TABLE + 2 * 4 + 1, 3 << 24));
        assert!(rec.0.lock().unwrap().is_empty(), "still masked: no ioctl");
        // Vector 0x31, fixed, physical, active high, level (bit 15) asked for.
        assert!(write_reg(&io, REG_TABLE + 2 * 4, 0x31 | (1 << 15)));
        let routes = rec.0.lock().unwrap().last().copied().unwrap();
        assert_eq!(
            routes[4],
            Some(MsiMessage {
                address: 0xfee0_3000,
                data: 0x31
            })
        );
        assert!(routes
            .iter()
            .enumerate()
            .all(|(p, r)| p == 4 || r.is_none()));
        // Masking takes the route away again.
        assert!(write_reg(&io, REG_TABLE + 2 * 4, 0x31 | (1 << 16)));
        assert_eq!(rec.0.lock().unwrap().last().unwrap()[4], None);
        assert_eq!(rec.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn logical_lowest_priority_entries_keep_their_mode() {
        assert_eq!(
            route((0x0fu64 << 56) | (1 << 11) | (1 << 8) | 0x41),
            Route::Deliver(MsiMessage {
                address: 0xfee0_f004,
                data: 0x141
            })
        );
    }

    #[test]
    fn read_only_status_bits_are_not_stored() {
        let (io, _) = ioapic();
        assert!(write_reg(
            &io,
            REG_TABLE,
            0x30 | (1 << 12) | (1 << 14) | (1 << 16)
        ));
        assert_eq!(read_reg(&io, REG_TABLE), 0x30 | (1 << 16));
    }

    #[test]
    fn smi_init_and_extint_entries_are_refused_and_stay_silent() {
        for mode in [2u32, 3, 5, 6, 7] {
            let (io, rec) = ioapic();
            assert!(!write_reg(&io, REG_TABLE + 2, 0x30 | (mode << 8)));
            assert!(rec.0.lock().unwrap().is_empty(), "mode {mode} was routed");
        }
    }

    #[test]
    fn odd_sizes_offsets_and_registers_are_refused() {
        let (io, _) = ioapic();
        assert!(!io.write(IOWIN, &[1, 2]));
        assert!(!io.read(0x04, &mut [0; 4]));
        assert!(!io.write(0x14, &[0; 4]));
        let mut byte = [0u8; 1];
        assert!(!io.read(IOREGSEL, &mut byte));
        // Past the last pin, the ID register and the version register take no writes.
        assert!(!write_reg(&io, REG_TABLE + 2 * PINS as u32, 0));
        assert!(!write_reg(&io, REG_ID, 7 << 24));
        assert!(!write_reg(&io, REG_VERSION, 0));
        assert_eq!(read_reg(&io, REG_ID), 2 << 24);
        // A selector's high bits are ignored, as the register is 8 bits wide.
        assert!(io.write(IOREGSEL, &0xffff_ff01u32.to_le_bytes()));
        let mut data = [0; 4];
        assert!(io.read(IOREGSEL, &mut data));
        assert_eq!(u32::from_le_bytes(data), 1);
    }

    #[test]
    fn a_failed_route_update_is_tried_again_on_the_next_write() {
        struct Failing(Mutex<u32>);
        impl MsiRoutes for Arc<Failing> {
            fn set_routes(&self, _: &[Option<MsiMessage>; PINS]) -> Result<(), std::io::Error> {
                let mut calls = self.0.lock().unwrap();
                *calls += 1;
                if *calls == 1 {
                    Err(std::io::Error::from_raw_os_error(libc::ENOMEM))
                } else {
                    Ok(())
                }
            }
        }
        let f = Arc::new(Failing(Mutex::new(0)));
        let io = Ioapic::new(0, Box::new(f.clone()));
        write_reg(&io, REG_TABLE, 0x30);
        write_reg(&io, REG_TABLE, 0x30);
        assert_eq!(*f.0.lock().unwrap(), 2);
    }
}
