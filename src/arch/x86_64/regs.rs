//! Boot register state and identity-mapped page tables for the boot vCPU.

use crate::vstate::dirty::GuestMemoryMmap;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{self, kvm_segment_from_gdt};
use super::layout::*;
use super::ArchError;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// Linux 64-bit boot protocol: long mode, paging on, RSI = zero page.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh,
}

/// General-purpose registers at the entry point.
pub fn boot_regs(entry: u64, mode: EntryMode) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        EntryMode::Pvh => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// x87 and SSE control words as after FNINIT and reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Writes the GDT (and an empty IDT) for `mode` and, for long mode, the identity page tables;
/// then fills the system registers in `sregs` to match.
pub fn setup_boot_sregs(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    sregs: &mut kvm_sregs,
) -> Result<(), ArchError> {
    let code = match mode {
        EntryMode::Linux64 => gdt::CODE64,
        EntryMode::Pvh => gdt::CODE32,
    };
    let table = gdt::boot_gdt(code);
    for (i, entry) in table.iter().enumerate() {
        let addr = BOOT_GDT_START + (i as u64) * 8;
        mem.write_obj(*entry, GuestAddress(addr))
            .map_err(|source| ArchError::GuestWrite {
                what: "GDT",
                addr,
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|source| ArchError::GuestWrite {
            what: "IDT",
            addr: BOOT_IDT_START,
            source,
        })?;

    let code_seg = kvm_segment_from_gdt(table[1], 1);
    let data_seg = kvm_segment_from_gdt(table[2], 2);
    let tss_seg = kvm_segment_from_gdt(table[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code_seg;
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.fs = data_seg;
    sregs.gs = data_seg;
    sregs.ss = data_seg;
    sregs.tr = tss_seg;

    match mode {
        EntryMode::Linux64 => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// Identity-maps guest-physical 0-4 GiB with 2 MiB pages: one PML4 entry, four PDPT entries,
/// four full page directories. Each table is built here and written whole: 2,053 writes of one
/// entry each through guest memory's bounds checks and dirty bitmap were a tenth of a test
/// guest's user-space start-up.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), ArchError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    const ENTRIES: usize = 512;
    let write = |addr: u64, table: &[u64]| {
        let mut bytes = [0u8; ENTRIES * 8];
        for (chunk, entry) in bytes.chunks_exact_mut(8).zip(table) {
            chunk.copy_from_slice(&entry.to_le_bytes());
        }
        let used = bytes.get(..table.len() * 8).unwrap_or(&bytes);
        mem.write_slice(used, GuestAddress(addr))
            .map_err(|source| ArchError::GuestWrite {
                what: "page tables",
                addr,
                source,
            })
    };
    write(PML4_START, &[PDPT_START | PRESENT_RW])?;
    let mut pdpt = [0u64; BOOT_PD_COUNT as usize];
    for (pd, entry) in (0u64..).zip(pdpt.iter_mut()) {
        *entry = (PD_START + pd * 0x1000) | PRESENT_RW;
    }
    write(PDPT_START, &pdpt)?;
    let mut directory = [0u64; ENTRIES];
    for pd in 0..BOOT_PD_COUNT {
        for (i, entry) in (0u64..).zip(directory.iter_mut()) {
            *entry = (pd << 30) | (i << 21) | PRESENT_RW | PAGE_SIZE_2M;
        }
        write(PD_START + pd * 0x1000, &directory)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn long_mode_sregs_enable_paging_and_point_at_the_tables() {
        let m = mem();
        let mut sregs = kvm_sregs::default();
        setup_boot_sregs(&m, EntryMode::Linux64, &mut sregs).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr0 & CR0_PG, 0);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.cs.selector, 8);
        assert_eq!(sregs.ds.selector, 0x10);
    }

    #[test]
    fn page_tables_identity_map_the_first_four_gib() {
        let m = mem();
        let mut sregs = kvm_sregs::default();
        setup_boot_sregs(&m, EntryMode::Linux64, &mut sregs).unwrap();
        // Walk the tables for a few addresses and check each maps to itself.
        for addr in [
            0u64,
            0x20_0000,
            0x3fff_ffff,
            0x4000_0000,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            let pml4e: u64 = m
                .read_obj(GuestAddress(PML4_START + ((addr >> 39) & 0x1ff) * 8))
                .unwrap();
            let pdpte: u64 = m
                .read_obj(GuestAddress((pml4e & !0xfff) + ((addr >> 30) & 0x1ff) * 8))
                .unwrap();
            let pde: u64 = m
                .read_obj(GuestAddress((pdpte & !0xfff) + ((addr >> 21) & 0x1ff) * 8))
                .unwrap();
            assert_eq!(pde & 0x83, 0x83, "{addr:#x} not a present 2M page");
            assert_eq!((pde & !0x1f_ffff & !0xfff) | (addr & 0x1f_ffff), addr);
        }
    }

    #[test]
    fn pvh_sregs_are_protected_mode_without_paging() {
        let m = mem();
        let mut sregs = kvm_sregs::default();
        setup_boot_sregs(&m, EntryMode::Pvh, &mut sregs).unwrap();
        assert_eq!(sregs.cr0, CR0_PE | CR0_ET);
        assert_eq!(sregs.efer, 0);
        assert_eq!((sregs.cs.l, sregs.cs.db), (0, 1));
        assert_eq!(boot_regs(0x100_0000, EntryMode::Pvh).rbx, PVH_INFO_START);
    }

    #[test]
    fn linux64_entry_points_rsi_at_the_zero_page() {
        let regs = boot_regs(0x100_0000, EntryMode::Linux64);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp),
            (0x100_0000, ZERO_PAGE_START, BOOT_STACK_POINTER)
        );
        assert_eq!(regs.rflags, 2);
    }
}
