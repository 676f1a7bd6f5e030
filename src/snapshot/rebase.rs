//! `bulkhead snapshot rebase`: a diff snapshot's memory file laid over the memory file of the
//! snapshot it follows, written out as a new full memory file for the diff's state file to load
//! with.
//!
//! A diff's data is exactly the pages that changed and its holes are the pages that did not
//! (see [`super::memfile`]), so the result is the base's data with the diff's data written over
//! it. Neither input is written: clones may be mapping the base, and the result goes through a
//! temporary file renamed into place, so `--out` may name the base itself.
//!
//! Holes are read with `SEEK_DATA`/`SEEK_HOLE`, so a diff is only as good as its holes. Two
//! ways to lose them are caught: a diff that is sparse on disk but shows no hole (a filesystem
//! that does not report holes), and one whose filesystem prefers blocks larger than a page (a
//! block's unchanged pages would read as data). Others are not: a diff copied densely (its
//! unchanged pages become zero data and overwrite the base), or copied with zero runs punched
//! into holes (`cp --sparse=always`, `rsync -S`: the base's old bytes survive where the guest
//! wrote zeros). A diff must stay as the VMM wrote it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::client::{ClientError, NewFile};
use crate::vstate::dirty::PAGE_SIZE;

/// Why a rebase was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RebaseError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the base is {base} bytes and the diff {diff}: a diff is laid over the memory file of the same VM's snapshot before it, which has its size")]
    Size { base: u64, diff: u64 },
    #[error("{}: its filesystem does not report holes (or its blocks of {block} bytes are larger than a page), so a diff's unchanged pages can not be told from its data; keep diffs on ext4, xfs, btrfs or tmpfs", path.display())]
    NoHoles { path: PathBuf, block: u64 },
    #[error("cannot write the rebased memory file {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Create(#[from] ClientError),
}

/// What a rebase wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebased {
    /// The memory file's size: all of guest RAM.
    pub bytes: u64,
    /// Bytes of data taken from the base.
    pub from_base: u64,
    /// Bytes of data taken from the diff.
    pub from_diff: u64,
}

