//! Reading a descriptor chain from guest memory, with every reason for refusing it named.
//!
//! virtio-queue's chain iterator simply stops on a bad index, a loop, an over-long chain or a
//! bad indirect table, and does not say why. Devices here walk chains through [`read_chain`]
//! instead, which checks each descriptor against virtio 1.2 section 2.7 and bulkhead's own
//! stricter rules, and returns a [`ChainViolation`] the queue handler counts.
//!
//! Stricter than the specification: every buffer must lie wholly inside one guest RAM region
//! (not merely inside RAM), and no buffer may overlap the queue's own rings, so a device can
//! never be made to write over the structures it reads its work from.

use crate::vstate::dirty::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::QueueConfig;
pub use crate::telemetry::ChainViolation;
use crate::telemetry::Evidence;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
const DESC_SIZE: u64 = 16;

/// A refused chain: why, and the guest address and length of the offending buffer, table or
/// ring (the evidence an alert reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainError {
    pub reason: ChainViolation,
    pub addr: u64,
    pub len: u64,
}

impl ChainError {
    pub fn new(reason: ChainViolation, addr: u64, len: u64) -> ChainError {
        ChainError { reason, addr, len }
    }

    /// The evidence of this refusal on `queue`.
    pub fn evidence(&self, queue: Option<u16>) -> Evidence {
        Evidence {
            queue,
            a: self.addr,
            b: self.len,
        }
    }
}

/// One buffer of a validated chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A chain that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub buffers: Vec<Buffer>,
}

impl Chain {
    pub fn readable_len(&self) -> u64 {
        self.buffers
            .iter()
            .filter(|b| !b.writable)
            .map(|b| u64::from(b.len))
            .sum()
    }

    pub fn writable_len(&self) -> u64 {
        self.buffers
            .iter()
            .filter(|b| b.writable)
            .map(|b| u64::from(b.len))
            .sum()
    }

    /// Appends the bytes of the device-readable buffers to `out`. False if guest memory
    /// could not be read (the buffers were validated, so that means a bug, not the guest).
    pub fn read_into(&self, mem: &GuestMemoryMmap, out: &mut Vec<u8>) -> bool {
        for b in self.buffers.iter().filter(|b| !b.writable) {
            let start = out.len();
            out.resize(start + b.len as usize, 0);
            let Some(dst) = out.get_mut(start..) else {
                return false;
            };
            if mem.read_slice(dst, GuestAddress(b.addr)).is_err() {
                return false;
            }
        }
        true
    }

    /// Writes `parts`, one after another, across the device-writable buffers. False when
    /// they do not fit, or guest memory could not be written.
    pub fn write_parts(&self, mem: &GuestMemoryMmap, parts: &[&[u8]]) -> bool {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if (total as u64) > self.writable_len() {
            return false;
        }
        let mut buffers = self.buffers.iter().filter(|b| b.writable);
        let (mut addr, mut room) = (0u64, 0u64);
        for part in parts {
            let mut rest: &[u8] = part;
            while !rest.is_empty() {
                if room == 0 {
                    let Some(b) = buffers.next() else {
                        return false;
                    };
                    (addr, room) = (b.addr, u64::from(b.len));
                }
                let n = rest.len().min(room as usize);
                let (piece, tail) = rest.split_at(n);
                if mem.write_slice(piece, GuestAddress(addr)).is_err() {
                    return false;
                }
                (addr, room, rest) = (addr + n as u64, room - n as u64, tail);
            }
        }
        true
    }
}

/// The guest-physical ranges a split virtqueue occupies.
pub fn ring_ranges(queue: &QueueConfig) -> [(u64, u64); 3] {
    let size = u64::from(queue.size);
    [
        (queue.desc_table, DESC_SIZE * size),
        // flags, idx, ring[size], used_event
        (queue.avail_ring, 6 + 2 * size),
        // flags, idx, ring[size] of (id, len), avail_event
        (queue.used_ring, 6 + 8 * size),
    ]
}

