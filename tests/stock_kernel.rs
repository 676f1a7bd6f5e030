//! The kernel users already have: Debian 12's stock cloud kernel (guest-images/build-stock-linux
//! fetches it from Debian's archive), in the nested lane. It has no MP-table parsing and no
//! command-line virtio devices, so everything it finds, it finds through bulkhead's ACPI tables.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::lane::{build, ext4_file, ext4_image, lane_available, lane_script_with, LANE};

struct StockImages {
    bzimage: PathBuf,
    initramfs: PathBuf,
}

fn stock() -> &'static StockImages {
    static IMAGES: OnceLock<StockImages> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let built = build("build-stock-linux");
        StockImages {
            bzimage: built.get("bzimage"),
            initramfs: built.get("initramfs"),
        }
    })
}

/// Run inside L1: $1 bulkhead, $2 the stock bzImage, $3 its initramfs, $5 an ext4 disk. In a
/// network namespace of its own, the guest gets 2 vCPUs, the disk, a tap, vsock and rng; it
/// prints what it found, writes a file to the disk, and powers off.
const STOCK_SCRIPT: &str = r#"
if [ "$1" != inner ]; then exec unshare -n sh "$0" inner "$@"; fi
shift
bulkhead=$1 kernel=$2 initramfs=$3 disk=$5
show="echo cpus=\$(grep -c ^processor /proc/cpuinfo); dmesg | grep -vi 'command line' | grep -iE 'Using ACPI|symmetric I/O|virtual wire|IOAPIC\['; for d in /sys/bus/virtio/devices/*; do echo virtio: \${d##*/} device=\$(cat \$d/device) driver=\$(basename \$(readlink \$d/driver)); done; grep -q IO-APIC /proc/interrupts && echo interrupts=IO-\$(echo APIC); mkdir /m && mount /dev/vda /m && echo stock-kernel-token > /m/token && umount /m && echo disk=\$(echo written)"
"$bulkhead" run --kernel "$kernel" --initrd "$initramfs" --mem-mib 256 --vcpus 2 \
    --disk "$disk" --net tap=bhtap2,mac=06:00:0a:00:00:02 --vsock cid=3,uds=/tmp/stock.sock \
    --cmdline "quiet -- sh -c \"$show\"" 2>&1
echo "lane: stock status $?"
"#;

#[test]
fn debians_stock_kernel_sees_every_vcpu_and_device_writes_its_disk_and_powers_off() {
    let test = "debians_stock_kernel_sees_every_vcpu_and_device_writes_its_disk_and_powers_off";
    if !lane_available(test) {
        return;
    }
    let images = stock();
    let _serial = LANE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::scratch("lane-stock");
    let disk = dir.join("ext4.img");
    ext4_image(&disk, 32);
    let (status, out) = lane_script_with(
        &dir,
        STOCK_SCRIPT,
        &images.bzimage,
        &images.initramfs,
        &["--disk", disk.to_str().unwrap()],
    );
    assert_eq!(status, 0, "{out}");
    for line in [
        "cpus=2",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "symmetric I/O mode",
        "interrupts=IO-APIC",
        "disk=written",
        "guest powered off (ACPI S5)",
        "lane: stock status 0",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    assert!(!out.to_lowercase().contains("virtual wire mode"), "{out}");
    for (id, driver) in [
        ("0x0002", "virtio_blk"),
        ("0x0001", "virtio_net"),
        ("0x0013", "vmw_vsock_virtio_transport"),
        ("0x0004", "virtio_rng"),
    ] {
        assert!(
            out.lines().any(|l| l.starts_with("virtio: ")
                && l.contains(&format!("device={id} driver={driver}"))),
            "no {driver} bound in:\n{out}"
        );
    }
    // The file went through the guest's ext4 and bulkhead's virtio-blk into the host image.
    assert!(
        ext4_file(&disk, "token").contains("stock-kernel-token"),
        "the host image does not hold the file"
    );
}