/// The data extents of `file` (of `len` bytes), as (offset, length).
fn data_extents(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let seek = |at: u64, whence| -> std::io::Result<Option<u64>> {
        let at = libc::off_t::try_from(at)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: lseek on a descriptor this function borrows; it moves only the file offset,
        // which nothing else here uses (reads are positional).
        let r = unsafe { libc::lseek(fd, at, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data at or after `at`.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(u64::try_from(r).ok())
    };
    let mut extents = Vec::new();
    let mut at = 0;
    while at < len {
        let Some(start) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        if end <= start {
            break;
        }
        extents.push((start, end - start));
        at = end;
    }
    Ok(extents)
}

/// Copies `extents` of `from` (at `from_path`) to the same offsets of `to` (at `to_path`).
fn copy_extents(
    (from, from_path): (&File, &Path),
    (to, to_path): (&File, &Path),
    extents: &[(u64, u64)],
) -> Result<u64, RebaseError> {
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0;
    for &(start, len) in extents {
        let mut done = 0;
        while done < len {
            let n = usize::try_from((len - done).min(buf.len() as u64)).unwrap_or(buf.len());
            let chunk = buf.get_mut(..n).unwrap_or_default();
            from.read_exact_at(chunk, start + done)
                .map_err(|source| RebaseError::Read {
                    path: from_path.to_path_buf(),
                    source,
                })?;
            to.write_all_at(chunk, start + done)
                .map_err(|source| RebaseError::Write {
                    path: to_path.to_path_buf(),
                    source,
                })?;
            done += n as u64;
        }
        copied += len;
    }
    Ok(copied)
}

/// Lays the diff memory file `diff` over `base` into a new file at `out` (mode 0600).
pub fn rebase(base: &Path, diff: &Path, out: &Path) -> Result<Rebased, RebaseError> {
    let open = |path: &Path| {
        let read = |source| RebaseError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(read)?;
        let meta = file.metadata().map_err(read)?;
        Ok::<_, RebaseError>((file, meta))
    };
    let (base_file, base_meta) = open(base)?;
    let (diff_file, diff_meta) = open(diff)?;
    if base_meta.len() != diff_meta.len() {
        return Err(RebaseError::Size {
            base: base_meta.len(),
            diff: diff_meta.len(),
        });
    }
    let len = diff_meta.len();
    let extents = |file: &File, path: &Path| {
        data_extents(file, len).map_err(|source| RebaseError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let diff_data = extents(&diff_file, diff)?;
    let data: u64 = diff_data.iter().map(|e| e.1).sum();
    let allocated = diff_meta.blocks().saturating_mul(512);
    if diff_meta.blksize() > PAGE_SIZE as u64 || (data >= len && allocated < len) {
        return Err(RebaseError::NoHoles {
            path: diff.to_path_buf(),
            block: diff_meta.blksize(),
        });
    }
    let base_data = extents(&base_file, base)?;
    let new = NewFile::create(out)?;
    new.file()
        .set_len(len)
        .map_err(|source| RebaseError::Write {
            path: out.to_path_buf(),
            source,
        })?;
    let from_base = copy_extents((&base_file, base), (new.file(), out), &base_data)?;
    let from_diff = copy_extents((&diff_file, diff), (new.file(), out), &diff_data)?;
    new.commit()?;
    Ok(Rebased {
        bytes: len,
        from_base,
        from_diff,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = PAGE_SIZE as u64;

    /// A fresh directory of this test's own, removed when dropped.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let dir =
                std::env::temp_dir().join(format!("bulkhead-rebase-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn sparse(path: &Path, len: u64, pages: &[(u64, u8)]) {
        let f = File::create(path).unwrap();
        f.set_len(len).unwrap();
        for &(page, byte) in pages {
            f.write_all_at(&vec![byte; PAGE_SIZE], page * PAGE).unwrap();
        }
    }

    fn page_of(file: &Path, page: u64) -> Vec<u8> {
        let mut buf = vec![0xeeu8; PAGE_SIZE];
        File::open(file)
            .unwrap()
            .read_exact_at(&mut buf, page * PAGE)
            .unwrap();
        buf
    }

    #[test]
    fn the_diffs_pages_win_even_zero_ones_and_its_holes_keep_the_base() {
        let dir = Dir::new("layers");
        let (base, diff, out) = (
            dir.path().join("base"),
            dir.path().join("diff"),
            dir.path().join("out"),
        );
        let len = 64 * PAGE;
        sparse(&base, len, &[(1, 0xb1), (2, 0xb2), (40, 0xb4)]);
        // Page 2 became zero, page 5 is new, the last page is always in a diff.
        sparse(&diff, len, &[(2, 0), (5, 0xd5), (63, 0)]);
        let done = rebase(&base, &diff, &out).unwrap();
        assert_eq!(done.bytes, len);
        assert_eq!(done.from_diff, 3 * PAGE);
        assert_eq!(std::fs::metadata(&out).unwrap().len(), len);
        for (page, byte) in [(0, 0), (1, 0xb1), (2, 0), (5, 0xd5), (40, 0xb4), (63, 0)] {
            assert!(
                page_of(&out, page).iter().all(|&b| b == byte),
                "page {page} should be {byte:#x}"
            );
        }
        // The base is untouched, and the result may replace it.
        assert!(page_of(&base, 2).iter().all(|&b| b == 0xb2));
        rebase(&base, &diff, &base).unwrap();
        assert!(page_of(&base, 5).iter().all(|&b| b == 0xd5));
    }

    #[test]
    fn a_diff_of_another_size_is_refused_and_nothing_is_written() {
        let dir = Dir::new("size");
        let (base, diff, out) = (
            dir.path().join("base"),
            dir.path().join("diff"),
            dir.path().join("out"),
        );
        sparse(&base, 8 * PAGE, &[(0, 1)]);
        sparse(&diff, 16 * PAGE, &[(0, 2)]);
        assert!(matches!(
            rebase(&base, &diff, &out),
            Err(RebaseError::Size { .. })
        ));
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