/// True when `[addr, addr + len)` lies wholly inside one RAM region.
fn in_one_region(mem: &GuestMemoryMmap, addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    mem.find_region(GuestAddress(addr)).is_some_and(|r| {
        r.start_addr()
            .0
            .checked_add(r.len())
            .is_some_and(|region_end| end <= region_end)
    })
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

/// Checks that the queue's rings lie wholly inside guest RAM (alignment and size are the
/// transport's checks). The error names the first ring that is not.
pub fn check_rings(mem: &GuestMemoryMmap, queue: &QueueConfig) -> Result<(), ChainError> {
    match ring_ranges(queue)
        .into_iter()
        .find(|&(addr, len)| !in_one_region(mem, addr, len))
    {
        None => Ok(()),
        Some((addr, len)) => Err(ChainError::new(ChainViolation::RingOutsideRam, addr, len)),
    }
}

/// How many new chains the driver made available, refusing a jump beyond the queue size.
pub fn avail_progress(last_seen: u16, avail_idx: u16, queue_size: u16) -> Result<u16, ChainError> {
    let new = avail_idx.wrapping_sub(last_seen);
    if new > queue_size {
        return Err(ChainError::new(
            ChainViolation::AvailIndexJump,
            u64::from(avail_idx),
            u64::from(last_seen),
        ));
    }
    Ok(new)
}

/// A descriptor as it lies in guest memory.
#[derive(Debug, Clone, Copy)]
struct RawDescriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_descriptor(
    mem: &GuestMemoryMmap,
    table: u64,
    index: u16,
) -> Result<RawDescriptor, ChainError> {
    let outside = |at| ChainError::new(ChainViolation::OutsideRam, at, DESC_SIZE);
    let at = table
        .checked_add(u64::from(index) * DESC_SIZE)
        .ok_or_else(|| outside(table))?;
    let mut raw = [0u8; 16];
    mem.read_slice(&mut raw, GuestAddress(at))
        .map_err(|_| outside(at))?;
    let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = raw;
    Ok(RawDescriptor {
        addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
        len: u32::from_le_bytes([l0, l1, l2, l3]),
        flags: u16::from_le_bytes([f0, f1]),
        next: u16::from_le_bytes([n0, n1]),
    })
}

/// Reads and validates the chain starting at descriptor `head` of `queue`.
///
/// `indirect_ok` says whether VIRTIO_F_INDIRECT_DESC was negotiated; `max_bytes` caps the sum
/// of all buffer lengths (the device's largest request). A refusal carries the offending
/// buffer's address and length, or for index and size problems the index (or count) and the
/// limit it broke.
pub fn read_chain(
    mem: &GuestMemoryMmap,
    queue: &QueueConfig,
    head: u16,
    indirect_ok: bool,
    max_bytes: u64,
) -> Result<Chain, ChainError> {
    use ChainViolation::*;
    let rings = ring_ranges(queue);
    let check_buffer = |addr: u64, len: u64| -> Result<(), ChainError> {
        if !in_one_region(mem, addr, len) {
            return Err(ChainError::new(OutsideRam, addr, len));
        }
        if rings.iter().any(|&ring| overlaps((addr, len), ring)) {
            return Err(ChainError::new(OverlapsRings, addr, len));
        }
        Ok(())
    };

    let mut table = queue.desc_table;
    let mut table_len = queue.size;
    let mut visited = vec![0u64; usize::from(table_len).div_ceil(64)];
    let mut in_indirect = false;
    let mut index = head;
    let mut buffers: Vec<Buffer> = Vec::new();
    let mut total: u64 = 0;
    let mut seen_writable = false;
    loop {
        let at_index = |reason| ChainError::new(reason, u64::from(index), u64::from(table_len));
        if index >= table_len {
            return Err(at_index(IndexOutOfRange));
        }
        let (word, bit) = (usize::from(index / 64), 1u64 << (index % 64));
        match visited.get_mut(word) {
            Some(w) if *w & bit != 0 => return Err(at_index(Loop)),
            Some(w) => *w |= bit,
            None => return Err(at_index(IndexOutOfRange)),
        }
        let desc = read_descriptor(mem, table, index)?;
        let this = |reason| ChainError::new(reason, desc.addr, u64::from(desc.len));

        if desc.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            if in_indirect {
                return Err(this(NestedIndirect));
            }
            if !indirect_ok {
                return Err(this(IndirectNotNegotiated));
            }
            if desc.flags & VIRTQ_DESC_F_NEXT != 0 {
                return Err(this(IndirectWithNext));
            }
            let entries = u64::from(desc.len) / DESC_SIZE;
            if desc.len == 0
                || u64::from(desc.len) % DESC_SIZE != 0
                || entries > u64::from(queue.size)
            {
                return Err(this(BadIndirectTable));
            }
            // The table is a buffer the device reads: outside RAM is outside RAM.
            check_buffer(desc.addr, u64::from(desc.len))?;
            table = desc.addr;
            table_len = u16::try_from(entries).map_err(|_| this(BadIndirectTable))?;
            visited = vec![0u64; usize::from(table_len).div_ceil(64)];
            in_indirect = true;
            index = 0;
            continue;
        }

        if buffers.len() >= usize::from(queue.size) {
            return Err(ChainError::new(
                TooManyDescriptors,
                buffers.len() as u64 + 1,
                u64::from(queue.size),
            ));
        }
        if desc.len == 0 {
            return Err(this(ZeroLength));
        }
        check_buffer(desc.addr, u64::from(desc.len))?;
        let writable = desc.flags & VIRTQ_DESC_F_WRITE != 0;
        if !writable && seen_writable {
            return Err(this(ReadableAfterWritable));
        }
        seen_writable |= writable;
        total += u64::from(desc.len);
        if total > max_bytes {
            return Err(ChainError::new(TooLong, total, max_bytes));
        }
        buffers.push(Buffer {
            addr: desc.addr,
            len: desc.len,
            writable,
        });

        if desc.flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(Chain { head, buffers });
        }
        index = desc.next;
    }
}

#[cfg(test)]
#[path = "chain_tests.rs"]
mod tests;
