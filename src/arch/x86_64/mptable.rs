//! The Intel MultiProcessor Specification 1.4 table that tells a guest without ACPI how many
//! CPUs it has and how legacy interrupts reach the IOAPIC.

use crate::vstate::dirty::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, IOAPIC_PINS, IOAPIC_START, MPTABLE_START, MP_FLOATING_POINTER};
use super::ArchError;

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
/// Family 6 and the FPU and APIC feature bits: what the table's CPU entries claim.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const BUS_ID_ISA: u8 = 0;
const HEADER_LEN: usize = 44;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// The APIC id of vCPU `index`.
pub fn apic_id(index: u32) -> u8 {
    // Config validation caps vCPUs at 254, so the id always fits below the broadcast id.
    u8::try_from(index).unwrap_or(0xfe).min(0xfe)
}

/// Builds the configuration table (header and entries) for `vcpus` CPUs.
pub fn config_table(vcpus: u32) -> Vec<u8> {
    let ioapic_id = apic_id(vcpus);
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, apic_id(cpu), APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, BUS_ID_ISA, b'I', b'S', b'A', b' ', b' ', b' ']);
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 2;
    // ISA IRQ n is an ordinary interrupt on IOAPIC pin n, as KVM's default GSI routing wires
    // them; the in-kernel PIT raises GSI 0. Declaring pin 0 ExtINT instead leaves Linux
    // without a route for the timer (it oopses in setup_IO_APIC). The 8259's ExtINT reaches
    // the CPUs through LINT0, below.
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            BUS_ID_ISA,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_EXTINT,
        0,
        0,
        BUS_ID_ISA,
        0,
        0xff,
        0,
    ]);
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_NMI,
        0,
        0,
        BUS_ID_ISA,
        0,
        0xff,
        1,
    ]);
    count += 2;

    let total = HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(total);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(total as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, filled below
    table.extend_from_slice(b"BULKHEAD");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// Builds the 16-byte floating pointer that points at a table at `table_addr`.
pub fn floating_pointer(table_addr: u32) -> [u8; 16] {
    let mut fp = [0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&table_addr.to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = SPEC_REV;
    fp[10] = checksum(&fp);
    fp
}

/// Writes the floating pointer and configuration table for `vcpus` CPUs.
pub fn setup_mptable(mem: &GuestMemoryMmap, vcpus: u32) -> Result<(), ArchError> {
    let table = config_table(vcpus);
    if MPTABLE_START + table.len() as u64 > MP_FLOATING_POINTER {
        return Err(ArchError::MpTableTooBig(vcpus));
    }
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(|source| ArchError::GuestWrite {
            what: "MP table",
            addr: MPTABLE_START,
            source,
        })?;
    mem.write_slice(
        &floating_pointer(MPTABLE_START as u32),
        GuestAddress(MP_FLOATING_POINTER),
    )
    .map_err(|source| ArchError::GuestWrite {
        what: "MP floating pointer",
        addr: MP_FLOATING_POINTER,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROCESSOR_ENTRY_LEN: usize = 20;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn tables_checksum_to_zero() {
        for n in [1, 2, 254] {
            assert_eq!(sum(&config_table(n)), 0);
        }
        assert_eq!(sum(&floating_pointer(0x9_e000)), 0);
    }

    #[test]
    fn table_lists_one_enabled_processor_per_vcpu_and_one_boot_processor() {
        let t = config_table(3);
        let count = u16::from_le_bytes([t[34], t[35]]);
        let mut off = HEADER_LEN;
        let (mut cpus, mut bsp, mut seen) = (Vec::new(), 0, 0);
        while off < t.len() {
            seen += 1;
            if t[off] == ENTRY_PROCESSOR {
                cpus.push(t[off + 1]);
                assert_ne!(t[off + 3] & CPU_ENABLED, 0);
                bsp += usize::from(t[off + 3] & CPU_BOOT_PROCESSOR != 0);
                off += PROCESSOR_ENTRY_LEN;
            } else {
                off += 8;
            }
        }
        assert_eq!(off, t.len());
        assert_eq!(seen, count);
        assert_eq!(cpus, vec![0, 1, 2]);
        assert_eq!(bsp, 1);
        assert_eq!(u16::from_le_bytes([t[4], t[5]]) as usize, t.len());
    }

    #[test]
    fn every_isa_irq_including_the_timer_is_an_ordinary_interrupt_on_its_own_pin() {
        let t = config_table(1);
        let mut off = HEADER_LEN + PROCESSOR_ENTRY_LEN;
        let mut routed = Vec::new();
        while off < t.len() {
            if t[off] == ENTRY_IO_INTERRUPT {
                assert_eq!(t[off + 1], INT_TYPE_INT, "IRQ {} is not mp_INT", t[off + 5]);
                assert_eq!(
                    t[off + 5],
                    t[off + 7],
                    "IRQ {} not on its own pin",
                    t[off + 5]
                );
                routed.push(t[off + 5]);
            }
            if t[off] == ENTRY_LOCAL_INTERRUPT && t[off + 7] == 0 {
                assert_eq!(t[off + 1], INT_TYPE_EXTINT, "LINT0 must carry ExtINT");
            }
            off += 8;
        }
        assert_eq!(routed, (0..IOAPIC_PINS).collect::<Vec<u8>>());
    }

    #[test]
    fn largest_table_fits_below_the_floating_pointer() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        setup_mptable(&mem, 254).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MP_FLOATING_POINTER))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
