//! Per-vCPU CPUID: KVM's supported set, with nested virtualization hidden, the hypervisor bit
//! set, and the topology (APIC id, CPU counts) made true for this VM.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use super::mptable::apic_id;

const LEAF1_ECX_VMX: u32 = 1 << 5;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const EXT1_ECX_SVM: u32 = 1 << 2;
const LEAF_SVM_FEATURES: u32 = 0x8000_000a;

/// Bits needed to number `n` items (ceil(log2(n))).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts `cpuid` (a copy of KVM's supported set) for vCPU `index` of `vcpus`.
pub fn filter_cpuid(cpuid: &mut CpuId, index: u32, vcpus: u32) {
    let apic = u32::from(apic_id(index));
    for entry in cpuid.as_mut_slice() {
        filter_entry(entry, apic, vcpus);
    }
}

fn filter_entry(entry: &mut kvm_cpuid_entry2, apic: u32, vcpus: u32) {
    match entry.function {
        0x1 => {
            entry.ecx &= !LEAF1_ECX_VMX;
            entry.ecx |= LEAF1_ECX_HYPERVISOR;
            // APIC id, logical processor count, CLFLUSH line size in qwords.
            entry.ebx = (apic << 24) | ((vcpus & 0xff) << 16) | (8 << 8);
            if vcpus > 1 {
                entry.edx |= LEAF1_EDX_HTT;
            } else {
                entry.edx &= !LEAF1_EDX_HTT;
            }
        }
        0x4 => {
            // Cores per package, and which caches they share: L1/L2 per core, L3 by all.
            let cache_level = (entry.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 {
                vcpus.saturating_sub(1)
            } else {
                0
            };
            entry.eax =
                (entry.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((vcpus - 1) & 0x3f) << 26);
        }
        0xb | 0x1f => {
            // One thread per core, `vcpus` cores in one package.
            let (shift, count, level_type) = match entry.index {
                0 => (0, 1, 1),
                1 => (bits_for(vcpus), vcpus, 2),
                _ => (0, 0, 0),
            };
            entry.eax = shift;
            entry.ebx = count;
            entry.ecx = (level_type << 8) | (entry.index & 0xff);
            entry.edx = apic;
        }
        0x8000_0001 => entry.ecx &= !EXT1_ECX_SVM,
        0x8000_0008 => {
            entry.ecx = (entry.ecx & !0xf0ff) | (bits_for(vcpus) << 12) | ((vcpus - 1) & 0xff);
        }
        LEAF_SVM_FEATURES => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        0x8000_001e => {
            entry.eax = apic;
            entry.ebx = apic & 0xff;
            entry.ecx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn filtered(entries: &[kvm_cpuid_entry2], index: u32, vcpus: u32) -> Vec<kvm_cpuid_entry2> {
        let mut cpuid = CpuId::from_entries(entries).unwrap();
        filter_cpuid(&mut cpuid, index, vcpus);
        cpuid.as_slice().to_vec()
    }

    #[test]
    fn nested_virtualization_is_hidden() {
        let out = filtered(
            &[
                entry(1, 0),
                entry(0x8000_0001, 0),
                entry(LEAF_SVM_FEATURES, 0),
            ],
            0,
            1,
        );
        assert_eq!(out[0].ecx & LEAF1_ECX_VMX, 0);
        assert_ne!(out[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(out[1].ecx & EXT1_ECX_SVM, 0);
        assert_eq!(
            (out[2].eax, out[2].ebx, out[2].ecx, out[2].edx),
            (0, 0, 0, 0)
        );
    }

    #[test]
    fn each_vcpu_sees_its_own_apic_id_and_the_vcpu_count() {
        for (index, vcpus) in [(0, 1), (1, 2), (3, 4)] {
            let out = filtered(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1)], index, vcpus);
            assert_eq!(out[0].ebx >> 24, index);
            assert_eq!((out[0].ebx >> 16) & 0xff, vcpus);
            assert_eq!(out[1].edx, index);
            assert_eq!(out[2].ebx, vcpus);
            assert_eq!(out[2].ecx >> 8, 2);
        }
    }

    #[test]
    fn bits_for_counts_are_ceil_log2() {
        assert_eq!([1, 2, 3, 4, 5, 254].map(bits_for), [0, 1, 2, 2, 3, 8]);
    }
}
