//! Boot GDT entries and the matching KVM segment descriptors.

use kvm_bindings::kvm_segment;

/// Packs a GDT descriptor from its flags (access byte in bits 0-7, flags nibble in 12-15),
/// base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// 64-bit code: present, ring 0, code exec/read, accessed; L=1, G=1.
pub const CODE64: u16 = 0xa09b;
/// 32-bit code (PVH entry): present, ring 0, exec/read, accessed; D=1, G=1.
pub const CODE32: u16 = 0xc09b;
/// Data: present, ring 0, read/write, accessed; D/B=1, G=1.
pub const DATA: u16 = 0xc093;
/// 64-bit TSS, busy.
pub const TSS: u16 = 0x808b;

/// The four boot descriptors: null, code, data, TSS. Selectors are index * 8.
pub fn boot_gdt(code_flags: u16) -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(code_flags, 0, 0xfffff),
        gdt_entry(DATA, 0, 0xfffff),
        gdt_entry(TSS, 0, 0xfffff),
    ]
}

/// Decodes a descriptor at GDT index `index` into the form KVM wants in `kvm_sregs`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let limit = ((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff);
    let granular = (entry >> 55) & 1;
    kvm_segment {
        base: ((entry & 0xff00_0000_0000_0000) >> 32) | ((entry & 0x0000_00ff_ffff_0000) >> 16),
        // With G set the limit counts 4 KiB pages; KVM wants bytes.
        limit: if granular == 1 {
            ((limit << 12) | 0xfff) as u32
        } else {
            limit as u32
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_descriptor_decodes_to_a_long_mode_segment() {
        let seg = kvm_segment_from_gdt(gdt_entry(CODE64, 0, 0xfffff), 1);
        assert_eq!(seg.selector, 8);
        assert_eq!(
            (seg.l, seg.db, seg.present, seg.s, seg.type_),
            (1, 0, 1, 1, 0xb)
        );
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.base, 0);
    }

    #[test]
    fn descriptor_round_trips_base_and_limit() {
        let seg = kvm_segment_from_gdt(gdt_entry(0x4093, 0x1234_5678, 0xabcde), 2);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.g, 0);
        assert_eq!(seg.db, 1);
    }

    #[test]
    fn null_descriptor_is_unusable() {
        assert_eq!(kvm_segment_from_gdt(0, 0).unusable, 1);
    }
}
