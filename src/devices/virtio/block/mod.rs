//! virtio-blk (virtio 1.2 section 5.2) on a raw file: read, write, flush and get-id.
//!
//! The register side here offers the features and config space; [`request`] serves the
//! queue. The backing file is opened with the least access the disk needs and locked
//! (exclusively for a writable disk, shared for a read-only one), so two VMs can never write
//! one disk, nor one write a disk another is reading.

pub mod magic;
pub mod request;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

pub use request::BlockQueue;

use super::{read_config_bytes, VirtioDevice};

const VIRTIO_ID_BLOCK: u32 = 2;
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;
const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Data segments per request: the queue size less the header and status descriptors.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data segment.
const SIZE_MAX: u32 = 1 << 20;

/// Errors opening a disk's backing file.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {path} is in use by another process (it holds the file's lock); a disk can be written by one VM, or read by several, at a time")]
    Locked { path: PathBuf },
    #[error("disk {path} is not a regular file or block device")]
    NotADisk { path: PathBuf },
    #[error("cannot size disk {path}: {source}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An opened, locked backing file.
#[derive(Debug)]
pub struct Disk {
    pub file: File,
    /// Whole sectors; a partial last sector is not reachable by the guest.
    pub sectors: u64,
    pub read_only: bool,
    /// The GET_ID answer, NUL-padded.
    pub id: [u8; ID_BYTES],
}

impl Disk {
    /// Opens `path` read-only or read-write, takes the lock, and sizes it.
    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<Disk, BlockError> {
        Disk::open_with(path, read_only, id, false)
    }

    /// [`Disk::open`], refusing a symlink as the file itself when `no_follow`.
    pub fn open_with(
        path: &Path,
        read_only: bool,
        id: &str,
        no_follow: bool,
    ) -> Result<Disk, BlockError> {
        // Non-blocking, so a FIFO can not hang start-up; only a file or a block device is
        // taken (checked before any read).
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NONBLOCK | if no_follow { libc::O_NOFOLLOW } else { 0 })
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Disk::from_file(file, path, read_only, id)
    }

    /// Takes `file` (opened read-only or read-write as `read_only` says) as a disk: checks its
    /// kind, takes the lock and sizes it. `path` names it in messages.
    pub fn from_file(
        mut file: File,
        path: &Path,
        read_only: bool,
        id: &str,
    ) -> Result<Disk, BlockError> {
        // On the descriptor itself: the VMM thread's filter allows nothing that names a path.
        let st = crate::hostfile::fstat(&file).map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let kind = st.st_mode & libc::S_IFMT;
        let (is_file, is_block) = (kind == libc::S_IFREG, kind == libc::S_IFBLK);
        if !(is_file || is_block) {
            return Err(BlockError::NotADisk {
                path: path.to_path_buf(),
            });
        }
        let lock = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own; it touches no memory.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            return Err(BlockError::Locked {
                path: path.to_path_buf(),
            });
        }
        // seek works for block devices, whose metadata length is 0.
        let bytes = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_path_buf(),
                source,
            })?;
        if bytes % SECTOR_SIZE != 0 {
            log::warn!(
                "disk {}: size {bytes} is not a whole number of {SECTOR_SIZE}-byte sectors; the last {} bytes are not visible to the guest",
                path.display(),
                bytes % SECTOR_SIZE
            );
        }
        let mut id_bytes = [0u8; ID_BYTES];
        for (dst, src) in id_bytes.iter_mut().zip(id.bytes()) {
            *dst = src;
        }
        Ok(Disk {
            file,
            sectors: bytes / SECTOR_SIZE,
            read_only,
            id: id_bytes,
        })
    }
}

/// A running disk's backing file, as the host may swap it (Firecracker's `PATCH /drives`): the
/// capacity both sides read, and the next file for the queue side to take.
#[derive(Debug, Default)]
pub struct Backing {
    sectors: AtomicU64,
    next: Mutex<Option<Disk>>,
}

