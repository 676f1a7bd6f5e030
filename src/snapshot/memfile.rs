//! Guest RAM to a memory file: each region at its offset (regions one after another in guest
//! address order), written page by page.
//!
//! A full snapshot skips the pages that are all zero. The file has the whole RAM's size, so a
//! skipped page is a hole that reads as zero: a 128 MiB guest that touched 20 MiB costs 20 MiB
//! of disk and of page cache for its clones.
//!
//! A diff snapshot writes the pages that changed since the last snapshot, zero or not, and
//! nothing else: its holes mean "as in the snapshot before", and `bulkhead snapshot rebase`
//! lays its data over that snapshot's memory file (see [`super::rebase`]).

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::vstate::dirty::{page_set, GuestMemoryMmap, PAGE_SIZE as PAGE};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Which pages of guest RAM a memory file gets.
#[derive(Debug, Clone, Copy)]
pub enum Pages<'a> {
    /// Every page with data (a full snapshot).
    All,
    /// The pages set in each region's bitmap, one bit per page (a diff snapshot).
    Dirty(&'a [Vec<u64>]),
}

/// Whether every byte of `page` is zero, eight at a time (a byte loop made a 256 MiB guest's
/// snapshot take seconds in a debug build).
fn is_zero(page: &[u8]) -> bool {
    let mut words = page.chunks_exact(8);
    let zero_words = words
        .by_ref()
        .all(|w| <[u8; 8]>::try_from(w).is_ok_and(|w| u64::from_ne_bytes(w) == 0));
    zero_words && words.remainder().iter().all(|&b| b == 0)
}

/// What writing guest RAM did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryWritten {
    /// The file's size: all of guest RAM.
    pub bytes: u64,
    /// Pages written.
    pub pages_written: u64,
    /// Pages left as holes: zero pages in a full snapshot, unchanged ones in a diff.
    pub pages_skipped: u64,
}

/// Writes `pages` of guest RAM into `file`, which must be empty (the VMM thread has no
/// `ftruncate`: the last page is always written, which gives the file the RAM's size). The
/// vCPUs must be paused and the queue sides idle (they run on the thread calling this).
pub fn write_memory(
    mem: &GuestMemoryMmap,
    file: &File,
    pages: Pages,
) -> std::io::Result<MemoryWritten> {
    let mut done = MemoryWritten {
        bytes: 0,
        pages_written: 0,
        pages_skipped: 0,
    };
    let mut offset = 0u64;
    for (index, region) in mem.iter().enumerate() {
        let len = usize::try_from(region.len())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: the region is a live mapping of `len` bytes that outlives this borrow; the
        // vCPUs are paused and no device runs, so nothing writes it while it is read, and bytes
        // are read as plain data.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr().cast_const(), len) };
        for (i, page) in bytes.chunks(PAGE).enumerate() {
            let at = offset + (i * PAGE) as u64;
            let last = at + page.len() as u64 == offset + len as u64;
            // The last page is always written, so the file has the RAM's size without an
            // ftruncate (in a diff, its current bytes are as right as a hole would be).
            let skip = match pages {
                Pages::All => is_zero(page),
                Pages::Dirty(dirty) => !dirty.get(index).is_some_and(|d| page_set(d, i)),
            };
            if !last && skip {
                done.pages_skipped += 1;
                continue;
            }
            file.write_all_at(page, at)?;
            done.pages_written += 1;
        }
        offset += len as u64;
    }
    done.bytes = offset;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_page_of_zeros_is_zero() {
        let mut page = vec![0u8; PAGE];
        assert!(is_zero(&page));
        for at in [0, 7, 8, PAGE - 1] {
            page[at] = 1;
            assert!(!is_zero(&page), "byte {at}");
            page[at] = 0;
        }
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 3]));
    }
}
