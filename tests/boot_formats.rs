//! The three ways a kernel can be handed over all boot: a plain ELF (64-bit entry), an ELF
//! with a PVH note (entered in 32-bit protected mode with hvm_start_info), and a bzImage
//! (64-bit boot protocol at +0x200). In each, the guest finds its command line and initrd.

mod common;

use common::{kvm_available, run_guest, scratch};

const FORMATS: [(&str, &str); 3] = [
    ("hello", "boot protocol: linux 64-bit"),
    ("hello-pvh", "boot protocol: pvh"),
    (
        "hello.bzImage",
        "boot protocol: linux 64-bit from a bzImage",
    ),
];

#[test]
fn every_kernel_format_boots_with_the_right_protocol_and_reads_its_command_line() {
    if !kvm_available(
        "every_kernel_format_boots_with_the_right_protocol_and_reads_its_command_line",
    ) {
        return;
    }
    for (guest, protocol) in FORMATS {
        let run = run_guest(guest, &["--cmdline", "exit=23"]);
        assert_eq!(run.status, 23, "{guest}: stderr {}", run.stderr);
        assert_eq!(
            run.stdout_count(protocol),
            1,
            "{guest}: stdout {}",
            run.stdout
        );
        assert!(
            run.stderr.contains("guest boot complete in "),
            "{guest}: {}",
            run.stderr
        );
    }
}

#[test]
fn every_kernel_format_finds_its_initrd_intact() {
    if !kvm_available("every_kernel_format_finds_its_initrd_intact") {
        return;
    }
    let dir = scratch("initrd-formats");
    let initrd = dir.join("initrd.img");
    let mut content = b"BULKHEAD-INITRD\n".to_vec();
    content.resize(3 * 4096 + 17, 0xa5);
    std::fs::write(&initrd, &content).unwrap();
    for (guest, _) in FORMATS {
        let run = run_guest(
            guest,
            &["--initrd", initrd.to_str().unwrap(), "--mem-mib", "32"],
        );
        assert_eq!(run.status, 0, "{guest}: stderr {}", run.stderr);
        let want = format!("initrd: {} bytes, magic ok", content.len());
        assert_eq!(run.stdout_count(&want), 1, "{guest}: stdout {}", run.stdout);
    }
}
