//! What an honest guest touches that bulkhead has no device behind: the ports Linux was
//! measured touching while it boots and works (the project's 6.1 kernel as vmlinux and
//! bzImage, with and without ACPI, and Debian's 6.1 cloud kernel; one and two vCPUs, with
//! disks, network, vsock and entropy in use; docs/detection.md has the method and figures).
//! Such an access is answered like any unhandled one and counted in the metrics, but it is not
//! a probe: it feeds neither `legacy_device_probe` nor `pio_scan`. Everything else is judged
//! from the VM's first exit, whatever the guest has or has not said.
//!
//! No guest-physical range is on the list: no measured boot touched unmapped memory. Nor are
//! MSRs: the filter's allow-list (`arch::x86_64::msr`) already holds every MSR they used.

/// One range of ports, inclusive, and why an honest guest touches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    pub lo: u16,
    pub hi: u16,
    /// Accesses per VM that are expected; those past it are judged as probes. None: any
    /// number (the range leads to nothing a probe could find).
    pub budget: Option<u32>,
    /// Who touches it, and why that is harmless.
    pub why: &'static str,
}

const fn any(lo: u16, hi: u16, why: &'static str) -> Expected {
    Expected {
        lo,
        hi,
        budget: None,
        why,
    }
}

/// Ports an honest guest reads or writes without a device behind them.
pub const PORTS: &[Expected] = &[
    any(
        0x70,
        0x71,
        "CMOS: Linux writes the shutdown byte (index 0x0f, the warm-reset vector) when it starts application processors; bulkhead has no CMOS",
    ),
    any(
        0x87,
        0x87,
        "ISA DMA page register 0: Linux's i8237 driver reads it once, finds all-ones and knows there is no DMA controller",
    ),
    any(
        0x2e8,
        0x2ef,
        "COM4: the 8250 driver probes the legacy serial ports it was built for (Debian's kernel: four); bulkhead has COM1 only",
    ),
    any(0x2f8, 0x2ff, "COM2: the 8250 driver's probe, as for COM4"),
    any(0x3e8, 0x3ef, "COM3: the 8250 driver's probe, as for COM4"),
    Expected {
        lo: 0xcf8,
        hi: 0xcff,
        budget: Some(16),
        why: "PCI configuration mechanism #1: early x86 code (quirks, the AMD aperture check) reads bus 0's configuration even with pci=off, at most 8 accesses measured; more is a walk of the bus, judged as a probe",
    },
];

/// Where `port` is on [`PORTS`], if it is.
pub fn port(port: u16) -> Option<usize> {
    PORTS.iter().position(|e| (e.lo..=e.hi).contains(&port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::vocabulary::legacy_device;

    #[test]
    fn ranges_are_ordered_and_apart_and_only_pci_configuration_is_a_legacy_device() {
        for pair in PORTS.windows(2) {
            assert!(pair[0].hi < pair[1].lo, "{pair:?}");
        }
        for e in PORTS {
            assert!(e.lo <= e.hi);
            // The floppy, IDE, DMA controller and the rest stay probes from the first access.
            let legacy: Vec<_> = (e.lo..=e.hi).filter_map(legacy_device).collect();
            assert!(
                legacy.is_empty() || e.budget.is_some(),
                "{e:?} would hide {legacy:?}"
            );
        }
        assert_eq!(port(0x3f4), None);
        assert_eq!(port(0x1f7), None);
        assert_eq!(port(0x4000), None);
        assert_eq!(port(0xcfc).map(|i| PORTS[i].budget), Some(Some(16)));
    }
}
