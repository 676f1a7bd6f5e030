//! Where things live in guest-physical memory.
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_9000  PML4, then PDPT and 4 PDs (to 0xe000)
//! 0x0000_0520  IDT (empty)              0x0002_0000  kernel command line
//! 0x0000_6000  PVH start info + tables  0x0009_e000  MP configuration table (reserved to 1 MiB)
//! 0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack top           0x0009_fc00  MP floating pointer (last KiB of base memory)
//!                                       0x000e_0000  ACPI RSDP, then the other ACPI tables
//!                                       0x000f_fff0  reset vector (a kernel restarting via BIOS)
//!                                       0x0010_0000  kernel (1 MiB); initrd at the top of low RAM
//! 0xc000_0000 - 0x1_0000_0000  MMIO gap (IOAPIC, LAPIC, devices); RAM resumes at 4 GiB
//! ```

/// GDT for the boot vCPU.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: any exception before the kernel installs its own triple-faults.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Most PVH memory map entries that fit before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 0xf80 / 24;
/// Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-map page tables.
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// How many 1 GiB page directories the boot page tables hold (identity map of 0-4 GiB).
pub const BOOT_PD_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Room for the command line, NUL included (Linux's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// MP configuration table: room for 254 processor entries.
pub const MPTABLE_START: u64 = 0x9_e000;
/// MP floating pointer: Linux scans the last KiB of base memory for it.
pub const MP_FLOATING_POINTER: u64 = 0x9_fc00;
/// ACPI: the RSDP where Linux scans for one (0xE0000 to 0xFFFFF, on 16-byte boundaries), the
/// other tables after it, up to the reset vector.
pub const ACPI_RSDP_START: u64 = 0xe_0000;
pub const ACPI_TABLES_START: u64 = 0xe_0040;
pub const ACPI_TABLES_END: u64 = RESET_VECTOR;
/// Where a CPU starts after reset (F000:FFF0): Linux jumps here to restart through the BIOS
/// (`reboot=b`, and what an EFI-enabled kernel falls back to on a hardware-reduced ACPI machine
/// when its command line has no `reboot=`).
pub const RESET_VECTOR: u64 = 0xf_fff0;
/// The VM generation ID (16 bytes, ACPI `VMGENCTR`), in the reserved legacy hole below the
/// ACPI tables: a restored clone gets a new one, and Linux reseeds its RNG on the change.
pub const VMGENID_START: u64 = 0xd_f000;
/// Base memory ends here: the MP table, then the legacy VGA/BIOS hole up to 1 MiB, are
/// reserved.
pub const EBDA_START: u64 = MPTABLE_START;
/// Where the kernel (and any ELF below the high-memory line) must load.
pub const HIMEM_START: u64 = 0x10_0000;
/// 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;
/// IOAPIC and local APIC, inside the gap.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS and identity-map pages (needed on Intel hosts), inside the gap.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Number of IOAPIC pins (and so legacy GSIs) the in-kernel irqchip has.
pub const IOAPIC_PINS: u8 = 24;
/// Virtio-mmio devices: one 4 KiB register block each, from here up, inside the MMIO gap.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// Device n raises IRQ 5 + n (IOAPIC pins 5 to 23; the legacy devices use 1 and 4).
pub const VIRTIO_IRQ_BASE: u32 = 5;

/// The guest RAM regions for `mem_bytes` of RAM: below the MMIO gap, then above 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// One e820/PVH memory map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: MemoryKind,
}

/// The e820 types bulkhead reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    Ram = 1,
    Reserved = 2,
}

/// The memory map the guest sees: base memory, the legacy hole as reserved, RAM above 1 MiB
/// up to the gap, and RAM above 4 GiB.
pub fn memory_map(mem_bytes: u64) -> Vec<MemoryMapEntry> {
    let mut map = vec![
        MemoryMapEntry {
            addr: 0,
            size: EBDA_START,
            kind: MemoryKind::Ram,
        },
        MemoryMapEntry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: MemoryKind::Reserved,
        },
    ];
    for (start, size) in ram_regions(mem_bytes) {
        let start_hi = start.max(HIMEM_START);
        let end = start + size;
        if end > start_hi {
            map.push(MemoryMapEntry {
                addr: start_hi,
                size: end - start_hi,
                kind: MemoryKind::Ram,
            });
        }
    }
    map
}

/// End of the RAM below the gap (exclusive).
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_region_from_zero() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
    }

    #[test]
    fn large_ram_is_split_around_the_mmio_gap() {
        let mem = 4u64 << 30;
        let regions = ram_regions(mem);
        assert_eq!(
            regions,
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem - MMIO_GAP_START)]
        );
        assert_eq!(regions.iter().map(|r| r.1).sum::<u64>(), mem);
        assert!(regions
            .iter()
            .all(|&(s, l)| s + l <= MMIO_GAP_START || s >= MMIO_GAP_END));
    }

    #[test]
    fn memory_map_covers_ram_and_reserves_the_legacy_hole() {
        let map = memory_map(64 << 20);
        assert_eq!(
            map[0],
            MemoryMapEntry {
                addr: 0,
                size: EBDA_START,
                kind: MemoryKind::Ram
            }
        );
        assert_eq!(map[1].kind, MemoryKind::Reserved);
        assert_eq!(
            map[2],
            MemoryMapEntry {
                addr: HIMEM_START,
                size: (64 << 20) - HIMEM_START,
                kind: MemoryKind::Ram
            }
        );
        let big = memory_map(5 << 30);
        assert_eq!(big.last().map(|e| e.addr), Some(MMIO_GAP_END));
    }

    #[test]
    fn fixed_boot_structures_do_not_overlap() {
        let mut areas = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 0x8),
            (PVH_INFO_START, 0x1000),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPT_START, 0x1000),
            (PD_START, BOOT_PD_COUNT * 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, MP_FLOATING_POINTER - MPTABLE_START),
            (MP_FLOATING_POINTER, 16),
            (ACPI_RSDP_START, ACPI_TABLES_START - ACPI_RSDP_START),
            (ACPI_TABLES_START, ACPI_TABLES_END - ACPI_TABLES_START),
            (RESET_VECTOR, HIMEM_START - RESET_VECTOR),
        ];
        areas.sort_unstable();
        for w in areas.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:#x?} overlaps {:#x?}",
                w[0],
                w[1]
            );
        }
        const {
            assert!(
                BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000 && BOOT_STACK_POINTER < PML4_START
            )
        };
        const { assert!(PVH_MEMMAP_START + 24 * PVH_MEMMAP_MAX_ENTRIES as u64 <= ZERO_PAGE_START) };
    }
}
