use super::*;
use std::io::Write;
use vm_memory::Bytes;

const BASE: u64 = 0x100_0000;
/// Where linux-loader put the protected-mode part in these tests, and its end.
const LOADED: (u64, u64) = (0x10_0000, 0x20_0000);

/// Link-time virtual address of physical `p`, as a relocation entry holds it.
fn entry_for(p: u64) -> u32 {
    (START_KERNEL_MAP + p) as u32
}

/// A small vmlinux: two segments (the first with .bss-like zero fill), fields to relocate at
/// BASE+0x10 (32-bit), +0x20 (64-bit), +0x30 (inverse 32-bit) and +0x800 (32-bit, second
/// segment), and the relocation table after it unless `relocs` is false.
fn vmlinux(relocs: bool) -> Vec<u8> {
    let mut f = vec![0u8; 0x2040];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[0x12..0x14].copy_from_slice(&EM_X86_64.to_le_bytes());
    f[0x18..0x20].copy_from_slice(&BASE.to_le_bytes());
    f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    f[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
    for (i, (offset, paddr, filesz, memsz)) in [
        (0x1000u64, BASE, 0x100u64, 0x200u64),
        (0x2000, BASE + 0x800, 0x40, 0x40),
    ]
    .into_iter()
    .enumerate()
    {
        let ph = 64 + i * 56;
        f[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        for (at, v) in [(8, offset), (16, START_KERNEL_MAP + paddr), (24, paddr)] {
            f[ph + at..ph + at + 8].copy_from_slice(&v.to_le_bytes());
        }
        f[ph + 32..ph + 40].copy_from_slice(&filesz.to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
    }
    f[0x1010..0x1014].copy_from_slice(&0x8100_0000u32.to_le_bytes());
    f[0x1020..0x1028].copy_from_slice(&0xffff_ffff_8100_0123u64.to_le_bytes());
    f[0x1030..0x1034].copy_from_slice(&0x1000u32.to_le_bytes());
    f[0x2000..0x2004].copy_from_slice(&0x8100_0800u32.to_le_bytes());
    // Bytes (after the program headers) where the first segment's zero fill will land once it
    // is moved down to offset 0: placing must zero them.
    f[0x180..0x200].fill(0xee);
    if relocs {
        let words = [
            0,
            entry_for(BASE + 0x20),
            0,
            entry_for(BASE + 0x30),
            0,
            entry_for(BASE + 0x10),
            entry_for(BASE + 0x800),
        ];
        for w in words {
            f.extend_from_slice(&w.to_le_bytes());
        }
    }
    f
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// LZ4's legacy framing of `chunks`, each one literal-only block (under 15 bytes).
fn lz4_literals(chunks: &[&[u8]]) -> Vec<u8> {
    let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
    let mut total = 0u32;
    for c in chunks {
        assert!(c.len() < 15);
        out.extend_from_slice(&(c.len() as u32 + 1).to_le_bytes());
        out.push((c.len() as u8) << 4);
        out.extend_from_slice(c);
        total += c.len() as u32;
    }
    out.extend_from_slice(&total.to_le_bytes());
    out
}

fn u32_in(b: &[u8], at: u64) -> u32 {
    u32_at(b, at as usize).unwrap()
}

#[test]
fn lz4_legacy_blocks_and_the_appended_size_unpack_in_order() {
    let payload = lz4_literals(&[b"hello, ", b"kernel"]);
    let (format, size) = inspect(&payload).unwrap();
    assert_eq!((format, size), (Format::Lz4, 13));
    let mut out = vec![0u8; size];
    decompress(format, &payload, &mut out).unwrap();
    assert_eq!(&out, b"hello, kernel");
}

#[test]
fn lz4_block_running_past_the_payload_is_refused() {
    let mut payload = lz4_literals(&[b"abc"]);
    payload[4] = 200; // the block claims 200 bytes
    let mut out = vec![0u8; 3];
    assert!(matches!(
        decompress(Format::Lz4, &payload, &mut out),
        Err(UnpackError::Lz4(_))
    ));
}

#[test]
fn gzip_payload_unpacks_and_a_wrong_size_is_refused() {
    let data = vmlinux(true);
    let mut payload = gzip(&data);
    let (format, size) = inspect(&payload).unwrap();
    assert_eq!((format, size), (Format::Gzip, data.len()));
    let mut out = vec![0u8; size];
    decompress(format, &payload, &mut out).unwrap();
    assert_eq!(out, data);
    // A damaged stream fails its CRC (or its inflate) rather than booting garbage.
    let mid = payload.len() / 2;
    payload[mid] ^= 0x55;
    assert!(decompress(format, &payload, &mut out).is_err());
    let mut short = vec![0u8; size - 1];
    assert!(decompress(format, &gzip(&data), &mut short).is_err());
}

#[test]
fn formats_bulkhead_does_not_decode_are_left_to_the_guest() {
    for magic in [
        &b"\xfd7zXZ\x00"[..],
        b"\x28\xb5\x2f\xfd",
        b"BZh9",
        b"\x5d\x00\x00",
    ] {
        let mut payload = magic.to_vec();
        payload.extend_from_slice(&[0; 16]);
        assert_eq!(inspect(&payload), None);
    }
}

#[test]
fn segments_move_to_their_physical_addresses_and_bss_is_zeroed() {
    let data = vmlinux(true);
    let mut out = data.clone();
    out.resize(0x4000, 0xaa);
    let placed = place_segments(&mut out, data.len(), BASE).unwrap();
    assert_eq!(placed.entry, BASE);
    assert_eq!(placed.image_len, 0x840);
    assert_eq!(&out[..0x100], &data[0x1000..0x1100]);
    assert!(out[0x100..0x200].iter().all(|&b| b == 0));
    assert_eq!(&out[0x800..0x840], &data[0x2000..0x2040]);
    assert_eq!(placed.relocs.r32.len(), 2);
    assert_eq!(placed.relocs.inverse32, vec![entry_for(BASE + 0x30)]);
    assert_eq!(placed.relocs.r64, vec![entry_for(BASE + 0x20)]);
}

#[test]
fn relocation_moves_every_kind_of_field_by_the_offset() {
    let data = vmlinux(true);
    let mut out = data.clone();
    let placed = place_segments(&mut out, data.len(), BASE).unwrap();
    let offset = 0x20_0000;
    relocate(&mut out, placed.image_len, BASE, &placed.relocs, offset).unwrap();
    assert_eq!(u32_in(&out, 0x10), 0x8120_0000);
    assert_eq!(u64_at(&out, 0x20), Some(0xffff_ffff_8120_0123));
    assert_eq!(u32_in(&out, 0x30), 0x1000u32.wrapping_sub(0x20_0000));
    assert_eq!(u32_in(&out, 0x800), 0x8120_0800);
}

#[test]
fn relocation_outside_the_image_is_refused() {
    let relocs = Relocs {
        r32: vec![entry_for(BASE + 0x840)],
        ..Default::default()
    };
    let mut out = vec![0u8; 0x1000];
    let err = relocate(&mut out, 0x840, BASE, &relocs, 0x20_0000).unwrap_err();
    assert!(matches!(err, UnpackError::RelocOutside { .. }), "{err}");
    // The last field that fits is fine.
    let fits = Relocs {
        r32: vec![entry_for(BASE + 0x83c)],
        ..Default::default()
    };
    relocate(&mut out, 0x840, BASE, &fits, 0x20_0000).unwrap();
}

#[test]
fn kernel_without_a_table_has_no_relocations_and_a_damaged_table_is_refused() {
    let data = vmlinux(false);
    let mut out = data.clone();
    assert!(place_segments(&mut out, data.len(), BASE)
        .unwrap()
        .relocs
        .is_empty());
    // Only two of the three terminators: the walk would run into the image.
    let mut data = vmlinux(false);
    data.extend_from_slice(&[0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0]);
    let mut out = data.clone();
    assert!(matches!(
        place_segments(&mut out, data.len(), BASE),
        Err(UnpackError::Relocs(_))
    ));
}

#[test]
fn malformed_elf_is_refused_by_name() {
    let mut out = vec![0u8; 0x100];
    assert!(matches!(
        place_segments(&mut out, 0x100, BASE),
        Err(UnpackError::Elf(_))
    ));
    // A segment below the load address.
    let data = vmlinux(true);
    let mut out = data.clone();
    assert!(matches!(
        place_segments(&mut out, data.len(), BASE + 0x1000),
        Err(UnpackError::Elf(_))
    ));
    // Segments whose move would overwrite one not yet moved.
    let mut swapped = vmlinux(true);
    let (a, b) = (64usize, 64usize + 56);
    let first: Vec<u8> = swapped[a..a + 56].to_vec();
    let second: Vec<u8> = swapped[b..b + 56].to_vec();
    swapped[a..a + 56].copy_from_slice(&second);
    swapped[b..b + 56].copy_from_slice(&first);
    let mut out = swapped.clone();
    assert!(matches!(
        place_segments(&mut out, swapped.len(), BASE),
        Err(UnpackError::Elf("segments out of order"))
    ));
}

#[test]
fn kaslr_offsets_are_aligned_and_keep_the_image_in_the_kernel_window() {
    let (size, align) = (70 << 20, 0x20_0000u32);
    let slots = (KERNEL_IMAGE_SIZE - size - BASE) / u64::from(align) + 1;
    assert_eq!(choose_offset(0, BASE, size, align), 0);
    let mut seen = std::collections::BTreeSet::new();
    for r in (0..slots * 3).chain([u64::MAX, u64::MAX - 1]) {
        let off = choose_offset(r, BASE, size, align);
        assert_eq!(off % u64::from(align), 0);
        assert!(BASE + off + size <= KERNEL_IMAGE_SIZE, "{off:#x}");
        seen.insert(off);
    }
    assert_eq!(seen.len() as u64, slots, "every slot is reachable");
    assert_eq!(
        choose_offset(5, BASE, size, 0x30_0000),
        0,
        "not a power of two"
    );
    assert_eq!(
        choose_offset(5, BASE, KERNEL_IMAGE_SIZE, align),
        0,
        "no room"
    );
}

/// A setup header for a payload at `offset` of the protected-mode part.
fn header(offset: u32, length: usize) -> setup_header {
    setup_header {
        version: 0x020f,
        payload_offset: offset,
        payload_length: length as u32,
        pref_address: BASE,
        init_size: 0x1_0000,
        kernel_alignment: 0x20_0000,
        relocatable_kernel: 1,
        ..Default::default()
    }
}

fn guest_with(payload: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    mem.write_slice(payload, GuestAddress(0x10_0000 + 0x400))
        .unwrap();
    mem
}

#[test]
fn bzimage_in_guest_memory_is_unpacked_relocated_and_entered_at_startup_64() {
    let payload = gzip(&vmlinux(true));
    let mem = guest_with(&payload);
    let hdr = header(0x400, payload.len());
    let u = unpack_bzimage(&mem, LOADED, &hdr, Some(|| 3))
        .unwrap()
        .unwrap();
    assert_eq!((u.entry, u.format), (BASE, Format::Gzip));
    assert!(u.kaslr);
    assert_eq!(u.virt_offset, 3 * 0x20_0000);
    assert_eq!(u.end, BASE + 0x1_0000);
    let field: u32 = mem.read_obj(GuestAddress(BASE + 0x10)).unwrap();
    assert_eq!(field, 0x8100_0000 + 0x60_0000);
    // The compressed image's pages were given back: they read as zeros.
    let gone: [u8; 16] = mem.read_obj(GuestAddress(LOADED.0 + 0x400)).unwrap();
    assert_eq!(gone, [0; 16]);

    // nokaslr: placed at the link-time base, nothing relocated.
    let mem = guest_with(&payload);
    let u = unpack_bzimage(&mem, LOADED, &hdr, None).unwrap().unwrap();
    assert_eq!((u.kaslr, u.virt_offset), (false, 0));
    let field: u32 = mem.read_obj(GuestAddress(BASE + 0x10)).unwrap();
    assert_eq!(field, 0x8100_0000);
}

#[test]
fn bzimage_left_to_its_own_decompressor_writes_nothing() {
    let mut xz = b"\xfd7zXZ\x00".to_vec();
    xz.resize(64, 1);
    let mem = guest_with(&xz);
    let hdr = header(0x400, xz.len());
    assert_eq!(
        unpack_bzimage(&mem, LOADED, &hdr, Some(|| 1)).unwrap(),
        None
    );
    let kept: [u8; 6] = mem.read_obj(GuestAddress(LOADED.0 + 0x400)).unwrap();
    assert_eq!(&kept, b"\xfd7zXZ\x00");
    // An old boot protocol has no preferred address to unpack to.
    let payload = gzip(&vmlinux(true));
    let mem = guest_with(&payload);
    let old = setup_header {
        version: 0x0209,
        ..header(0x400, payload.len())
    };
    assert_eq!(
        unpack_bzimage(&mem, LOADED, &old, Some(|| 1)).unwrap(),
        None
    );
    // Too little RAM above the preferred address.
    let small =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (BASE + 0x8000) as usize)]).unwrap();
    small
        .write_slice(&payload, GuestAddress(0x10_0000 + 0x400))
        .unwrap();
    let hdr = header(0x400, payload.len());
    assert_eq!(
        unpack_bzimage(&small, LOADED, &hdr, Some(|| 1)).unwrap(),
        None
    );
    let untouched: u64 = small.read_obj(GuestAddress(BASE)).unwrap();
    assert_eq!(untouched, 0);
}

#[test]
fn payload_outside_the_loaded_image_is_refused() {
    let mem = guest_with(&[0u8; 16]);
    let hdr = header(0x400, 128 << 20);
    assert!(matches!(
        unpack_bzimage(&mem, LOADED, &hdr, None),
        Err(UnpackError::PayloadOutside { .. })
    ));
}
