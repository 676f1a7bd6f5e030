use super::*;
use std::io::Write;
use vm_memory::Bytes;

const BASE: u64 = 0x100_0000;
/// startup_64's offset in the test vmlinux (not 0, so an entry computed without it shows).
const ENTRY: u64 = 0x40;
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
    f[0x18..0x20].copy_from_slice(&(BASE + ENTRY).to_le_bytes());
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

/// The test vmlinux with its two program headers swapped: the second segment listed first,
/// so moving them in order would overwrite one not yet moved.
fn segments_swapped() -> Vec<u8> {
    let mut data = vmlinux(true);
    let (first, second) = data[64..64 + 2 * 56].split_at_mut(56);
    first.swap_with_slice(second);
    data
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
        Err(UnpackError::Lz4Framing(_))
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

/// Parses and places `data` in a window of `room` bytes; returns the window and the layout.
fn place(data: &[u8], room: usize) -> Result<(Vec<u8>, ElfLayout), UnpackError> {
    let mut out = data.to_vec();
    out.resize(room.max(data.len()), 0xaa);
    let layout = parse_elf(&out[..data.len()], out.len(), BASE)?;
    move_segments(&mut out, &layout.segments);
    Ok((out, layout))
}

#[test]
fn segments_move_to_their_physical_addresses_and_bss_is_zeroed() {
    let data = vmlinux(true);
    let (out, layout) = place(&data, 0x4000).unwrap();
    assert_eq!(layout.entry, BASE + ENTRY);
    assert_eq!((layout.image_len, layout.elf_end), (0x840, 0x2040));
    assert_eq!(&out[..0x100], &data[0x1000..0x1100]);
    assert!(out[0x100..0x200].iter().all(|&b| b == 0));
    assert_eq!(&out[0x800..0x840], &data[0x2000..0x2040]);
    let relocs = read_relocs(&data, layout.elf_end).unwrap();
    assert_eq!(relocs.r32.len(), 2);
    assert_eq!(relocs.inverse32, vec![entry_for(BASE + 0x30)]);
    assert_eq!(relocs.r64, vec![entry_for(BASE + 0x20)]);
}

#[test]
fn relocation_moves_every_kind_of_field_by_the_offset() {
    let data = vmlinux(true);
    let (mut out, layout) = place(&data, data.len()).unwrap();
    let relocs = read_relocs(&data, layout.elf_end).unwrap();
    let offset = 0x20_0000;
    relocate(&mut out, layout.image_len, BASE, &relocs, offset).unwrap();
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
fn relocation_table_must_end_where_vmlinux_does() {
    // Only two of the three terminators: the walk would run into the image.
    let mut data = vmlinux(false);
    let elf_end = data.len();
    data.extend_from_slice(&[0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0]);
    assert!(matches!(
        read_relocs(&data, elf_end),
        Err(UnpackError::Relocs(_))
    ));
    // Three lists, but with bytes between vmlinux and the table.
    let mut data = vmlinux(false);
    data.extend_from_slice(&[7; 8]);
    data.extend_from_slice(&vmlinux(true)[elf_end..]);
    let err = read_relocs(&data, elf_end).unwrap_err();
    assert!(err.left_to_guest(), "{err}");
}

#[test]
fn malformed_elf_is_refused_by_name_and_odd_layouts_are_left_to_the_guest() {
    let out = vec![0u8; 0x100];
    assert!(matches!(
        parse_elf(&out, 0x100, BASE),
        Err(UnpackError::Elf(_))
    ));
    let data = vmlinux(true);
    // A segment below the load address.
    let err = parse_elf(&data, data.len(), BASE + 0x1000).unwrap_err();
    assert!(err.left_to_guest(), "{err}");
    // Segments whose move would overwrite one not yet moved.
    let swapped = segments_swapped();
    assert!(matches!(
        parse_elf(&swapped, swapped.len(), BASE),
        Err(UnpackError::Layout("segments out of order"))
    ));
    // A first segment whose zero fill would reach the second one's place.
    let mut long_bss = data.clone();
    long_bss[64 + 40..64 + 48].copy_from_slice(&0x900u64.to_le_bytes());
    assert!(matches!(
        parse_elf(&long_bss, long_bss.len(), BASE),
        Err(UnpackError::Layout("segments out of order"))
    ));
}

#[test]
fn physical_address_is_aligned_and_leaves_room_for_the_initrd() {
    let (span, align) = (70u64 << 20, 2u64 << 20);
    let end = 256u64 << 20;
    let mut seen = std::collections::BTreeSet::new();
    for r in 0..200 {
        let phys = choose_phys(r, BASE, span, align, end, Some((20 << 20, u64::MAX)));
        assert_eq!((phys - BASE) % align, 0);
        assert!(phys + span <= end - (20 << 20), "{phys:#x}");
        seen.insert(phys);
    }
    // (256 - 20 - 70 - 16) MiB of room: 75 two-MiB steps, and the base itself.
    assert_eq!(seen.len(), 76);
    // The initrd's own limit counts, and no room leaves the kernel at its base.
    assert_eq!(
        choose_phys(5, BASE, span, align, end, Some((0, 100 << 20))),
        BASE + (10 << 20)
    );
    assert_eq!(choose_phys(5, BASE, span, align, 80 << 20, None), BASE);
}

#[test]
fn kaslr_offsets_are_aligned_and_keep_the_image_in_the_kernel_window() {
    let (size, align) = (70 << 20, 0x20_0000u64);
    let slots = (KERNEL_IMAGE_SIZE - size - BASE) / align + 1;
    assert_eq!(choose_offset(0, BASE, size, align), 0);
    let mut seen = std::collections::BTreeSet::new();
    for r in (0..slots * 3).chain([u64::MAX, u64::MAX - 1]) {
        let off = choose_offset(r, BASE, size, align);
        assert_eq!(off % align, 0);
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
    fn three_then_four() -> u64 {
        thread_local!(static DRAWS: std::cell::Cell<u64> = const { std::cell::Cell::new(3) });
        DRAWS.with(|d| d.replace(d.get() + 1))
    }
    let payload = gzip(&vmlinux(true));
    let mem = guest_with(&payload);
    let hdr = header(0x400, payload.len());
    let u = unpack_bzimage(&mem, LOADED, &hdr, Some(three_then_four), None)
        .unwrap()
        .unwrap();
    // The physical place is drawn first (3 steps of 2 MiB up the RAM), the virtual one second
    // (4 steps up the kernel's window).
    let phys = BASE + 3 * 0x20_0000;
    let placed = (u.entry, u.load_addr, u.format);
    assert_eq!(placed, (phys + ENTRY, phys, Format::Gzip));
    assert!(u.kaslr);
    assert_eq!(u.virt_offset, 4 * 0x20_0000);
    assert_eq!(u.end, phys + 0x1_0000);
    let field: u32 = mem.read_obj(GuestAddress(phys + 0x10)).unwrap();
    assert_eq!(field, 0x8100_0000 + 0x80_0000);
    let untouched: u32 = mem.read_obj(GuestAddress(BASE + 0x10)).unwrap();
    assert_eq!(untouched, 0);
    // The compressed image's pages were given back: they read as zeros.
    let gone: [u8; 16] = mem.read_obj(GuestAddress(LOADED.0 + 0x400)).unwrap();
    assert_eq!(gone, [0; 16]);

    // nokaslr: placed at the link-time base, nothing relocated.
    let mem = guest_with(&payload);
    let u = unpack_bzimage(&mem, LOADED, &hdr, None, None)
        .unwrap()
        .unwrap();
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
        unpack_bzimage(&mem, LOADED, &hdr, Some(|| 1), None).unwrap(),
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
        unpack_bzimage(&mem, LOADED, &old, Some(|| 1), None).unwrap(),
        None
    );
    // A loaded image reaching past the preferred address: its decompressor's own code would be
    // under the output.
    let mem = guest_with(&payload);
    let hdr = header(0x400, payload.len());
    let reaching = (LOADED.0, BASE + 0x1000);
    assert_eq!(
        unpack_bzimage(&mem, reaching, &hdr, Some(|| 1), None).unwrap(),
        None
    );
    let kept: [u8; 2] = mem.read_obj(GuestAddress(LOADED.0 + 0x400)).unwrap();
    assert_eq!(kept, GZIP_MAGIC);
    // Too little RAM above the preferred address.
    let small =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (BASE + 0x8000) as usize)]).unwrap();
    small
        .write_slice(&payload, GuestAddress(0x10_0000 + 0x400))
        .unwrap();
    let hdr = header(0x400, payload.len());
    assert_eq!(
        unpack_bzimage(&small, LOADED, &hdr, Some(|| 1), None).unwrap(),
        None
    );
    let untouched: u64 = small.read_obj(GuestAddress(BASE)).unwrap();
    assert_eq!(untouched, 0);
}