impl Backing {
    pub(super) fn new(sectors: u64) -> Arc<Backing> {
        Arc::new(Backing {
            sectors: AtomicU64::new(sectors),
            next: Mutex::new(None),
        })
    }

    fn take_next(&self) -> Option<Disk> {
        self.next.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The host's handle on one disk, to swap its backing file while the VM runs.
#[derive(Debug)]
pub struct DiskHandle {
    backing: Arc<Backing>,
    read_only: bool,
    id: String,
}

impl DiskHandle {
    /// Makes `file` the disk's backing from the next request on, and tells the driver its
    /// capacity may have changed. `file` must be open for writing unless the disk is
    /// read-only.
    pub fn swap(&self, file: File, name: &Path) -> Result<u64, BlockError> {
        let disk = Disk::from_file(file, name, self.read_only, &self.id)?;
        let sectors = disk.sectors;
        *self.backing.next.lock().unwrap_or_else(|e| e.into_inner()) = Some(disk);
        self.backing.sectors.store(sectors, Ordering::Release);
        Ok(sectors)
    }
}

/// A disk split for the device: the register side, the queue side, and the host's handle.
pub fn split(disk: Disk, id: &str) -> (Block, BlockQueue, DiskHandle) {
    let backing = Backing::new(disk.sectors);
    let block = Block {
        backing: backing.clone(),
        read_only: disk.read_only,
    };
    let handle = DiskHandle {
        backing: backing.clone(),
        read_only: disk.read_only,
        id: id.to_string(),
    };
    (block, BlockQueue::with_backing(disk, backing), handle)
}

/// The register side of a block device.
#[derive(Debug)]
pub struct Block {
    backing: Arc<Backing>,
    read_only: bool,
}

impl Block {
    pub fn new(disk: &Disk) -> Block {
        Block {
            backing: Backing::new(disk.sectors),
            read_only: disk.read_only,
        }
    }

    /// struct virtio_blk_config up to blk_size: capacity, size_max, seg_max, geometry, blk_size.
    fn config_space(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        let fields: [(usize, &[u8]); 4] = [
            (
                0,
                &self.backing.sectors.load(Ordering::Acquire).to_le_bytes(),
            ),
            (8, &SIZE_MAX.to_le_bytes()),
            (12, &SEG_MAX.to_le_bytes()),
            (20, &(SECTOR_SIZE as u32).to_le_bytes()),
        ];
        for (at, bytes) in fields {
            if let Some(dst) = c.get_mut(at..at + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        }
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) -> bool {
        read_config_bytes(&self.config_space(), offset, data)
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
        // The writeback field needs VIRTIO_BLK_F_CONFIG_WCE, which is not offered.
        false
    }
}

#[cfg(test)]
mod swap_tests {
    use super::*;

    fn file_of(bytes: usize, name: &str) -> (File, PathBuf) {
        let path =
            std::env::temp_dir().join(format!("bulkhead-swap-{name}-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; bytes]).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (f, path)
    }

    #[test]
    fn a_swapped_backing_file_changes_the_capacity_and_serves_the_next_requests() {
        let (f, p1) = file_of(4096, "old");
        let disk = Disk::from_file(f, &p1, false, "d").unwrap();
        let (block, mut queue, handle) = split(disk, "d");
        let capacity = |b: &Block| u64::from_le_bytes(b.config_space()[..8].try_into().unwrap());
        assert_eq!(capacity(&block), 8);
        let (f2, p2) = file_of(8192, "new");
        assert_eq!(handle.swap(f2, &p2).unwrap(), 16);
        assert_eq!(capacity(&block), 16);
        // The queue side takes the new file when it next serves.
        let next = queue.backing.take_next().unwrap();
        queue.disk = next;
        assert_eq!(queue.disk.sectors, 16);
        // Something that is not a disk is refused, and nothing changes.
        let dir = File::open(std::env::temp_dir()).unwrap();
        assert!(handle.swap(dir, Path::new("/tmp")).is_err());
        assert_eq!(capacity(&block), 16);
        let _ = std::fs::remove_file(p1);
        let _ = std::fs::remove_file(p2);
    }
}
