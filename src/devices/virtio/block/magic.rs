//! Disk image format headers: a guest that writes one to sector 0 of a raw disk turns the
//! disk into something a host tool that guesses formats would open as that format, following
//! its backing-file or extent references to host files (the CVE-2008-2004 and CVE-2026-27211
//! class). bulkhead's disks are always raw, so such a write is refused and alerted on.

use crate::telemetry::ImageFormat;

/// How many leading bytes [`detect`] looks at: the first sector, enough for a VMDK text
/// descriptor's opening lines.
pub const PROBE_LEN: usize = 512;

/// The format whose header `head` (the first bytes written to sector 0) starts, if any.
pub fn detect(head: &[u8]) -> Option<ImageFormat> {
    let starts = |magic: &[u8]| head.starts_with(magic);
    if starts(b"QFI\xfb") {
        return Some(ImageFormat::Qcow2);
    }
    // QED, which names a backing file too.
    if starts(b"QED\0") {
        return Some(ImageFormat::Qed);
    }
    // A sparse extent, or a text descriptor naming other files as its extents.
    if starts(b"KDMV") || starts(b"COWD") || vmdk_descriptor(head) {
        return Some(ImageFormat::Vmdk);
    }
    // A dynamic VHD keeps a copy of its footer in the first sector.
    if starts(b"conectix") {
        return Some(ImageFormat::Vhd);
    }
    if starts(b"vhdxfile") {
        return Some(ImageFormat::Vhdx);
    }
    // VirtualBox: a text banner, then the signature 0xbeda107f at byte 0x40.
    if head.get(0x40..0x44) == Some(&0xbeda_107fu32.to_le_bytes()[..]) {
        return Some(ImageFormat::Vdi);
    }
    None
}

/// A VMDK text descriptor as QEMU's probe reads one: comment (`#`) and blank lines (QEMU skips
/// lines of spaces; any whitespace is taken as blank here, to be stricter), then a `version=`
/// line.
fn vmdk_descriptor(head: &[u8]) -> bool {
    for line in head.split(|&b| b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) || line.first() == Some(&b'#') {
            continue;
        }
        return line.starts_with(b"version=");
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_format_header_is_recognised_and_ordinary_data_is_not() {
        let mut vdi = [0u8; PROBE_LEN];
        vdi[..4].copy_from_slice(b"<<< ");
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        let cases: [(&[u8], Option<ImageFormat>); 13] = [
            (b"QFI\xfb\x00\x00\x00\x03", Some(ImageFormat::Qcow2)),
            (b"QED\x00\x00\x00\x01\x00", Some(ImageFormat::Qed)),
            (b"KDMV\x01\x00\x00\x00", Some(ImageFormat::Vmdk)),
            (
                b"# Disk DescriptorFile\nversion=1\n",
                Some(ImageFormat::Vmdk),
            ),
            (
                b"\n# made by hand\r\n\nversion=3\nCID=fffffffe\n",
                Some(ImageFormat::Vmdk),
            ),
            (
                b"  \nversion=1\ncreateType=\"monolithicFlat\"\n",
                Some(ImageFormat::Vmdk),
            ),
            (b"# just a comment\nhello\n", None),
            (b"conectix\x00\x00\x00\x02", Some(ImageFormat::Vhd)),
            (b"vhdxfile", Some(ImageFormat::Vhdx)),
            (&vdi, Some(ImageFormat::Vdi)),
            (b"\xeb\x63\x90MSDOS5.0", None),
            (b"QFI", None),
            (&[0u8; PROBE_LEN], None),
        ];
        for (head, want) in cases {
            assert_eq!(detect(head), want, "{head:02x?}");
        }
    }
}
