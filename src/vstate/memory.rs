//! Dedicated guest RAM for one VM.
//!
//! RAM is private anonymous memory of this process (`MAP_PRIVATE | MAP_ANONYMOUS |
//! MAP_NORESERVE`): no file or fd exists through which another process could map it. The
//! mappings are excluded from core dumps (`MADV_DONTDUMP`: tenant data must not land in a host
//! crash dump) and from children (`MADV_DONTFORK`), and are never KSM candidates
//! (`MADV_UNMERGEABLE`, so a process-wide `PR_SET_MEMORY_MERGE` or a later change can not make
//! tenant pages shareable across VMs, a cross-tenant side channel).
//!
//! It was a sealed memfd before; a Linux guest in the nested lane booted about 10% slower on
//! it (shmem's fault path against anonymous memory's), and the seals guarded nothing an
//! anonymous mapping exposes.
//!
//! A vhost-user backend (virtiofsd, for a virtio-fs share) must map guest RAM itself, so a VM
//! with one gets [`Backing::Shared`]: one memfd for all of RAM, mapped shared, sealed against
//! shrinking and growing (a backend given the descriptor can not truncate it under the VMM),
//! with the same dump, fork and merge advice. Only such a VM pays shmem's fault path, and its
//! isolation report says which backing it has.

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::dirty::{DirtyPages, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::x86_64::layout;

/// Errors while creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest RAM at guest address {addr:#x}: {source}")]
    Map {
        addr: u64,
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest RAM region at {0:#x} does not fit the guest address space")]
    Region(u64),
    #[error("guest RAM regions overlap: {0}")]
    Collection(#[from] vm_memory::GuestRegionCollectionError),
    #[error("{what} for shared guest RAM failed: {source}")]
    Memfd {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the memory file is {size} bytes, but the snapshot's RAM is {wanted}")]
    SnapshotSize { size: u64, wanted: u64 },
    #[error("madvise({advice}) on guest RAM failed: {source}")]
    Madvise {
        advice: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What guest RAM is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backing {
    /// Private anonymous memory: no descriptor exists through which another process could
    /// map it.
    #[default]
    Private,
    /// A sealed memfd mapped shared, whose descriptor a vhost-user backend is given.
    Shared,
}

/// Creates `mem_bytes` of zeroed guest RAM laid out around the MMIO gap; with `track_dirty`,
/// each region logs the VMM's writes to it (see [`super::dirty`]).
pub fn create_guest_memory(
    mem_bytes: u64,
    backing: Backing,
    track_dirty: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    let memfd = match backing {
        Backing::Private => None,
        Backing::Shared => Some(std::sync::Arc::new(sealed_memfd(mem_bytes)?)),
    };
    map_regions(
        mem_bytes,
        memfd,
        libc::MAP_SHARED | libc::MAP_NORESERVE,
        track_dirty,
    )
}

/// Guest RAM from a snapshot's memory file, mapped `MAP_PRIVATE`: the guest's writes stay its
/// own, and what it only reads is the page cache's, shared by every clone of the snapshot.
pub fn map_snapshot(
    mem_bytes: u64,
    file: std::fs::File,
    track_dirty: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    let size = file
        .metadata()
        .map_err(|source| MemoryError::Memfd {
            what: "fstat of the memory file",
            source,
        })?
        .len();
    if size != mem_bytes {
        return Err(MemoryError::SnapshotSize {
            size,
            wanted: mem_bytes,
        });
    }
    map_regions(
        mem_bytes,
        Some(std::sync::Arc::new(file)),
        libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        track_dirty,
    )
}

/// Maps each RAM region: anonymous memory without `file`, else the file's bytes at the
/// region's offset (regions one after another) with `file_flags`.
fn map_regions(
    mem_bytes: u64,
    memfd: Option<std::sync::Arc<std::fs::File>>,
    file_flags: i32,
    track_dirty: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (guest_addr, size) in layout::ram_regions(mem_bytes) {
        let len = usize::try_from(size).map_err(|_| MemoryError::Region(guest_addr))?;
        let (file, flags) = match &memfd {
            None => (
                None,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            ),
            Some(fd) => (Some(FileOffset::from_arc(fd.clone(), offset)), file_flags),
        };
        offset += size;
        let mut builder =
            MmapRegionBuilder::new_with_bitmap(len, DirtyPages::new(track_dirty, len))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags);
        if let Some(file) = file {
            builder = builder.with_file_offset(file);
        }
        let mapping = builder.build().map_err(|source| MemoryError::Map {
            addr: guest_addr,
            size,
            source,
        })?;
        advise(mapping.as_ptr(), len)?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(guest_addr))
            .ok_or(MemoryError::Region(guest_addr))?;
        regions.push(region);
    }
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

/// One memfd of `bytes`, sealed against shrinking, growing and further seals.
fn sealed_memfd(bytes: u64) -> Result<std::fs::File, MemoryError> {
    let fail = |what| {
        let source = std::io::Error::last_os_error();
        move || MemoryError::Memfd { what, source }
    };
    // SAFETY: memfd_create with a NUL-terminated name and flags; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"bulkhead-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(fail("memfd_create")());
    }
    // SAFETY: memfd_create returned a new descriptor this process now owns alone.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(bytes).map_err(|source| MemoryError::Memfd {
        what: "ftruncate",
        source,
    })?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl(F_ADD_SEALS) on the memfd just made, with an integer argument.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } != 0 {
        return Err(fail("F_ADD_SEALS")());
    }
    Ok(file)
}

fn advise(addr: *mut u8, len: usize) -> Result<(), MemoryError> {
    for (advice, name) in [
        (libc::MADV_DONTDUMP, "MADV_DONTDUMP"),
        (libc::MADV_DONTFORK, "MADV_DONTFORK"),
        (libc::MADV_UNMERGEABLE, "MADV_UNMERGEABLE"),
    ] {
        // SAFETY: [addr, addr+len) is a mapping we just created and own; these advices change
        // only dump, fork and KSM behaviour, never the contents or validity of the pages.
        let rc = unsafe { libc::madvise(addr.cast(), len, advice) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            // Kernels built without KSM reject MADV_UNMERGEABLE; with no KSM there is
            // nothing to opt out of.
            if advice == libc::MADV_UNMERGEABLE && err.raw_os_error() == Some(libc::EINVAL) {
                continue;
            }
            return Err(MemoryError::Madvise {
                advice: name,
                source: err,
            });
        }
    }
    Ok(())
}

/// Host address and size of each region, for memslots and reports.
pub fn host_regions(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u64)> {
    mem.iter()
        .map(|r| (r.start_addr().0, r.len(), r.as_ptr() as u64))
        .collect()
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    fn smaps_flags_for(addr: u64) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
                    {
                        inside = lo <= addr && addr < hi;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return Some(flags.trim().to_string());
                }
            }
        }
        None
    }

    #[test]
    fn guest_ram_is_zeroed_and_split_around_the_gap() {
        let mem = create_guest_memory(64 << 20, Backing::Private, false).unwrap();
        assert_eq!(mem.num_regions(), 1);
        let mut buf = [0xffu8; 4096];
        for addr in [0u64, 0x10_0000, (64 << 20) - 4096] {
            mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            assert!(buf.iter().all(|&b| b == 0));
        }
        // A big VM: only the address space is reserved (MAP_NORESERVE), nothing is touched.
        let big = create_guest_memory((4 << 30) + (64 << 20), Backing::Private, false).unwrap();
        let regions = host_regions(&big);
        assert_eq!(regions.len(), 2);
        assert_eq!((regions[0].0, regions[0].1), (0, layout::MMIO_GAP_START));
        assert_eq!(
            (regions[1].0, regions[1].1),
            (layout::MMIO_GAP_END, (64 << 20) + (1 << 30))
        );
    }

    #[test]
    fn guest_ram_is_private_anonymous_undumpable_unforkable_and_not_mergeable() {
        let mem = create_guest_memory(16 << 20, Backing::Private, false).unwrap();
        let host = host_regions(&mem)[0].2;
        let flags = smaps_flags_for(host).expect("mapping not found in smaps");
        let flags: Vec<&str> = flags.split_whitespace().collect();
        for want in ["dd", "dc"] {
            assert!(flags.contains(&want), "missing {want} in {flags:?}");
        }
        for unwanted in ["sh", "mg"] {
            assert!(
                !flags.contains(&unwanted),
                "mapping has {unwanted} (shared or KSM-mergeable): {flags:?}"
            );
        }
    }

    #[test]
    fn shared_guest_ram_is_one_sealed_memfd_a_backend_sees_the_guests_writes_through() {
        use std::os::unix::fs::FileExt;
        let size = (4 << 30) + (16 << 20);
        let mem = create_guest_memory(size, Backing::Shared, false).unwrap();
        let regions: Vec<_> = mem.iter().collect();
        assert_eq!(regions.len(), 2);
        let (low, high) = (regions[0], regions[1]);
        let low_fd = low.file_offset().expect("no file").file();
        let high_fd = high.file_offset().expect("no file").file();
        assert!(std::ptr::eq(low_fd, high_fd), "one memfd for all RAM");
        assert_eq!(low.file_offset().unwrap().start(), 0);
        assert_eq!(high.file_offset().unwrap().start(), low.len());
        // What the guest writes high up is what a backend reads from the descriptor.
        mem.write_slice(b"virtio-fs", GuestAddress(layout::MMIO_GAP_END))
            .unwrap();
        let mut seen = [0u8; 9];
        low_fd.read_exact_at(&mut seen, low.len()).unwrap();
        assert_eq!(&seen, b"virtio-fs");
        // A backend given the descriptor can not shrink it under the VMM.
        assert!(low_fd.set_len(4096).is_err());
        let flags = smaps_flags_for(high.as_ptr() as u64).expect("mapping not in smaps");
        let flags: Vec<&str> = flags.split_whitespace().collect();
        for want in ["sh", "dd", "dc"] {
            assert!(flags.contains(&want), "missing {want} in {flags:?}");
        }
    }
}
