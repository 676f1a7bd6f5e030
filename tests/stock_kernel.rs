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
    /// The package's /lib/modules/VERSION, as unpacked (no modules.dep).
    modules: PathBuf,
}

fn stock() -> &'static StockImages {
    static IMAGES: OnceLock<StockImages> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let built = build("build-stock-linux");
        let bzimage = built.get("bzimage");
        let kver = built.get("kver");
        // bzimage is .../boot/vmlinuz-KVER; the modules are beside it, under lib/modules.
        let root = bzimage.parent().and_then(|b| b.parent()).unwrap();
        StockImages {
            modules: root.join("lib/modules").join(kver),
            initramfs: built.get("initramfs"),
            bzimage,
        }
    })
}

/// Run inside L1: $1 bulkhead, $2 the stock bzImage, $3 its initramfs, $5 an ext4 disk. In a
/// network namespace of its own, the guest gets 2 vCPUs, the disk, a tap, vsock and rng; it
/// prints where its text is and what it found, writes a file to the disk, and powers off.
/// Two short boots follow, printing where their text is.
const STOCK_SCRIPT: &str = r#"
if [ "$1" != inner ]; then exec unshare -n sh "$0" inner "$@"; fi
shift
bulkhead=$1 kernel=$2 initramfs=$3 disk=$5
# Where the kernel's text landed, virtually and physically: bulkhead unpacks this LZ4 kernel
# itself and places it at random; this boot and two more, which also log where bulkhead put
# it. (`nokaslr` is tested below the lane: this initramfs would run it as a command, as the
# kernel hands init the words it does not know.)
text="echo text=\$(grep ' _text\$' /proc/kallsyms | cut -d' ' -f1) code=\$(grep 'Kernel code' /proc/iomem | tr -d ' ' | cut -d- -f1)"
show="$text; echo cpus=\$(grep -c ^processor /proc/cpuinfo); dmesg | grep -vi 'command line' | grep -iE 'Using ACPI|symmetric I/O|virtual wire|IOAPIC\['; for d in /sys/bus/virtio/devices/*; do echo virtio: \${d##*/} device=\$(cat \$d/device) driver=\$(basename \$(readlink \$d/driver)); done; grep -q IO-APIC /proc/interrupts && echo interrupts=IO-\$(echo APIC); mkdir /m && mount /dev/vda /m && echo stock-kernel-token > /m/token && umount /m && echo disk=\$(echo written)"
"$bulkhead" run --kernel "$kernel" --initrd "$initramfs" --mem-mib 256 --vcpus 2 \
    --disk "$disk" --net tap=bhtap2,mac=06:00:0a:00:00:02 --vsock cid=3,uds=/tmp/stock.sock \
    --cmdline "quiet -- sh -c \"$show\"" 2>&1
echo "lane: stock status $?"
for boot in 2 3; do
    "$bulkhead" run --kernel "$kernel" --initrd "$initramfs" --mem-mib 256 --log-level debug \
        --cmdline "quiet -- sh -c \"$text\"" 2>&1 | grep -E '^text=|unpacked'
done
"#;

