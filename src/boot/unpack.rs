//! Unpacking a bzImage's kernel in the VMM instead of in the guest.
//!
//! A bzImage carries vmlinux compressed, behind a decompressor the guest runs before its
//! kernel. That decompressor does three things: it inflates vmlinux, moves the ELF's segments to
//! their physical addresses, and (KASLR) picks a random virtual base and applies the relocation
//! table appended to vmlinux. bulkhead does all three here, natively and before the vCPUs start,
//! then enters vmlinux's own 64-bit entry point, so the guest skips its slowest few instructions
//! per byte: on the nested lane Debian's LZ4 kernel reached /init about a second sooner.
//!
//! Formats bulkhead has no decoder for (xz, zstd, bzip2, lzma, lzo), an old boot protocol, a
//! kernel that wants its output where the compressed image lies, a machine too small to hold
//! the unpacked kernel, and ELF layouts or relocation tables this code does not expect are
//! left to the guest's own decompressor, as before. KASLR stays as the decompressor does it:
//! a random physical address (a multiple of the kernel's alignment in RAM, leaving room for
//! the initrd above it) and, independently, a random virtual base in the kernel's 1 GiB window
//! with the relocation table applied, both from getrandom(2); `nokaslr` on the command line
//! turns both off, and a kernel that is not relocatable goes where it asks. (A relocatable
//! kernel built without KASLR, so with no table, still gets a random physical address here,
//! where its decompressor would use its preferred one: it runs at any aligned address.) A
//! damaged payload, an ELF that is not x86_64, or a relocation outside the image is refused.

use linux_loader::loader::bootparam::setup_header;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::vstate::dirty::GuestMemoryMmap;

/// Where the kernel's virtual addresses start: virtual `START_KERNEL_MAP + p` is physical `p`
/// before relocation (x86_64's `__START_KERNEL_map`).
const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// The virtual window the kernel image may be placed in with KASLR (x86_64's
/// `KERNEL_IMAGE_SIZE` when `CONFIG_RANDOMIZE_BASE` is set, the only case with a relocation
/// table).
const KERNEL_IMAGE_SIZE: u64 = 1 << 30;
/// `loadflags` bit telling the kernel its virtual base was randomised.
pub const KASLR_FLAG: u8 = 1 << 1;
/// x86_64 runs its kernel only at 2 MiB boundaries (its page tables map it with large pages).
const MIN_ALIGN: u64 = 2 << 20;
/// The boot protocol that added `pref_address` and `init_size` (2.10).
const MIN_PROTOCOL: u16 = 0x020a;
/// The LZ4 legacy format's magic, as the kernel's build writes it (`lz4 -l`).
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const PT_LOAD: u32 = 1;
const EM_X86_64: u16 = 62;

