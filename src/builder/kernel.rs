//! Booting from a kernel: load it (and the initrd), write the command line and boot tables, and
//! make the vCPUs ready at its entry point.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use super::{board, BuildError};
use crate::arch::x86_64::acpi::{self, VirtioMmio};
use crate::arch::x86_64::{mptable, reset_vector};
use crate::boot::{self, BootFile};
use crate::config::VmConfig;
use crate::devices::legacy;
use crate::vstate::vcpu::{BootEntry, Vcpu};
use crate::vstate::vm::Vm;

/// Random bits for the kernel's KASLR base when bulkhead unpacks it. getrandom failing (it
/// does not, once the host's pool is ready) leaves 0: the link-time base, as with `nokaslr`.
fn kaslr_random() -> u64 {
    let mut bytes = [0u8; 8];
    match crate::devices::virtio::rng::getrandom(&mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(e) => {
            log::warn!("no random bits for the guest kernel's KASLR base: {e}");
            0
        }
    }
}

/// Loads the kernel and initrd into `vm`'s memory, writes the command line (announcing the
/// virtio `windows` when asked), the ACPI tables, MP table and reset vector, and makes the vCPUs,
/// the first at the kernel's entry point. `supported_cpuid` is KVM's, when the supervisor had
/// it; else KVM is asked here.
pub(super) fn boot(
    config: &VmConfig,
    kvm: &Kvm,
    supported_cpuid: Option<CpuId>,
    vm: &Vm,
    windows: &[VirtioMmio],
    kernel_file: &mut BootFile,
    initrd_file: Option<&mut BootFile>,
) -> Result<Vec<Vcpu>, BuildError> {
    let mem = vm.memory();
    let kaslr = boot::kaslr_wanted(&config.vm.cmdline).then_some(kaslr_random as fn() -> u64);
    let initrd_size = initrd_file
        .as_ref()
        .and_then(|f| f.file.metadata().ok())
        .map(|m| m.len());
    let kernel = boot::load_kernel(mem, kernel_file, kaslr, initrd_size)?;
    let initrd = match initrd_file {
        Some(file) => Some(boot::load_initrd(
            mem,
            file,
            config.vm.mem_bytes(),
            &kernel,
        )?),
        None => None,
    };
    let announced: Vec<String> = if config.vm.cmdline_devices {
        windows.iter().map(VirtioMmio::cmdline_entry).collect()
    } else {
        Vec::new()
    };
    let cmdline = boot::build_cmdline(&config.vm.cmdline, &announced)?;
    let rsdp = if config.vm.acpi {
        Some(acpi::Tables::build(&board(config.vm.vcpus, windows))?.write(mem)?)
    } else {
        None
    };
    boot::write_boot_info(
        mem,
        config.vm.mem_bytes(),
        &kernel,
        initrd.as_ref(),
        &cmdline,
        rsdp,
    )?;
    mptable::setup_mptable(mem, config.vm.vcpus)?;
    reset_vector::write(mem, legacy::I8042_COMMAND_PORT, legacy::I8042_PULSE_RESET)?;

    let supported_cpuid = match supported_cpuid {
        Some(cpuid) => cpuid,
        None => kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(BuildError::Cpuid)?,
    };
    let mut vcpus = Vec::new();
    for index in 0..config.vm.vcpus {
        let vcpu = Vcpu::new(vm, index)?;
        let boot = (index == 0).then_some(BootEntry {
            entry: kernel.entry,
            mode: kernel.mode,
        });
        vcpu.configure(&supported_cpuid, config.vm.vcpus, mem, boot)?;
        vcpus.push(vcpu);
    }
    log::debug!(
        "built VM {} for tenant {}: {} vCPU(s), {} MiB, kernel entry {:#x} ({:?})",
        config.process.vm_id,
        config.process.tenant,
        config.vm.vcpus,
        config.vm.mem_mib,
        kernel.entry,
        kernel.mode
    );
    Ok(vcpus)
}
