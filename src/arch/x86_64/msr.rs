//! MSR values every vCPU starts with, and the MSR ranges a guest may touch.

use kvm_bindings::{kvm_msr_entry, Msrs};

use super::ArchError;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back: without it Linux maps all RAM uncached.
const MTRR_ENABLE_WRITE_BACK: u64 = (1 << 11) | 6;

/// The MSR index ranges (base, count) a guest may read and write; KVM handles them as usual
/// (emulating them or answering #GP itself). Everything outside is reported to user space,
/// where bulkhead answers #GP and counts the probe. The ranges are the architectural ones a
/// kernel uses: Intel's low range (x2APIC included), the AMD64 and AMD model-specific ranges,
/// and KVM's paravirtual MSRs. Hyper-V's synthetic MSRs are left out: bulkhead does not
/// advertise Hyper-V.
pub const ALLOWED_MSR_RANGES: [(u32, u32); 4] = [
    (0x0000_0000, 0x3000),
    (0xc000_0000, 0x3000),
    (0xc001_0000, 0x3000),
    (0x4b56_4d00, 0x100),
];

/// True when `index` lies in one of [`ALLOWED_MSR_RANGES`].
pub fn msr_allowed(index: u32) -> bool {
    ALLOWED_MSR_RANGES
        .iter()
        .any(|&(base, count)| index >= base && index - base < count)
}

/// The boot MSRs: syscall entry points cleared, TSC at zero, fast strings, write-back memory.
pub fn boot_msrs() -> Result<Msrs, ArchError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITE_BACK),
    ])
    .map_err(|_| ArchError::FamList("MSR"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_enable_write_back_mtrrs() {
        let msrs = boot_msrs().unwrap();
        let mtrr = msrs
            .as_slice()
            .iter()
            .find(|e| e.index == MSR_MTRR_DEF_TYPE)
            .unwrap();
        assert_eq!(mtrr.data & 0xff, 6);
        assert_ne!(mtrr.data & (1 << 11), 0);
    }

    #[test]
    fn the_allow_list_keeps_the_architectural_msrs_and_every_boot_msr() {
        for index in [0x10, 0x1b, 0x830, 0xc000_0080, 0xc001_0015, 0x4b56_4d01] {
            assert!(msr_allowed(index), "{index:#x}");
        }
        for e in boot_msrs().unwrap().as_slice() {
            assert!(msr_allowed(e.index), "{:#x}", e.index);
        }
        for index in [0x3000, 0x4000_0000, 0x1234_5678, 0xc000_3000, 0xffff_ffff] {
            assert!(!msr_allowed(index), "{index:#x}");
        }
        // Each range fits KVM's largest filter bitmap (0x600 bytes).
        assert!(ALLOWED_MSR_RANGES.iter().all(|&(_, n)| n <= 0x600 * 8));
    }
}