#[test]
fn debians_stock_kernel_boots_at_a_random_base_sees_every_vcpu_and_device_and_writes_its_disk() {
    let test = "debians_stock_kernel_boots_at_a_random_base_sees_every_vcpu_and_device_and_writes_its_disk";
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
    kaslr_moved_the_kernel(&out);
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

/// The hex number after `key` in `line`.
fn hex_after(line: &str, key: &str) -> Option<u64> {
    let rest = line.split(key).nth(1)?;
    let digits: String = rest
        .trim_start_matches("0x")
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    u64::from_str_radix(&digits, 16).ok()
}

/// The `text=` lines (`_text` and the physical start of the kernel's code, of the first boot
/// and the two after it) and bulkhead's `unpacked ... at PHYS; virtual base moved by OFFSET`
/// lines of the last two. KASLR bases are 2 MiB steps above the link-time base inside the
/// kernel's 1 GiB window (three random ones all equal: one chance in 230,000), and each is
/// where bulkhead says it put the kernel: the guest's own decompressor did not run. The
/// physical addresses are 2 MiB steps and not all the preferred one.
fn kaslr_moved_the_kernel(out: &str) {
    const LINKED: u64 = 0xffff_ffff_8100_0000;
    let texts: Vec<(u64, u64)> = out
        .lines()
        .filter(|l| l.trim_start().starts_with("text="))
        .map(|l| {
            hex_after(l, "text=")
                .zip(hex_after(l, "code="))
                .unwrap_or_else(|| panic!("{l:?} in:\n{out}"))
        })
        .collect();
    let placed: Vec<(u64, u64)> = out
        .lines()
        .filter(|l| l.contains("unpacked"))
        .map(|l| {
            hex_after(l, " at ")
                .zip(hex_after(l, "moved by "))
                .unwrap_or_else(|| panic!("{l:?} in:\n{out}"))
        })
        .collect();
    assert_eq!((texts.len(), placed.len()), (3, 2), "{out}");
    for &(text, code) in &texts {
        assert!(
            text >= LINKED && (text - LINKED) % (2 << 20) == 0 && text < 0xffff_ffff_c000_0000,
            "_text {text:#x} is no KASLR base\n{out}"
        );
        assert_eq!(code % (2 << 20), 0, "kernel code at {code:#x}\n{out}");
    }
    for (&(text, code), &(at, moved)) in texts[1..].iter().zip(&placed) {
        assert_eq!((text, code), (LINKED + moved, at), "\n{out}");
    }
    let bases: Vec<u64> = texts.iter().map(|t| t.0).collect();
    assert!(
        bases[0] != bases[1] || bases[1] != bases[2],
        "three boots, one base: {bases:x?}"
    );
    // The physical address is random too (about 85 places in 256 MiB): all three at the
    // kernel's preferred 16 MiB would be one chance in 600,000.
    assert!(
        texts.iter().any(|&(_, code)| code != 0x100_0000),
        "three boots at the preferred physical address\n{out}"
    );
}

/// Run inside L1: $1 bulkhead, $2 the stock bzImage, $4 the modules directory (only the
/// modules exec needs were carried into L1, at their paths, without a modules.dep).
const STOCK_EXEC_SCRIPT: &str = r#"
bulkhead=$1 kernel=$2 modules=$4
# The guest runs the command in this directory; /tmp is its own, so not one under /tmp.
cd /
"$bulkhead" exec --kernel "$kernel" --modules "$modules" --mem-mib 256 -- sh -c 'echo stock-exec-$((6 * 7)); grep -c virtiofs /proc/mounts; exit 5'
echo "lane: stock exec status $?"
"#;

#[test]
fn exec_runs_a_command_on_debians_stock_kernel_loading_its_virtio_vsock_and_virtiofs_modules() {
    let test =
        "exec_runs_a_command_on_debians_stock_kernel_loading_its_virtio_vsock_and_virtiofs_modules";
    if !lane_available(test) {
        return;
    }
    let images = stock();
    let modules = bulkhead::exec::modules::Modules::resolve(
        &images.modules,
        &bulkhead::exec::modules::NEEDED_MODULES,
    )
    .expect("the stock kernel's modules");
    let names: Vec<String> = modules
        .files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for needed in ["virtio_mmio.ko", "fuse.ko", "virtiofs.ko", "vsock.ko"] {
        assert!(
            names.iter().any(|n| n == needed),
            "{needed} not in {names:?}"
        );
    }
    let _serial = LANE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::scratch("lane-stock-exec");
    let mut extra = vec![images.modules.to_str().unwrap()];
    // Named, so nested-kvm carries each into L1.
    extra.extend(modules.files.iter().map(|f| f.to_str().unwrap()));
    let (status, out) = lane_script_with(
        &dir,
        STOCK_EXEC_SCRIPT,
        &images.bzimage,
        &images.initramfs,
        &extra,
    );
    assert_eq!(status, 0, "{out}");
    for line in ["stock-exec-42", "lane: stock exec status 5"] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
}
