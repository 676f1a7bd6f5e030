//! Which guest pages changed since the last snapshot, for a diff snapshot.
//!
//! Two writers change guest RAM and each is seen by its own log: the guest's vCPUs, whose
//! writes KVM logs per memslot (`KVM_MEM_LOG_DIRTY_PAGES`, read and cleared by
//! `KVM_GET_DIRTY_LOG`), and the VMM's own devices (used rings, the buffers of a block read,
//! received packets, the generation ID), whose writes go through the VMM's own mapping and never
//! through the guest's page tables, so KVM does not see them. [`DirtyPages`] is the second log: a bitmap
//! each guest-RAM region carries, set by every write vm-memory makes. A write through a raw
//! pointer (virtio-blk's `pread` into guest RAM) is not one of those, and marks its range
//! itself. A page is in a diff when either log has it.
//!
//! A VM that does not track dirty pages carries no bitmap at all: its writes pay one branch.

use std::num::NonZeroUsize;

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

/// The page size both logs count in.
pub const PAGE_SIZE: usize = 4096;

/// The VMM's writes to one guest-RAM region, page by page; nothing when the VM does not track
/// dirty pages.
#[derive(Debug, Default)]
pub struct DirtyPages(Option<AtomicBitmap>);

impl DirtyPages {
    /// A log for a region of `len` bytes when `track`, else none.
    pub fn new(track: bool, len: usize) -> DirtyPages {
        const PAGE: NonZeroUsize = match NonZeroUsize::new(PAGE_SIZE) {
            Some(page) => page,
            None => panic!("the page size is not zero"),
        };
        DirtyPages(track.then(|| AtomicBitmap::new(len, PAGE)))
    }

    /// Whether this region's writes are logged.
    pub fn tracking(&self) -> bool {
        self.0.is_some()
    }

    /// The pages written since the last call, one bit per page in 64-bit words (KVM's dirty-log
    /// layout), and the log cleared. Empty when nothing is tracked.
    pub fn take(&self) -> Vec<u64> {
        self.0
            .as_ref()
            .map(AtomicBitmap::get_and_reset)
            .unwrap_or_default()
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyPages {
    type S = Option<RefSlice<'a, AtomicBitmap>>;
}

impl Bitmap for DirtyPages {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.0.mark_dirty(offset, len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.0.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        self.0.slice_at(offset)
    }
}

/// Memory made by vm-memory's own constructors (tests and benches) tracks nothing; the VMM's
/// guest RAM is made by [`super::memory`], which says whether it tracks.
impl NewBitmap for DirtyPages {
    fn with_len(_len: usize) -> DirtyPages {
        DirtyPages(None)
    }
}

/// Guest RAM: vm-memory's mmap backend with the VMM's own dirty log per region.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<DirtyPages>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<DirtyPages>;

/// The VMM's log of `region` (vm-memory's `GuestMemoryRegion::bitmap` gives a slice of it,
/// not the log itself).
pub fn log_of(region: &GuestRegionMmap) -> &DirtyPages {
    vm_memory::MmapRegion::bitmap(region)
}

/// Whether page `page` is set in a bitmap of 64-bit words.
pub fn page_set(words: &[u64], page: usize) -> bool {
    words
        .get(page / 64)
        .is_some_and(|w| w & (1u64 << (page % 64)) != 0)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    use super::*;

    /// Guest RAM as the VMM makes it for a VM that tracks dirty pages.
    fn tracked(len: usize) -> GuestMemoryMmap {
        use crate::vstate::memory::{create_guest_memory, Backing};
        create_guest_memory(len as u64, Backing::Private, true).unwrap()
    }

    #[test]
    fn a_device_write_marks_every_page_it_touches_and_taking_the_log_clears_it() {
        let mem = tracked(16 * PAGE_SIZE);
        let region = mem.iter().next().unwrap();
        assert!(log_of(region).tracking());
        // Three bytes across the boundary of pages 2 and 3, and one byte in page 9.
        mem.write_slice(&[1, 2, 3], GuestAddress(3 * PAGE_SIZE as u64 - 1))
            .unwrap();
        mem.write_obj(7u8, GuestAddress(9 * PAGE_SIZE as u64 + 5))
            .unwrap();
        // Reads are not writes.
        let _: u64 = mem.read_obj(GuestAddress(12 * PAGE_SIZE as u64)).unwrap();
        let words = log_of(region).take();
        let set: Vec<usize> = (0..16).filter(|&p| page_set(&words, p)).collect();
        assert_eq!(set, [2, 3, 9]);
        let again = log_of(region).take();
        assert!((0..16).all(|p| !page_set(&again, p)));
    }

    #[test]
    fn untracked_memory_logs_nothing() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 * PAGE_SIZE)]).unwrap();
        mem.write_obj(1u32, GuestAddress(0)).unwrap();
        let region = mem.iter().next().unwrap();
        assert!(!log_of(region).tracking());
        assert!(log_of(region).take().is_empty());
        assert!(!page_set(&[], 0));
    }
}
