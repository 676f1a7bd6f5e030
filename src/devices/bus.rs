//! Address dispatch for port I/O and MMIO.
//!
//! The bus is built before any vCPU starts and never changes afterwards, so vCPUs share it
//! without a lock; each device does its own (short) locking.

use std::collections::BTreeMap;
use std::sync::Arc;

/// A device on a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send + Sync {
    /// Fills `data` from the register at `offset`. Returns false to refuse the access (bad
    /// size or offset); the caller then answers all-ones and counts it.
    fn read(&self, offset: u64, data: &mut [u8]) -> bool;
    /// Writes `data` to the register at `offset`. Returns false to refuse the access.
    fn write(&self, offset: u64, data: &[u8]) -> bool;
}

/// What became of one access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusAccess {
    /// A device took it.
    Handled,
    /// No device claims the address.
    Unassigned,
    /// A device claims the address but refused the access, or the access ran past the end of
    /// the device's range.
    Refused,
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
    #[error("device range {base:#x}+{len:#x} overlaps the device at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

struct Slot {
    len: u64,
    device: Arc<dyn BusDevice>,
}

/// A map from address ranges to devices.
#[derive(Default)]
pub struct Bus {
    slots: BTreeMap<u64, Slot>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<(u64, u64)> = self.slots.iter().map(|(b, s)| (*b, s.len)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<dyn BusDevice>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        if let Some((&other, _)) = self
            .slots
            .range(..end)
            .next_back()
            .filter(|(&b, s)| b + s.len > base)
        {
            return Err(BusError::Overlap { base, len, other });
        }
        self.slots.insert(base, Slot { len, device });
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` in it, if the whole access of
    /// `size` bytes stays inside the device's range.
    fn resolve(&self, addr: u64, size: usize) -> Result<(&Arc<dyn BusDevice>, u64), BusAccess> {
        let (base, slot) = self
            .slots
            .range(..=addr)
            .next_back()
            .filter(|(&b, s)| addr - b < s.len)
            .ok_or(BusAccess::Unassigned)?;
        let offset = addr - base;
        let size = u64::try_from(size).map_err(|_| BusAccess::Refused)?;
        if size == 0 || offset.checked_add(size).map_or(true, |end| end > slot.len) {
            return Err(BusAccess::Refused);
        }
        Ok((&slot.device, offset))
    }

    /// Reads at `addr`. Unless a device handled it, `data` is all-ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> BusAccess {
        let result = match self.resolve(addr, data.len()) {
            Ok((device, offset)) => {
                if device.read(offset, data) {
                    BusAccess::Handled
                } else {
                    BusAccess::Refused
                }
            }
            Err(access) => access,
        };
        if result != BusAccess::Handled {
            data.fill(0xff);
        }
        result
    }

    /// Writes at `addr`; dropped unless a device handles it.
    pub fn write(&self, addr: u64, data: &[u8]) -> BusAccess {
        match self.resolve(addr, data.len()) {
            Ok((device, offset)) => {
                if device.write(offset, data) {
                    BusAccess::Handled
                } else {
                    BusAccess::Refused
                }
            }
            Err(access) => access,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Mutex<Vec<(u64, Vec<u8>)>>,
    }

    impl BusDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) -> bool {
            if data.len() != 1 {
                return false;
            }
            data[0] = offset as u8;
            true
        }
        fn write(&self, offset: u64, data: &[u8]) -> bool {
            self.writes.lock().unwrap().push((offset, data.to_vec()));
            true
        }
    }

    fn bus_with(base: u64, len: u64) -> (Bus, Arc<Recorder>) {
        let dev = Arc::new(Recorder::default());
        let mut bus = Bus::new();
        bus.insert(dev.clone(), base, len).unwrap();
        (bus, dev)
    }

    #[test]
    fn access_reaches_the_device_at_its_offset() {
        let (bus, dev) = bus_with(0x3f8, 8);
        let mut b = [0u8];
        assert_eq!(bus.read(0x3fa, &mut b), BusAccess::Handled);
        assert_eq!(b[0], 2);
        assert_eq!(bus.write(0x3ff, &[9]), BusAccess::Handled);
        assert_eq!(dev.writes.lock().unwrap()[0], (7, vec![9]));
    }

    #[test]
    fn unassigned_reads_are_all_ones_and_writes_are_dropped() {
        let (bus, dev) = bus_with(0x3f8, 8);
        let mut b = [0u8; 4];
        assert_eq!(bus.read(0x3f7, &mut b), BusAccess::Unassigned);
        assert_eq!(b, [0xff; 4]);
        assert_eq!(bus.read(0x400, &mut b), BusAccess::Unassigned);
        assert_eq!(bus.write(0x400, &[1]), BusAccess::Unassigned);
        assert!(dev.writes.lock().unwrap().is_empty());
    }

    #[test]
    fn access_running_past_the_device_or_refused_by_it_is_refused() {
        let (bus, _) = bus_with(0x3f8, 8);
        let mut b = [0u8; 2];
        assert_eq!(bus.read(0x3ff, &mut b), BusAccess::Refused);
        assert_eq!(b, [0xff; 2]);
        assert_eq!(bus.read(0x3f8, &mut b), BusAccess::Refused); // device wants 1 byte
        assert_eq!(bus.write(0x3ff, &[1, 2]), BusAccess::Refused);
        assert_eq!(bus.write(0x3f8, &[]), BusAccess::Refused);
    }

    #[test]
    fn overlapping_or_empty_ranges_are_rejected() {
        let (mut bus, dev) = bus_with(0x100, 0x10);
        assert!(matches!(
            bus.insert(dev.clone(), 0x10f, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), 0xf8, 0x9),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), 0x200, 0),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
        assert!(bus.insert(dev.clone(), 0xf0, 0x10).is_ok());
        assert!(bus.insert(dev, 0x110, 0x10).is_ok());
    }

    #[test]
    fn addresses_near_the_top_of_the_space_do_not_overflow() {
        let (bus, _) = bus_with(u64::MAX - 1, 1);
        let mut b = [0u8; 8];
        assert_eq!(bus.read(u64::MAX - 1, &mut b), BusAccess::Refused);
        assert_eq!(bus.read(u64::MAX, &mut b), BusAccess::Unassigned);
    }
}
