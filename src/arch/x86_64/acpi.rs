//! ACPI tables: how a kernel without MP-table parsing or command-line virtio devices (every
//! distribution kernel) finds the vCPUs, the IOAPIC, the devices and the power controls.
//!
//! The board is hardware-reduced (no PM1 blocks, GPEs, SCI or legacy PIC): the FADT names a
//! sleep control and status register pair and a reset register, the MADT lists one local APIC
//! per vCPU and the IOAPIC, and the DSDT describes every device with its ports or memory
//! window and its interrupt, plus `\_S5` so the kernel knows how to power off. The tables
//! themselves come from rust-vmm's `acpi_tables`; this file decides what goes in them and
//! where they live: the RSDP at 0xE0000, where Linux scans for it, the rest right after it.

use crate::vstate::dirty::GuestMemoryMmap;
use acpi_tables::aml::{
    Arg, Device, EISAName, Equal, If, Interrupt, Memory32Fixed, Method, Name, Notify, Package,
    Path, ResourceTemplate, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    ACPI_RSDP_START, ACPI_TABLES_END, ACPI_TABLES_START, APIC_START, IOAPIC_START,
};
use super::mptable::apic_id;
use super::ArchError;

const OEM_ID: [u8; 6] = *b"BLKHD ";
const OEM_REVISION: u32 = 1;
/// IAPC_BOOT_ARCH: an 8042 is present (bit 1), no VGA (bit 2), no CMOS RTC (bit 5).
const IAPC_8042: u16 = 1 << 1;
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;
/// Tables start on this boundary.
const TABLE_ALIGN: u64 = 16;

/// A device on I/O ports with one interrupt line.
#[derive(Debug, Clone, Copy)]
pub struct PortDevice {
    pub base: u16,
    pub len: u8,
    pub gsi: u32,
}

/// The power registers the FADT points at, all one-byte I/O ports.
#[derive(Debug, Clone, Copy)]
pub struct PowerRegisters {
    pub sleep_control: u16,
    pub sleep_status: u16,
    pub reset: u16,
    pub reset_value: u8,
    /// The SLP_TYP value `\_S5` declares, which the sleep control register then receives.
    pub s5_sleep_type: u8,
}

/// A virtio-mmio device's register window and interrupt.
#[derive(Debug, Clone, Copy)]
pub struct VirtioMmio {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

impl VirtioMmio {
    /// The device as a `virtio_mmio.device=` command-line entry, for kernels without ACPI.
    pub fn cmdline_entry(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.size >> 10,
            self.base,
            self.gsi
        )
    }
}

/// Everything the tables describe.
#[derive(Debug, Clone)]
pub struct Board {
    pub vcpus: u32,
    pub serial: PortDevice,
    /// The i8042's data and command ports, and its interrupt.
    pub i8042: (u16, u16, u32),
    pub pvpanic_port: u16,
    pub power: PowerRegisters,
    pub virtio: Vec<VirtioMmio>,
    /// The VM generation ID's address, and the Generic Event Device interrupt that announces
    /// a new one.
    pub vmgenid: Option<(u64, u32)>,
}

/// The tables and where each goes in guest memory.
#[derive(Debug)]
pub struct Tables {
    /// (guest address, bytes), RSDP first.
    pub placed: Vec<(u64, Vec<u8>)>,
}

impl Tables {
    /// Builds the tables for `board`: DSDT, FADT, MADT and XSDT from ACPI_TABLES_START on,
    /// and the RSDP at ACPI_RSDP_START.
    pub fn build(board: &Board) -> Result<Tables, ArchError> {
        let mut next = ACPI_TABLES_START;
        let mut placed = Vec::new();
        let mut place = |bytes: Vec<u8>| -> Result<u64, ArchError> {
            let addr = next;
            let end = addr + bytes.len() as u64;
            if end > ACPI_TABLES_END {
                return Err(ArchError::AcpiTooBig(ACPI_TABLES_END - ACPI_TABLES_START));
            }
            next = end.next_multiple_of(TABLE_ALIGN);
            placed.push((addr, bytes));
            Ok(addr)
        };
        let dsdt = place(dsdt(board)?)?;
        let fadt = place(bytes_of(&fadt(board, dsdt)))?;
        let madt = place(bytes_of(&madt(board.vcpus)))?;
        let mut xsdt = XSDT::new(OEM_ID, *b"BLKHXSDT", OEM_REVISION);
        // The DSDT is found through the FADT, never listed here.
        xsdt.add_entry(fadt);
        xsdt.add_entry(madt);
        let xsdt = place(bytes_of(&xsdt))?;
        placed.insert(0, (ACPI_RSDP_START, bytes_of(&Rsdp::new(OEM_ID, xsdt))));
        Ok(Tables { placed })
    }

