//! Unpacking a bzImage's kernel in the VMM instead of in the guest.
//!
//! A bzImage carries vmlinux compressed, behind a decompressor the guest runs before its
//! kernel. That decompressor does three things: it inflates vmlinux, moves the ELF's segments to
//! their physical addresses, and (KASLR) picks a random virtual base and applies the relocation
//! table appended to vmlinux. bulkhead does all three here, natively and before the vCPUs start,
//! then enters vmlinux's own 64-bit entry point, so the guest skips its slowest few instructions
//! per byte: on the nested lane Debian's LZ4 kernel reached /init about a second sooner.
//!
//! Formats bulkhead has no decoder for (xz, zstd, bzip2, lzma, lzo), kernels that want the
//! output where the compressed image lies, and machines too small to hold the unpacked kernel
//! at its preferred address are left to the guest's own decompressor, as before. KASLR stays:
//! the virtual base is chosen with getrandom(2) in the same range the decompressor uses, and
//! `nokaslr` on the command line turns it off as it would there. The physical address is the
//! kernel's preferred one (the decompressor would also randomise it; the guest's physical
//! layout is not secret from the host, and the kernel still randomises its direct map itself).

use linux_loader::loader::bootparam::setup_header;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};

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
    Gzip(#[source] std::io::Error),
    #[error("its compressed kernel unpacks to {got} bytes, but the image says {want}")]
    Size { got: usize, want: usize },
    #[error("its unpacked kernel is not a 64-bit x86 ELF: {0}")]
    Elf(&'static str),
    #[error("its relocation table is damaged: {0}")]
    Relocs(&'static str),
    #[error("its relocation at {addr:#x} is outside the kernel image")]
    RelocOutside { addr: u64 },
}

/// A kernel unpacked into guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    /// Physical address of vmlinux's 64-bit entry (`startup_64`).
    pub entry: u64,
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
/// (with `hdr` its setup header) to the kernel's preferred address, then gives that part's
/// pages back: nothing runs or reads it any more. `random` gives the bits that pick the KASLR
/// base (asked only of a relocatable kernel); None keeps the link-time base (`nokaslr`). Ok(None) when this kernel is left to its own decompressor
/// (see the module's comment); nothing has then been written.
pub fn unpack_bzimage(
    mem: &GuestMemoryMmap,
    (loaded_at, loaded_end): (u64, u64),
    hdr: &setup_header,
    random: Option<fn() -> u64>,
) -> Result<Option<Unpacked>, UnpackError> {
    let (version, offset, length) = (
        hdr.version,
        u64::from(hdr.payload_offset),
        u64::from(hdr.payload_length),
    );
    if version < MIN_PROTOCOL || length < 8 {
        return Ok(None);
    }
    let payload_at = loaded_at + offset;
    let outside = || UnpackError::PayloadOutside { offset, length };
    let payload = mem
        .get_slice(GuestAddress(payload_at), length as usize)
        .map_err(|_| outside())?;
    let guard = payload.ptr_guard();
    // SAFETY: the slice is `length` bytes of mapped guest memory, valid while `payload` (and
    // so `guard`) lives; no vCPU runs yet and nothing else writes it while it is read here.
    let input = unsafe { std::slice::from_raw_parts(guard.as_ptr(), payload.len()) };
    let Some((format, out_len)) = inspect(input) else {
        return Ok(None);
    };
    let base = hdr.pref_address;
    let span = round_up(out_len.max(hdr.init_size as usize) as u64, 4096);
    // The output must not overlap the compressed input, and must fit in one RAM region.
    if base < payload_at + length {
        return Ok(None);
    }
    let Ok(window) = mem.get_slice(GuestAddress(base), span as usize) else {
        return Ok(None);
    };
    window.bitmap().mark_dirty(0, window.len());
    let guard_mut = window.ptr_guard_mut();
    // SAFETY: `window` is `span` bytes of mapped guest memory disjoint from `input` (checked
    // above); no vCPU runs yet and this is the only reference to it while this function runs.
    let out = unsafe { std::slice::from_raw_parts_mut(guard_mut.as_ptr(), window.len()) };
    decompress(format, input, &mut out[..out_len])?;
    let placed = place_segments(out, out_len, base)?;
    let relocatable = hdr.relocatable_kernel != 0 && !placed.relocs.is_empty();
    let (virt_offset, kaslr) = match random {
        Some(r) if relocatable => (choose_offset(r(), base, span, hdr.kernel_alignment), true),
        _ => (0, false),
    };
    relocate(out, placed.image_len, base, &placed.relocs, virt_offset)?;
    give_back(mem, loaded_at, loaded_end.min(base));
    Ok(Some(Unpacked {
        entry: placed.entry,
        end: base + span.max(placed.image_len as u64),
        virt_offset,
        kaslr,
        format,
    }))
}

/// Drops the pages of `[from, to)` (rounded inwards to pages) from the host's memory, so the
/// guest reads zeros there: 14 MB of compressed Debian kernel would otherwise stay resident for
/// the VM's life. Only private anonymous RAM: a file-backed region (a memfd a vhost-user backend
/// shares) keeps its pages, as MADV_DONTNEED would not free them.
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
    let body = &payload[..payload.len() - 4];
    let (mut at, mut written) = (4usize, 0usize);
    while at < body.len() {
        let size = u32_at(body, at).ok_or(UnpackError::Size {
            got: written,
            want: out.len(),
        })?;
        at += 4;
        // Concatenated streams each start with the magic again.
        if size == LZ4_LEGACY_MAGIC {
            continue;
        }
        let block = body
            .get(at..at.saturating_add(size as usize))
            .ok_or(UnpackError::Lz4(
                lz4_flex::block::DecompressError::ExpectedAnotherByte,
            ))?;
        written += lz4_flex::block::decompress_into(block, &mut out[written..])
            .map_err(UnpackError::Lz4)?;
        at += size as usize;
    }
    Ok(written)
}

/// vmlinux laid out at its physical addresses.
#[derive(Debug)]
struct Placed {
    entry: u64,
    /// Bytes from `base` to the end of the last segment.
    image_len: usize,
    relocs: Relocs,
}

/// The relocation table the kernel's build appends to vmlinux: addresses (32-bit,
/// sign-extended) of 32-bit fields, of inverse 32-bit fields and of 64-bit fields.
#[derive(Debug, Default, PartialEq, Eq)]
struct Relocs {
    r32: Vec<u32>,
    inverse32: Vec<u32>,
    r64: Vec<u32>,
}

impl Relocs {
    fn is_empty(&self) -> bool {
        self.r32.is_empty() && self.inverse32.is_empty() && self.r64.is_empty()
    }
}

/// Reads the relocation table from `out[elf_end..out_len]` and moves each PT_LOAD segment of
/// the ELF in `out` from its file offset to `p_paddr - base`, as the guest's decompressor does.
fn place_segments(out: &mut [u8], out_len: usize, base: u64) -> Result<Placed, UnpackError> {
    let elf = &out[..out_len];
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
    let mut elf_end = phoff.saturating_add(phentsize.saturating_mul(phnum));
    elf_end = elf_end.max(shoff.saturating_add(shentsize.saturating_mul(shnum)));
    // (file offset, destination offset, file size, memory size) of each PT_LOAD.
    let mut segments = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let bad = UnpackError::Elf("program header truncated");
        if u32_at(elf, ph).ok_or(bad)? != PT_LOAD {
            continue;
        }
        let get = |at| u64_at(elf, ph + at).ok_or(UnpackError::Elf("program header truncated"));
        let (offset, paddr, filesz, memsz) = (get(8)?, get(24)?, get(32)?, get(40)?);
        let dest = paddr.checked_sub(base).ok_or(UnpackError::Elf(
            "a segment lies below the kernel's load address",
        ))?;
        let src_end = offset
            .checked_add(filesz)
            .filter(|&e| e <= out_len as u64)
            .ok_or(UnpackError::Elf("a segment lies outside the file"))?;
        let dest_end = dest
            .checked_add(memsz)
            .filter(|&e| e <= out.len() as u64 && memsz >= filesz)
            .ok_or(UnpackError::Elf(
                "a segment is larger than the kernel's init_size",
            ))?;
        // Moving down in file order never overwrites a segment not yet moved; anything else
        // would need a scratch copy the guest's decompressor does not make either.
        if dest > offset || segments.last().is_some_and(|&(o, _, f, _)| o + f > offset) {
            return Err(UnpackError::Elf("segments out of order"));
        }
        elf_end = elf_end.max(src_end as usize);
        segments.push((offset, dest, filesz, dest_end));
    }
    if segments.is_empty() {
        return Err(UnpackError::Elf("no loadable segment"));
    }
    let relocs = read_relocs(&out[..out_len], elf_end)?;
    let mut image_len = 0;
    for (offset, dest, filesz, dest_end) in segments {
        let (offset, dest, filesz) = (offset as usize, dest as usize, filesz as usize);
        out.copy_within(offset..offset + filesz, dest);
        out[dest + filesz..dest_end as usize].fill(0);
        image_len = image_len.max(dest_end as usize);
    }
    if entry
        .checked_sub(base)
        .map_or(true, |e| e >= image_len as u64)
    {
        return Err(UnpackError::Elf("the entry point is outside the image"));
    }
    Ok(Placed {
        entry,
        image_len,
        relocs,
    })
}

/// Reads the relocation table backwards from the end of `unpacked` down to `elf_end`: 32-bit
/// entries, then a zero, inverse 32-bit entries and a zero, 64-bit entries and a zero. No bytes
/// after the ELF means no table (a kernel built without `CONFIG_RANDOMIZE_BASE`).
fn read_relocs(unpacked: &[u8], elf_end: usize) -> Result<Relocs, UnpackError> {
    if unpacked.len() <= elf_end {
        return Ok(Relocs::default());
    }
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
fn choose_offset(random: u64, base: u64, image_size: u64, alignment: u32) -> u64 {
    let align = u64::from(alignment);
    if !align.is_power_of_two() || align < 4096 {
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
