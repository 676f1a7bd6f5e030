//! Linux under bulkhead's ACPI tables, in the nested lane: it finds every vCPU and device
//! through ACPI alone (and, with acpi=off, through the MP table and the command line), and
//! its power-off, reboot and panic end the VM with their documented statuses.

mod common;

use common::lane::{lane_available, lane_script, LANE};

/// Run inside L1: $1 bulkhead, $2 kernel (vmlinux), $3 initramfs, then $5 a disk. Three boots
/// of a 2-vCPU guest with a disk and the rng: with ACPI (devices only in the DSDT), with the
/// devices also on the command line, and with acpi=off. Each prints its CPUs, how it found
/// them, its interrupt mode and its virtio devices with their drivers.
const DISCOVERY_SCRIPT: &str = r#"
bulkhead=$1 kernel=$2 initramfs=$3 disk=$5
show="echo cpus=\$(grep -c ^processor /proc/cpuinfo); dmesg | grep -vi 'command line' | grep -iE 'Using ACPI|MP-table|IOAPIC\[|symmetric I/O|virtual wire|virtio_mmio|LNRO'; for d in /sys/bus/virtio/devices/*; do echo virtio: \${d##*/} device=\$(cat \$d/device) driver=\$(basename \$(readlink \$d/driver)); done; echo cmdline=\$(cat /proc/cmdline)"
for mode in acpi twice acpi-off; do
    case $mode in
        acpi) extra= ; args= ;;
        twice) extra=--cmdline-devices ; args= ;;
        acpi-off) extra= ; args=acpi=off ;;
    esac
    echo "lane: === $mode"
    "$bulkhead" run --kernel "$kernel" --initrd "$initramfs" --mem-mib 256 --vcpus 2 \
        --disk "$disk" $extra --cmdline "panic=-1 reboot=t $args -- sh -c \"$show\"" 2>&1
    echo "lane: $mode status $?"
done
"#;

/// The section of `out` a script printed for `mode`.
fn section<'a>(out: &'a str, mode: &str) -> &'a str {
    out.split(&format!("lane: === {mode}\n"))
        .nth(1)
        .and_then(|s| s.split("lane: ===").next())
        .unwrap_or_else(|| panic!("no {mode} section in:\n{out}"))
}

fn virtio_lines(section: &str) -> Vec<&str> {
    section
        .lines()
        .filter(|l| l.starts_with("virtio: "))
        .collect()
}

#[test]
fn linux_finds_every_vcpu_and_device_through_acpi_alone_and_binds_each_device_once() {
    let test = "linux_finds_every_vcpu_and_device_through_acpi_alone_and_binds_each_device_once";
    if !lane_available(test) {
        return;
    }
    let _serial = LANE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::scratch("lane-acpi");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let (status, out) = lane_script(&dir, DISCOVERY_SCRIPT, &["--disk", disk.to_str().unwrap()]);
    assert_eq!(status, 0, "{out}");
    let both = |s: &str| {
        let v = virtio_lines(s);
        v.len() == 2
            && v.iter()
                .any(|l| l.contains("device=0x0002 driver=virtio_blk"))
            && v.iter()
                .any(|l| l.contains("device=0x0004 driver=virtio_rng"))
    };

    let acpi = section(&out, "acpi");
    for line in [
        "cpus=2",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "symmetric I/O mode",
        "lane: acpi status 0",
    ] {
        assert!(
            acpi.contains(line),
            "ACPI boot: missing {line:?} in:\n{acpi}"
        );
    }
    assert!(both(acpi), "ACPI boot: devices:\n{acpi}");
    assert!(
        !acpi.contains("virtio_mmio.device="),
        "ACPI boot announced devices on the command line:\n{acpi}"
    );

    // Announced twice (the DSDT and the command line), each device is still bound once.
    let twice = section(&out, "twice");
    assert!(twice.contains("virtio_mmio.device="), "{twice}");
    assert!(twice.contains("lane: twice status 0"), "{twice}");
    assert!(both(twice), "devices announced twice:\n{twice}");

    let off = section(&out, "acpi-off");
    for line in ["cpus=2", "lane: acpi-off status 0", "virtio_mmio.device="] {
        assert!(off.contains(line), "acpi=off: missing {line:?} in:\n{off}");
    }
    assert!(!off.contains("Using ACPI (MADT)"), "{off}");
    assert!(both(off), "acpi=off: devices:\n{off}");
}

/// Run inside L1: $1 bulkhead, $2 kernel, $3 initramfs. A guest powers off, reboots with the
/// default reboot=a (the ACPI reset register), reboots through the BIOS (reboot=b: the reset
/// vector), and panics with no panic= on its command line (init exits at once).
const POWER_SCRIPT: &str = r#"
bulkhead=$1 kernel=$2 initramfs=$3
run() { mode=$1; shift; echo "lane: === $mode"; "$bulkhead" run --kernel "$kernel" --initrd "$initramfs" --mem-mib 256 --cmdline "$*" 2>&1; echo "lane: $mode status $?"; }
run poweroff "-- poweroff -f"
run reboot "-- reboot -f"
run bios-reboot "reboot=b -- reboot -f"
run panic "rdinit=/bin/false"
"#;

#[test]
fn linux_power_off_reboot_and_panic_end_the_vm_with_their_statuses() {
    let test = "linux_power_off_reboot_and_panic_end_the_vm_with_their_statuses";
    if !lane_available(test) {
        return;
    }
    let _serial = LANE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::scratch("lane-power");
    let (status, out) = lane_script(&dir, POWER_SCRIPT, &[]);
    assert_eq!(status, 0, "{out}");
    for (mode, lines) in [
        (
            "poweroff",
            &["guest powered off (ACPI S5)", "lane: poweroff status 0"][..],
        ),
        (
            "reboot",
            &[
                "guest reset the machine through the ACPI reset register",
                "lane: reboot status 0",
            ][..],
        ),
        (
            "bios-reboot",
            &[
                "guest reset the machine through the i8042",
                "lane: bios-reboot status 0",
            ][..],
        ),
        (
            "panic",
            &[
                "Kernel panic",
                "the guest kernel panicked",
                "lane: panic status 87",
            ][..],
        ),
    ] {
        let s = section(&out, mode);
        for line in lines {
            assert!(s.contains(line), "{mode}: missing {line:?} in:\n{s}");
        }
    }
}