    /// Writes every table; returns the RSDP's address, for the boot protocol to pass on.
    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<u64, ArchError> {
        for (addr, bytes) in &self.placed {
            mem.write_slice(bytes, GuestAddress(*addr))
                .map_err(|source| ArchError::GuestWrite {
                    what: "ACPI table",
                    addr: *addr,
                    source,
                })?;
        }
        Ok(ACPI_RSDP_START)
    }
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Hardware-reduced FADT: the DSDT, the reset register and the sleep registers.
fn fadt(board: &Board, dsdt: u64) -> acpi_tables::fadt::FADT {
    let port = |address: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(address),
        )
    };
    let mut fadt = FADTBuilder::new(OEM_ID, *b"BLKHFACP", OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No power or sleep button devices.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = (IAPC_8042 | IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    fadt.reset_reg = port(board.power.reset);
    fadt.reset_value = board.power.reset_value;
    fadt.sleep_control_reg = port(board.power.sleep_control);
    fadt.sleep_status_reg = port(board.power.sleep_status);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"BULKHEAD").into();
    fadt.finalize()
}

/// One enabled local APIC per vCPU (ids as in the MP table), and the IOAPIC.
fn madt(vcpus: u32) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        *b"BLKHAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for cpu in 0..vcpus {
        let id = apic_id(cpu);
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    // KVM's default routing sends GSI n to IOAPIC pin n, so no interrupt source overrides.
    madt.add_structure(IoApic::new(apic_id(vcpus), IOAPIC_START as u32, 0));
    madt
}

/// The DSDT: the serial port, the i8042, the pvpanic port, each virtio-mmio device, and
/// `\_S5` (power off).
fn dsdt(board: &Board) -> Result<Vec<u8>, ArchError> {
    // Interrupts are edge-triggered and active high, as irqfd raises them.
    let irq = |gsi| Interrupt::new(true, true, false, false, gsi);
    let mut body = Vec::new();
    let s = board.serial;
    Device::new(
        Path::new("_SB_.COM1"),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &0u8),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&IO::new(s.base, s.base, 1, s.len), &irq(s.gsi)]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    let (data, command, gsi) = board.i8042;
    Device::new(
        Path::new("_SB_.PS2_"),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0303")),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &IO::new(data, data, 1, 1),
                    &IO::new(command, command, 1, 1),
                    &irq(gsi),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    let p = board.pvpanic_port;
    Device::new(
        Path::new("_SB_.PEVT"),
        vec![
            &Name::new("_HID".into(), &"QEMU0001"),
            &Name::new("_UID".into(), &0u8),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&IO::new(p, p, 1, 1)]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    for (index, dev) in board.virtio.iter().enumerate() {
        // Four-character names: V000 to V999.
        if index > 999 {
            return Err(ArchError::AcpiTooManyDevices(board.virtio.len()));
        }
        let window = |v: u64| u32::try_from(v).map_err(|_| ArchError::AcpiAddress(dev.base));
        let (base, size) = (window(dev.base)?, window(dev.size)?);
        let uid = u32::try_from(index).unwrap_or(u32::MAX);
        Device::new(
            Path::new(&format!("_SB_.V{index:03}")),
            vec![
                &Name::new("_HID".into(), &"LNRO0005"),
                &Name::new("_UID".into(), &uid),
                &Name::new(
                    "_CRS".into(),
                    &ResourceTemplate::new(vec![
                        &Memory32Fixed::new(true, base, size),
                        &irq(dev.gsi),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut body);
    }
    if let Some((addr, gsi)) = board.vmgenid {
        vmgenid(addr, gsi, &mut body);
    }
    // Only SLP_TYPa is read on a hardware-reduced board.
    Name::new(
        "_S5_".into(),
        &Package::new(vec![&board.power.s5_sleep_type]),
    )
    .to_aml_bytes(&mut body);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"BLKHDSDT", OEM_REVISION);
    dsdt.append_slice(&body);
    Ok(dsdt.as_slice().to_vec())
}

/// The VM generation ID device (what Linux's vmgenid driver binds: `ADDR` is the ID's address
/// as two 32-bit halves) and the Generic Event Device whose interrupt `gsi` tells the guest
/// to look at it again (hardware-reduced ACPI has no GPEs to do it).
fn vmgenid(addr: u64, gsi: u32, body: &mut Vec<u8>) {
    let (low, high) = (addr as u32, (addr >> 32) as u32);
    Device::new(
        Path::new("_SB_.VGEN"),
        vec![
            &Name::new("_HID".into(), &"VMGENCTR"),
            &Name::new("_CID".into(), &"VM_Gen_Counter"),
            &Name::new("_DDN".into(), &"VM_Gen_Counter"),
            &Name::new("ADDR".into(), &Package::new(vec![&low, &high])),
        ],
    )
    .to_aml_bytes(body);
    let vgen = Path::new("\\_SB_.VGEN");
    let notify = Notify::new(&vgen, &0x80u8);
    let is_ours = Equal::new(&Arg(0), &gsi);
    let on_ours = If::new(&is_ours, vec![&notify]);
    Device::new(
        Path::new("_SB_.GED_"),
        vec![
            &Name::new("_HID".into(), &"ACPI0013"),
            &Name::new("_UID".into(), &0u8),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&Interrupt::new(true, true, false, false, gsi)]),
            ),
            &Method::new("_EVT".into(), 1, true, vec![&on_ours]),
        ],
    )
    .to_aml_bytes(body);
}

#[cfg(test)]
#[path = "acpi_tests.rs"]
mod tests;