#[test]
fn payload_outside_the_loaded_image_is_refused() {
    // Inside guest RAM, but past the end of the loaded image.
    let mem = guest_with(&[0u8; 16]);
    let hdr = header(0x400, (LOADED.1 - LOADED.0) as usize);
    assert!(matches!(
        unpack_bzimage(&mem, LOADED, &hdr, None, None),
        Err(UnpackError::PayloadOutside { .. })
    ));
}

#[test]
fn odd_layout_in_a_bzimage_is_left_to_its_own_decompressor() {
    let payload = gzip(&segments_swapped());
    let mem = guest_with(&payload);
    let hdr = header(0x400, payload.len());
    assert_eq!(
        unpack_bzimage(&mem, LOADED, &hdr, None, None).unwrap(),
        None
    );
    let kept: [u8; 2] = mem.read_obj(GuestAddress(LOADED.0 + 0x400)).unwrap();
    assert_eq!(kept, GZIP_MAGIC, "the compressed image stays for the guest");
    let given_back: [u8; 16] = mem.read_obj(GuestAddress(BASE + 0x1000)).unwrap();
    assert_eq!(
        given_back, [0; 16],
        "the unpacked output's pages were given back"
    );
}

/// A bzImage file: one setup sector after the boot sector, then the protected-mode part with
/// `payload` at 0x400 in it.
fn bzimage_file(payload: &[u8]) -> std::path::PathBuf {
    let mut f = vec![0u8; 1024 + 0x400];
    f[0x1f1] = 1; // setup_sects
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    f[0x211] = 1; // LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    f[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    f[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
    f[0x234] = 1; // relocatable
    f[0x248..0x24c].copy_from_slice(&0x400u32.to_le_bytes());
    f[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    f[0x258..0x260].copy_from_slice(&BASE.to_le_bytes());
    f[0x260..0x264].copy_from_slice(&0x1_0000u32.to_le_bytes());
    f.extend_from_slice(payload);
    let path = std::env::temp_dir().join(format!(
        "bulkhead-unpack-{}-{:?}.bzImage",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&path, f).unwrap();
    path
}

#[test]
fn loaded_bzimage_tells_the_kernel_of_kaslr_only_when_it_was_done() {
    let path = bzimage_file(&gzip(&vmlinux(true)));
    let load = |kaslr: Option<fn() -> u64>| {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let mut file = crate::boot::BootFile::open("kernel", &path).unwrap();
        let kernel = crate::boot::load_kernel(&mem, &mut file, kaslr, Some(40 << 20)).unwrap();
        (mem, kernel)
    };
    let (mem, random) = load(Some(|| 5));
    let flags = random.setup_header.map(|h| h.loadflags).unwrap();
    assert_eq!(flags & KASLR_FLAG, KASLR_FLAG);
    // 40 MiB of initrd leaves 64 - 40 - 16 MiB less the image: 4 places, the kernel takes
    // the second (5 mod 4); with no initrd to leave room for it would take the sixth.
    assert_eq!(random.entry, BASE + 0x20_0000 + ENTRY);
    // And the initrd does fit above it, where load_initrd puts it.
    let initrd_path = path.with_extension("initrd");
    std::fs::File::create(&initrd_path)
        .and_then(|f| f.set_len(40 << 20))
        .unwrap();
    let mut initrd = crate::boot::BootFile::open("initrd", &initrd_path).unwrap();
    let placed = crate::boot::load_initrd(&mem, &mut initrd, 64 << 20, &random).unwrap();
    assert!(
        placed.addr >= random.end,
        "{placed:?} below {:#x}",
        random.end
    );
    let (_, fixed) = load(None);
    let flags = fixed.setup_header.map(|h| h.loadflags).unwrap();
    assert_eq!((flags & KASLR_FLAG, fixed.entry), (0, BASE + ENTRY));
    std::fs::remove_file(path).unwrap();
    std::fs::remove_file(initrd_path).unwrap();
}
