use super::*;
use crate::arch::x86_64::layout::HIMEM_START;

fn board(vcpus: u32, devices: usize) -> Board {
    Board {
        vcpus,
        serial: PortDevice {
            base: 0x3f8,
            len: 8,
            gsi: 4,
        },
        i8042: (0x60, 0x64, 1),
        pvpanic_port: 0x505,
        power: PowerRegisters {
            sleep_control: 0x600,
            sleep_status: 0x601,
            reset: 0x602,
            reset_value: 1,
            s5_sleep_type: 5,
        },
        virtio: (0..devices as u64)
            .map(|i| VirtioMmio {
                base: 0xd000_0000 + i * 0x1000,
                size: 0x1000,
                gsi: 5 + i as u32,
            })
            .collect(),
        vmgenid: Some((0xd_f000, 3)),
    }
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// The table placed at `addr`.
fn at(t: &Tables, addr: u64) -> &[u8] {
    &t.placed
        .iter()
        .find(|(a, _)| *a == addr)
        .unwrap_or_else(|| panic!("no table at {addr:#x}"))
        .1
}

/// Follows RSDP -> XSDT -> (FADT -> DSDT, MADT) as a kernel does.
fn walk(t: &Tables) -> (&[u8], &[u8], &[u8], &[u8]) {
    let rsdp = at(t, ACPI_RSDP_START);
    let xsdt = at(t, u64_at(rsdp, 24));
    assert_eq!(&xsdt[..4], b"XSDT");
    let entries: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|o| u64_at(xsdt, o))
        .collect();
    assert_eq!(entries.len(), 2, "XSDT lists FADT and MADT only");
    let fadt = at(t, entries[0]);
    let madt = at(t, entries[1]);
    assert_eq!(&fadt[..4], b"FACP");
    assert_eq!(&madt[..4], b"APIC");
    // X_DSDT at offset 140.
    let dsdt = at(t, u64_at(fadt, 140));
    assert_eq!(&dsdt[..4], b"DSDT");
    (xsdt, fadt, madt, dsdt)
}

#[test]
fn every_table_has_a_valid_checksum_and_its_true_length() {
    let t = Tables::build(&board(2, 4)).unwrap();
    let rsdp = at(&t, ACPI_RSDP_START);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
    assert_eq!(u32_at(rsdp, 20), 36);
    assert_eq!(sum(&rsdp[..36]), 0, "RSDP extended checksum");
    let (xsdt, fadt, madt, dsdt) = walk(&t);
    for table in [xsdt, fadt, madt, dsdt] {
        let name = String::from_utf8_lossy(&table[..4]).into_owned();
        assert_eq!(u32_at(table, 4) as usize, table.len(), "{name} length");
        assert_eq!(sum(table), 0, "{name} checksum");
    }
}

#[test]
fn the_madt_lists_exactly_the_configured_vcpus_and_the_ioapic() {
    for vcpus in [1u32, 2, 7, 254] {
        let t = Tables::build(&board(vcpus, 1)).unwrap();
        let (_, _, madt, _) = walk(&t);
        assert_eq!(u32_at(madt, 36), APIC_START as u32);
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            assert!(len >= 2, "a zero-length MADT entry");
            match kind {
                0 => lapics.push((madt[off + 2], madt[off + 3], u32_at(madt, off + 4))),
                1 => ioapics.push((u32_at(madt, off + 4), u32_at(madt, off + 8))),
                other => panic!("unexpected MADT entry type {other}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(lapics.len(), vcpus as usize);
        for (i, &(uid, id, flags)) in lapics.iter().enumerate() {
            assert_eq!((uid, id), (i as u8, i as u8));
            assert_eq!(flags, 1, "vCPU {i} enabled");
        }
        assert_eq!(ioapics, vec![(IOAPIC_START as u32, 0)]);
    }
}

#[test]
fn the_fadt_is_hardware_reduced_with_reset_and_sleep_registers() {
    let t = Tables::build(&board(1, 0)).unwrap();
    let (_, fadt, _, _) = walk(&t);
    assert_eq!(fadt.len(), 276);
    let flags = u32_at(fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    // Generic addresses: space id, width, offset, access size, then the address.
    let gas = |off: usize| (fadt[off], fadt[off + 1], u64_at(fadt, off + 4));
    assert_eq!(gas(116), (1, 8, 0x602), "reset register");
    assert_eq!(fadt[128], 1, "reset value");
    assert_eq!(gas(244), (1, 8, 0x600), "sleep control");
    assert_eq!(gas(256), (1, 8, 0x601), "sleep status");
    let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
    assert_eq!(boot_arch, IAPC_8042 | IAPC_NO_VGA | IAPC_NO_CMOS_RTC);
}

#[test]
fn the_dsdt_names_every_device_and_how_to_power_off() {
    let count =
        |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).filter(|w| w == &needle).count();
    for devices in [0, 1, 5] {
        let t = Tables::build(&board(1, devices)).unwrap();
        let (_, _, _, dsdt) = walk(&t);
        assert_eq!(count(dsdt, b"LNRO0005\0"), devices);
        assert_eq!(count(dsdt, b"QEMU0001\0"), 1);
        assert_eq!(count(dsdt, b"_S5_"), 1);
        // The VM generation ID, and the event device that tells the guest it changed.
        assert_eq!(count(dsdt, b"VMGENCTR\0"), 1);
        assert_eq!(count(dsdt, b"VM_Gen_Counter\0"), 2);
        assert_eq!(count(dsdt, b"ACPI0013\0"), 1);
        assert_eq!(count(dsdt, b"_EVT"), 1);
        // ADDR: a package of the two halves of 0xdf000 (a DWord then a Zero).
        assert_eq!(count(dsdt, &[0x0c, 0x00, 0xf0, 0x0d, 0x00, 0x00]), 1);
        for i in 0..devices {
            assert_eq!(count(dsdt, format!("V{i:03}").as_bytes()), 1);
            // Memory32Fixed: descriptor 0x86, length 9, read-write, base, size.
            let mut window = vec![0x86, 0x09, 0x00, 0x01];
            window.extend_from_slice(&(0xd000_0000u32 + i as u32 * 0x1000).to_le_bytes());
            window.extend_from_slice(&0x1000u32.to_le_bytes());
            assert_eq!(count(dsdt, &window), 1, "device {i}'s window");
        }
    }
}

#[test]
fn tables_stay_in_their_area_and_the_rsdp_is_where_linux_scans() {
    let t = Tables::build(&board(254, 19)).unwrap();
    for (addr, bytes) in &t.placed {
        assert!(*addr >= ACPI_RSDP_START);
        assert!(addr + bytes.len() as u64 <= ACPI_TABLES_END);
    }
    const { assert!(ACPI_TABLES_END <= HIMEM_START && ACPI_RSDP_START % 16 == 0) };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), HIMEM_START as usize)]).unwrap();
    assert_eq!(t.write(&mem).unwrap(), ACPI_RSDP_START);
    let found = (0xe_0000..0x10_0000u64).step_by(16).find(|&a| {
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(a)).unwrap();
        &sig == b"RSD PTR "
    });
    assert_eq!(found, Some(ACPI_RSDP_START));
}

#[test]
fn a_device_on_the_command_line_reads_as_linux_expects() {
    let dev = VirtioMmio {
        base: 0xd000_1000,
        size: 0x1000,
        gsi: 6,
    };
    assert_eq!(dev.cmdline_entry(), "virtio_mmio.device=4K@0xd0001000:6");
}