/// Why a bzImage's kernel could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("its compressed kernel lies outside the image ({offset:#x}+{length:#x})")]
    PayloadOutside { offset: u64, length: u64 },
    #[error("its compressed kernel is damaged: {0}")]
    Lz4(#[source] lz4_flex::block::DecompressError),
    #[error("its compressed kernel is damaged: {0}")]
    Lz4Framing(&'static str),
    #[error("its compressed kernel is damaged: {0}")]
    Gzip(#[source] std::io::Error),
    #[error("its compressed kernel unpacks to {got} bytes, but the image says {want}")]
    Size { got: usize, want: usize },
    #[error("its unpacked kernel is not a 64-bit x86 ELF: {0}")]
    Elf(&'static str),
    #[error("its relocation table is damaged: {0}")]
    Relocs(&'static str),
    #[error("its unpacked kernel is laid out as bulkhead does not place it: {0}")]
    Layout(&'static str),
    #[error("its relocation at {addr:#x} is outside the kernel image")]
    RelocOutside { addr: u64 },
}

impl UnpackError {
    /// A kernel bulkhead does not place, but whose own decompressor (which reads its ELF and
    /// relocation table more leniently) may: left to it rather than refused.
    fn left_to_guest(&self) -> bool {
        matches!(self, UnpackError::Layout(_) | UnpackError::Relocs(_))
    }
}

/// A kernel unpacked into guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    /// Physical address of vmlinux's 64-bit entry (`startup_64`).
    pub entry: u64,
    /// Where the kernel starts in guest physical memory.
    pub load_addr: u64,
    /// First byte after everything the kernel will use (its `init_size`) or unpacking wrote.
    pub end: u64,
    /// How far the kernel's virtual base was moved; 0 without KASLR.
    pub virt_offset: u64,
    /// Whether KASLR chose the base (the kernel is told through [`KASLR_FLAG`]).
    pub kaslr: bool,
    pub format: Format,
}

/// A compression bulkhead decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Lz4,
    Gzip,
}

/// Unpacks the bzImage whose protected-mode part linux-loader put at `loaded_at..loaded_end`
/// (with `hdr` its setup header), then gives that part's pages back: nothing runs or reads it
/// any more. `random` gives the bits that place the kernel (asked only of a relocatable
/// kernel); None keeps the kernel's preferred address and link-time base (`nokaslr`).
/// `initrd` is the initrd's size and the highest address it may end at, so a random physical
/// address leaves it room. Ok(None) when this kernel is left to its own decompressor (see the
/// module's comment): the loaded image is then as linux-loader left it, and what unpacking
/// wrote above it is given back (in private RAM; a `--share` VM's memfd keeps it).
// Kept out of its caller: inlined, it grew the boot recipe's code, which every VM runs and the
// text layout list places with the rest of what a VM runs, by code only a bzImage boot runs.
#[inline(never)]
pub fn unpack_bzimage(
    mem: &GuestMemoryMmap,
    (loaded_at, loaded_end): (u64, u64),
    hdr: &setup_header,
    random: Option<fn() -> u64>,
    initrd: Option<(u64, u64)>,
) -> Result<Option<Unpacked>, UnpackError> {
    let (offset, length) = (u64::from(hdr.payload_offset), u64::from(hdr.payload_length));
    if hdr.version < MIN_PROTOCOL || length < 8 {
        return Ok(None);
    }
    let outside = || UnpackError::PayloadOutside { offset, length };
    if offset.saturating_add(length) > loaded_end.saturating_sub(loaded_at) {
        return Err(outside());
    }
    let payload_at = loaded_at + offset;
    let payload = mem
        .get_slice(GuestAddress(payload_at), length as usize)
        .map_err(|_| outside())?;
    let unpacked = {
        let guard = payload.ptr_guard();
        // SAFETY: the slice is `length` bytes of mapped guest memory, valid while `payload`
        // (and so `guard`) lives, which outlives this block; no vCPU runs yet and nothing
        // writes it while it is read here.
        let input = unsafe { std::slice::from_raw_parts(guard.as_ptr(), payload.len()) };
        let Some((format, out_len)) = inspect(input) else {
            return Ok(None);
        };
        let base = hdr.pref_address;
        let span = round_up(out_len.max(hdr.init_size as usize) as u64, 4096);
        let align = u64::from(hdr.kernel_alignment);
        // The output must not overlap the loaded image (the compressed kernel and, after it,
        // the decompressor's own code and data, which run if this falls back), and must start
        // where the kernel can run.
        if base < loaded_end || base % MIN_ALIGN != 0 {
            return Ok(None);
        }
        let relocatable =
            hdr.relocatable_kernel != 0 && align.is_power_of_two() && align >= MIN_ALIGN;
        let random = random.filter(|_| relocatable);
        let load_addr = match random {
            Some(r) => {
                let region_end = mem
                    .find_region(GuestAddress(base))
                    .map_or(base, |region| region.start_addr().0 + region.len());
                choose_phys(r(), base, span, align, region_end, initrd)
            }
            None => base,
        };
        let Ok(window) = mem.get_slice(GuestAddress(load_addr), span as usize) else {
            return Ok(None);
        };
        window.bitmap().mark_dirty(0, window.len());
        let guard_mut = window.ptr_guard_mut();
        // SAFETY: `window` is `span` bytes of mapped guest memory at or above `base`, so
        // disjoint from `input` (checked above); no vCPU runs yet and this is the only
        // reference to it while this block runs.
        let out = unsafe { std::slice::from_raw_parts_mut(guard_mut.as_ptr(), window.len()) };
        let virt = random.map(|r| (r(), align));
        match unpack_into(format, input, out, out_len, base, virt) {
            Ok((entry_offset, image_len, virt_offset)) => Ok(Unpacked {
                entry: load_addr + entry_offset,
                load_addr,
                end: load_addr + span.max(image_len as u64),
                virt_offset: virt_offset.unwrap_or(0),
                kaslr: virt_offset.is_some(),
                format,
            }),
            Err(e) => Err((e, load_addr, load_addr + span)),
        }
    };
    match unpacked {
        Ok(unpacked) => {
            give_back(mem, loaded_at, loaded_end);
            Ok(Some(unpacked))
        }
        Err((e, from, to)) if e.left_to_guest() => {
            log::debug!("bzImage left to its own decompressor: {e}");
            give_back(mem, from, to);
            Ok(None)
        }
        Err((e, ..)) => Err(e),
    }
}

/// Decompresses into `out`, places the segments, and with `virt` (random bits, alignment)
/// moves the virtual base by a random offset when the kernel has a relocation table. Returns
/// the entry's offset from the start of `out`, the image's length, and the offset applied.
fn unpack_into(
    format: Format,
    input: &[u8],
    out: &mut [u8],
    out_len: usize,
    base: u64,
    virt: Option<(u64, u64)>,
) -> Result<(u64, usize, Option<u64>), UnpackError> {
    decompress(format, input, &mut out[..out_len])?;
    let layout = parse_elf(&out[..out_len], out.len(), base)?;
    // The table is read before the segments move: their zero fill may reach over it.
    let relocs = match virt {
        Some(_) if out_len > layout.elf_end => Some(read_relocs(&out[..out_len], layout.elf_end)?),
        _ => None,
    };
    move_segments(out, &layout.segments);
    let applied = match (virt, relocs) {
        (Some((random, align)), Some(relocs)) => {
            let offset = choose_offset(random, base, out.len() as u64, align);
            relocate(out, layout.image_len, base, &relocs, offset)?;
            Some(offset)
        }
        _ => None,
    };
    Ok((layout.entry - base, layout.image_len, applied))
}

/// A physical address for the kernel: a multiple of `align` above `base` where its `span`
/// bytes end below `region_end`, and below the initrd's room when there is one (`initrd`: its
/// size and the address it must end below). `base` when nothing else fits.
fn choose_phys(
    random: u64,
    base: u64,
    span: u64,
    align: u64,
    region_end: u64,
    initrd: Option<(u64, u64)>,
) -> u64 {
    let top = match initrd {
        Some((size, limit)) => region_end.min(limit).saturating_sub(round_up(size, 4096)),
        None => region_end,
    };
    match top.checked_sub(span) {
        Some(last) if last >= base => base + (random % ((last - base) / align + 1)) * align,
        _ => base,
    }
}

/// Drops the pages of `[from, to)` (rounded inwards to pages) from the host's memory, so the
/// guest reads zeros there: 14 MB of compressed Debian kernel (or a fallen-back unpack's
/// output) would otherwise stay resident for the VM's life. Only private anonymous RAM: a
/// file-backed region (a memfd a vhost-user backend shares) keeps its pages, as MADV_DONTNEED
/// would not free them.
fn give_back(mem: &GuestMemoryMmap, from: u64, to: u64) {
    let (from, to) = (round_up(from, 4096), to & !4095);
    if to <= from {
        return;
    }
    let Some(region) = mem.find_region(GuestAddress(from)) else {
        return;
    };
    if region.file_offset().is_some() {
        return;
    }
    let Ok(slice) = mem.get_slice(GuestAddress(from), (to - from) as usize) else {
        return;
    };
    let guard = slice.ptr_guard_mut();
    // SAFETY: the range is whole pages of this private anonymous guest RAM mapping; no vCPU
    // runs yet and no reference into it is held; afterwards the pages read as zeros.
    let rc = unsafe { libc::madvise(guard.as_ptr().cast(), slice.len(), libc::MADV_DONTNEED) };
    if rc != 0 {
        log::debug!(
            "giving back the bzImage's pages: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// The payload's format and unpacked size (the kernel's build appends the size, as 32 bits,
/// to every format), or None for a format bulkhead does not decode.
fn inspect(payload: &[u8]) -> Option<(Format, usize)> {
    let format = if u32_at(payload, 0) == Some(LZ4_LEGACY_MAGIC) {
        Format::Lz4
    } else if payload.starts_with(&GZIP_MAGIC) {
        Format::Gzip
    } else {
        return None;
    };
    let size = u32_at(payload, payload.len().checked_sub(4)?)?;
    Some((format, size as usize))
}

/// Decodes `payload` to exactly `out.len()` bytes.
fn decompress(format: Format, payload: &[u8], out: &mut [u8]) -> Result<(), UnpackError> {
    let want = out.len();
    let got = match format {
        Format::Lz4 => lz4_legacy(payload, out)?,
        Format::Gzip => {
            use std::io::Read;
            let mut decoder = flate2::read::GzDecoder::new(payload);
            let mut got = 0;
            while got < want {
                match decoder.read(&mut out[got..]).map_err(UnpackError::Gzip)? {
                    0 => break,
                    n => got += n,
                }
            }
            // Reading on to the end checks the trailer's CRC and length.
            let mut extra = [0u8; 1];
            if decoder.read(&mut extra).map_err(UnpackError::Gzip)? != 0 {
                return Err(UnpackError::Size {
                    got: want + 1,
                    want,
                });
            }
            got
        }
    };
    if got != want {
        return Err(UnpackError::Size { got, want });
    }
    Ok(())
}

/// LZ4's legacy framing: the magic, then blocks, each after its compressed size; the last
/// four bytes (the appended unpacked size) are no block. Returns the bytes written.
fn lz4_legacy(payload: &[u8], out: &mut [u8]) -> Result<usize, UnpackError> {
    let body = &payload[..payload.len().saturating_sub(4)];
    let (mut at, mut written) = (4usize, 0usize);
    while at < body.len() {
        let size = u32_at(body, at).ok_or(UnpackError::Lz4Framing("a block size is cut short"))?;
        at += 4;
        // Concatenated streams each start with the magic again.
        if size == LZ4_LEGACY_MAGIC {
            continue;
        }
        let block = body
            .get(at..at.saturating_add(size as usize))
            .ok_or(UnpackError::Lz4Framing("a block runs past the end"))?;
        written += lz4_flex::block::decompress_into(block, &mut out[written..])
            .map_err(UnpackError::Lz4)?;
        at += size as usize;
    }
    Ok(written)
}

/// Where vmlinux's loadable segments go.
#[derive(Debug)]
struct ElfLayout {
    entry: u64,
    segments: Vec<Segment>,
    /// First byte after everything the ELF file holds (the relocation table follows).
    elf_end: usize,
    /// Bytes from `base` to the end of the last segment in memory.
    image_len: usize,
}

/// One PT_LOAD segment: `filesz` bytes from `offset` in the file go to `dest` (from `base`),
/// then zeros up to `dest_end`.
#[derive(Debug, Clone, Copy)]
struct Segment {
    offset: usize,
    filesz: usize,
    dest: usize,
    dest_end: usize,
}

/// The relocation table the kernel's build appends to vmlinux: addresses (32-bit,
/// sign-extended) of 32-bit fields, of inverse 32-bit fields and of 64-bit fields.
#[derive(Debug, Default, PartialEq, Eq)]
struct Relocs {
    r32: Vec<u32>,
    inverse32: Vec<u32>,
    r64: Vec<u32>,
}

/// Reads the ELF header and program headers of `elf` (the unpacked file), for segments placed
/// at `p_paddr - base` in a window of `room` bytes.
fn parse_elf(elf: &[u8], room: usize, base: u64) -> Result<ElfLayout, UnpackError> {
    if !elf.starts_with(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(UnpackError::Elf("no 64-bit little-endian ELF header"));
    }
    if u16_at(elf, 0x12) != Some(EM_X86_64) {
        return Err(UnpackError::Elf("not for x86_64"));
    }
    let field = |v: Option<u64>| v.ok_or(UnpackError::Elf("header truncated"));
    let entry = field(u64_at(elf, 0x18))?;
    let phoff = field(u64_at(elf, 0x20))? as usize;
    let shoff = field(u64_at(elf, 0x28))? as usize;
    let phentsize = field(u16_at(elf, 0x36).map(u64::from))? as usize;
    let phnum = field(u16_at(elf, 0x38).map(u64::from))? as usize;
    let shentsize = field(u16_at(elf, 0x3a).map(u64::from))? as usize;
    let shnum = field(u16_at(elf, 0x3c).map(u64::from))? as usize;
    if phentsize < 56 {
        return Err(UnpackError::Elf("program headers too small"));
    }
    let mut elf_end = phoff.saturating_add(phentsize * phnum);
    elf_end = elf_end.max(shoff.saturating_add(shentsize * shnum));
    let mut segments: Vec<Segment> = Vec::new();
    for i in 0..phnum {
        let ph = phoff.saturating_add(i * phentsize);
        let get = |at: usize| {
            u64_at(elf, ph.saturating_add(at)).ok_or(UnpackError::Elf("program header truncated"))
        };
        if get(0)? as u32 != PT_LOAD {
            continue;
        }
        let (offset, paddr, filesz, memsz) = (get(8)?, get(24)?, get(32)?, get(40)?);
        let dest = paddr.checked_sub(base).ok_or(UnpackError::Layout(
            "a segment lies below the kernel's load address",
        ))?;
        let src_end = offset
            .checked_add(filesz)
            .filter(|&e| e <= elf.len() as u64)
            .ok_or(UnpackError::Elf("a segment lies outside the file"))?;
        let dest_end = dest
            .checked_add(memsz)
            .filter(|&e| e <= room as u64 && memsz >= filesz)
            .ok_or(UnpackError::Layout(
                "a segment is larger than the kernel's init_size",
            ))?;
        // Each segment moves down, and in file and memory order: copying them one after
        // another then never overwrites a segment not yet copied, and no zero fill (done after
        // all copies) lands on another segment.
        let ordered = segments.last().map_or(true, |p| {
            p.offset + p.filesz <= offset as usize && p.dest_end <= dest as usize
        });
        if dest > offset || !ordered {
            return Err(UnpackError::Layout("segments out of order"));
        }
        elf_end = elf_end.max(src_end as usize);
        segments.push(Segment {
            offset: offset as usize,
            filesz: filesz as usize,
            dest: dest as usize,
            dest_end: dest_end as usize,
        });
    }
    let image_len = segments
        .last()
        .map(|s| s.dest_end)
        .ok_or(UnpackError::Elf("no loadable segment"))?;
    if entry
        .checked_sub(base)
        .map_or(true, |e| e >= image_len as u64)
    {
        return Err(UnpackError::Elf("the entry point is outside the image"));
    }
    Ok(ElfLayout {
        entry,
        segments,
        elf_end,
        image_len,
    })
}

/// Moves each segment from its file offset to its place (all copies first, then the zero
/// fills), as the guest's decompressor does.
fn move_segments(out: &mut [u8], segments: &[Segment]) {
    for s in segments {
        out.copy_within(s.offset..s.offset + s.filesz, s.dest);
    }
    for s in segments {
        out[s.dest + s.filesz..s.dest_end].fill(0);
    }
}

/// Reads the relocation table backwards from the end of `unpacked` down to `elf_end`: 32-bit
/// entries, then a zero, inverse 32-bit entries and a zero, 64-bit entries and a zero, which
/// must end exactly where the ELF does (the build appends the table right after it).
fn read_relocs(unpacked: &[u8], elf_end: usize) -> Result<Relocs, UnpackError> {
    let mut lists: [Vec<u32>; 3] = Default::default();
    let mut at = unpacked.len();
    for list in &mut lists {
        loop {
            at = at
                .checked_sub(4)
                .filter(|&a| a >= elf_end)
                .ok_or(UnpackError::Relocs("it runs into the kernel image"))?;
            match u32_at(unpacked, at) {
                Some(0) => break,
                Some(entry) => list.push(entry),
                None => return Err(UnpackError::Relocs("truncated")),
            }
        }
    }
    if at != elf_end {
        return Err(UnpackError::Relocs("it does not end where vmlinux does"));
    }
    let [r32, inverse32, r64] = lists;
    Ok(Relocs {
        r32,
        inverse32,
        r64,
    })
}

/// A KASLR offset from `random`: a multiple of the kernel's alignment that keeps the image
/// (of `image_size` bytes from `base`) inside the kernel's virtual window, each equally likely
/// but for the modulo's negligible bias.
fn choose_offset(random: u64, base: u64, image_size: u64, align: u64) -> u64 {
    if !align.is_power_of_two() || align < MIN_ALIGN {
        return 0;
    }
    let Some(room) = KERNEL_IMAGE_SIZE
        .checked_sub(image_size)
        .and_then(|top| top.checked_sub(base))
    else {
        return 0;
    };
    let slots = room / align + 1;
    (random % slots) * align
}

/// Adds `offset` to every relocated field of the image (`image_len` bytes at `base`).
fn relocate(
    out: &mut [u8],
    image_len: usize,
    base: u64,
    relocs: &Relocs,
    offset: u64,
) -> Result<(), UnpackError> {
    if offset == 0 {
        return Ok(());
    }
    let image = &mut out[..image_len];
    let field = |entry: u32, width: usize| {
        // Sign-extended, the entry is the field's link-time virtual address.
        let addr = entry as i32 as i64 as u64;
        addr.wrapping_sub(START_KERNEL_MAP)
            .checked_sub(base)
            .map(|at| at as usize)
            .filter(|&at| at.checked_add(width).is_some_and(|end| end <= image_len))
            .ok_or(UnpackError::RelocOutside { addr })
    };
    for &entry in &relocs.r32 {
        let at = field(entry, 4)?;
        let v = u32_at(image, at)
            .unwrap_or_default()
            .wrapping_add(offset as u32);
        image[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    for &entry in &relocs.inverse32 {
        let at = field(entry, 4)?;
        let v = u32_at(image, at)
            .unwrap_or_default()
            .wrapping_sub(offset as u32);
        image[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    for &entry in &relocs.r64 {
        let at = field(entry, 8)?;
        let v = u64_at(image, at).unwrap_or_default().wrapping_add(offset);
        image[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    Ok(())
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
mod tests;
