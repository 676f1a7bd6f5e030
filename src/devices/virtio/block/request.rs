//! The block device's queue side: parses each request from a validated chain and performs it
//! on the backing file, reading and writing guest buffers in place.
//!
//! A request's bytes are a stream over the chain's buffers, however the driver split them: a
//! 16-byte header, then data, with the last device-writable byte for the status. Anything
//! wrong with a request is answered with VIRTIO_BLK_S_IOERR or VIRTIO_BLK_S_UNSUPP and
//! counted; only a chain with no writable byte can not be answered.

use std::os::fd::AsRawFd;

use crate::vstate::dirty::GuestMemoryMmap;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use std::sync::Arc;

use super::{magic, Backing, Disk, SECTOR_SIZE, SEG_MAX, SIZE_MAX};
use crate::devices::virtio::chain::{Buffer, Chain};
use crate::devices::virtio::rate_limiter::RateLimiter;
use crate::devices::virtio::worker::{drain, HandlerState, QueueContext, QueueHandler};
use crate::devices::virtio::RequestError;
use crate::telemetry::{DeviceCounter, ImageFormat, RequestViolation};
use crate::warn_limited;

const HEADER_LEN: u64 = 16;
/// The largest request: every segment at its maximum, plus header and status.
const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64 + HEADER_LEN + 1;

/// A contiguous piece of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    addr: u64,
    len: u64,
}

/// The part `[skip, skip + take)` of the byte stream the buffers form.
fn segments(buffers: &[&Buffer], skip: u64, take: u64) -> Vec<Segment> {
    let pieces = buffers.iter().map(|b| Segment {
        addr: b.addr,
        len: u64::from(b.len),
    });
    cut(pieces, skip, take)
}

/// The part `[skip, skip + take)` of the byte stream `pieces` form.
fn cut(pieces: impl IntoIterator<Item = Segment>, skip: u64, take: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    let (mut skip, mut take) = (skip, take);
    for b in pieces {
        let len = b.len;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(take);
        if n == 0 {
            break;
        }
        out.push(Segment {
            addr: b.addr + skip,
            len: n,
        });
        take -= n;
        skip = 0;
    }
    out
}

/// The most one read or write moves in one system call: a long request is done in pieces,
/// so that a reset, another queue or another device waits for one piece, not the request.
const PIECE: u64 = 256 << 10;

/// What a request turned out to be.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Done: the status and how many data bytes went into writable buffers.
    Done { status: u8, written: u64 },
    /// Refused with this status, for this reason.
    Refused { status: u8, error: RequestError },
    /// A valid read or write, to be done in pieces.
    Transfer(Transfer),
}

/// A read or write being done: what is left of it, and how to answer it.
#[derive(Debug, PartialEq, Eq)]
struct Transfer {
    direction: Direction,
    /// The guest's data buffers, in order.
    data: Vec<Segment>,
    /// The disk offset of the first data byte.
    offset: u64,
    len: u64,
    /// Bytes moved so far.
    done: u64,
}

/// A transfer with the chain it answers.
#[derive(Debug)]
struct InFlight {
    head: u16,
    status_at: u64,
    transfer: Transfer,
}

/// The queue side of a block device.
#[derive(Debug)]
pub struct BlockQueue {
    pub(super) disk: Disk,
    pub(super) backing: Arc<Backing>,
    /// A request the last wakeup left half done.
    in_flight: Option<InFlight>,
    limiter: Option<RateLimiter>,
    /// A request the rate limiter holds back: the next one served.
    parked: Option<Chain>,
}

impl BlockQueue {
    /// A queue side whose backing file never changes.
    pub fn new(disk: Disk) -> BlockQueue {
        let backing = Backing::new(disk.sectors);
        BlockQueue::with_backing(disk, backing)
    }

    /// A queue side that takes the backing files `backing` is given.
    pub(super) fn with_backing(disk: Disk, backing: Arc<Backing>) -> BlockQueue {
        BlockQueue {
            disk,
            backing,
            in_flight: None,
            limiter: None,
            parked: None,
        }
    }

    /// Limits the bytes and requests the guest may move.
    pub fn with_limiter(mut self, limiter: Option<RateLimiter>) -> BlockQueue {
        self.limiter = limiter;
        self
    }

    /// Moves the in-flight transfer on, piece by piece, while the wakeup's budget lasts;
    /// answers its chain when it is done (or failed).
    fn advance(&mut self, ctx: &mut QueueContext<'_>, queue: usize) {
        let Some(mut job) = self.in_flight.take() else {
            return;
        };
        let t = &mut job.transfer;
        let mut failed = false;
        while t.done < t.len {
            if ctx.budget_spent() {
                self.in_flight = Some(job);
                ctx.come_back(queue);
                return;
            }
            // What the budget has left, but never less than a page: the last piece of a
            // wakeup may go a little past the budget, never a whole piece past it.
            let n = (t.len - t.done).min(PIECE).min(ctx.bytes_left().max(4096));
            let piece = cut(t.data.iter().copied(), t.done, n);
            if let Err(e) = self.transfer(ctx.mem, &piece, t.offset + t.done, t.direction) {
                let what = match t.direction {
                    Direction::ToGuest => "read",
                    Direction::ToDisk => "write",
                };
                warn_limited!("{}: {what} failed: {e}", ctx.device_name());
                ctx.refuse(RequestError::new(
                    RequestViolation::HostIo,
                    t.offset / SECTOR_SIZE,
                    t.len,
                ));
                failed = true;
                break;
            }
            t.done += n;
            let counter = match t.direction {
                Direction::ToGuest => DeviceCounter::BytesToGuest,
                Direction::ToDisk => DeviceCounter::BytesFromGuest,
            };
            ctx.add(counter, n);
        }
        let (status, written) = match (failed, t.direction) {
            (true, _) => (VIRTIO_BLK_S_IOERR as u8, 0),
            (false, Direction::ToGuest) => (VIRTIO_BLK_S_OK as u8, t.len),
            (false, Direction::ToDisk) => (VIRTIO_BLK_S_OK as u8, 0),
        };
        answer(ctx, queue, job.head, job.status_at, status, written);
    }

    /// Takes one request: answers it at once, or leaves it in flight.
    fn serve(&mut self, ctx: &mut QueueContext<'_>, queue: usize, chain: &Chain) {
        let Some(used) = self.start(ctx, chain) else {
            self.advance(ctx, queue);
            return;
        };
        ctx.complete(queue, chain.head, used);
    }

    /// Parses and checks a request. Returns the used length when it is answered already, or
    /// None when it became the in-flight transfer.
    fn start(&mut self, ctx: &mut QueueContext<'_>, chain: &Chain) -> Option<u32> {
        let readable: Vec<&Buffer> = chain.buffers.iter().filter(|b| !b.writable).collect();
        let writable: Vec<&Buffer> = chain.buffers.iter().filter(|b| b.writable).collect();
        let (readable_len, writable_len) = (chain.readable_len(), chain.writable_len());
        let Some(status_at) = writable.last().map(|b| b.addr + u64::from(b.len) - 1) else {
            ctx.refuse(RequestError::new(
                RequestViolation::NoStatus,
                0,
                readable_len,
            ));
            return Some(0);
        };
        let data_in = segments(&writable, 0, writable_len - 1);
        let outcome = match read_header(ctx.mem, &readable) {
            None => Outcome::Refused {
                status: VIRTIO_BLK_S_IOERR as u8,
                error: RequestError::new(RequestViolation::BadHeader, 0, readable_len),
            },
            Some((kind, sector)) => {
                let data_out = segments(&readable, HEADER_LEN, readable_len - HEADER_LEN);
                self.perform(ctx, kind, sector, data_out, data_in)
            }
        };
        let (status, written) = match outcome {
            Outcome::Done { status, written } => (status, written),
            Outcome::Refused { status, error } => {
                ctx.refuse(error);
                (status, 0)
            }
            Outcome::Transfer(transfer) => {
                self.in_flight = Some(InFlight {
                    head: chain.head,
                    status_at,
                    transfer,
                });
                return None;
            }
        };
        Some(write_status(ctx, status_at, status, written))
    }

    fn perform(
        &mut self,
        ctx: &QueueContext<'_>,
        kind: u32,
        sector: u64,
        data_out: Vec<Segment>,
        data_in: Vec<Segment>,
    ) -> Outcome {
        let out_len: u64 = data_out.iter().map(|s| s.len).sum();
        let in_len: u64 = data_in.iter().map(|s| s.len).sum();
        let len = if kind == VIRTIO_BLK_T_OUT {
            out_len
        } else {
            in_len
        };
        // Refusals carry the sector and length as evidence.
        let ioerr = |reason| Outcome::Refused {
            status: VIRTIO_BLK_S_IOERR as u8,
            error: RequestError::new(reason, sector, len),
        };
        match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let (len, stray) = if kind == VIRTIO_BLK_T_IN {
                    (in_len, out_len)
                } else {
                    (out_len, in_len)
                };
                if stray != 0 || len % SECTOR_SIZE != 0 {
                    return ioerr(RequestViolation::BadLength);
                }
                let end = sector
                    .checked_mul(SECTOR_SIZE)
                    .and_then(|start| start.checked_add(len));
                if end.map_or(true, |end| end > self.disk.sectors * SECTOR_SIZE) {
                    return ioerr(RequestViolation::OutOfRange);
                }
                let offset = sector * SECTOR_SIZE;
                if kind == VIRTIO_BLK_T_OUT {
                    if self.disk.read_only {
                        return ioerr(RequestViolation::ReadOnly);
                    }
                    if offset == 0 {
                        if let Some(format) = image_header(ctx.mem, &data_out) {
                            // A raw disk that starts with another format's header would be
                            // opened as that format by any tool that guesses (the
                            // CVE-2026-27211 class): the write is refused.
                            return Outcome::Refused {
                                status: VIRTIO_BLK_S_IOERR as u8,
                                error: RequestError::new(
                                    RequestViolation::ImageMagic,
                                    format.index() as u64,
                                    len,
                                ),
                            };
                        }
                    }
                }
                let (direction, data) = if kind == VIRTIO_BLK_T_OUT {
                    (Direction::ToDisk, data_out)
                } else {
                    (Direction::ToGuest, data_in)
                };
                Outcome::Transfer(Transfer {
                    direction,
                    data,
                    offset,
                    len,
                    done: 0,
                })
            }
            VIRTIO_BLK_T_FLUSH => {
                if let Err(e) = self.disk.file.sync_all() {
                    warn_limited!("{}: flush failed: {e}", ctx.device_name());
                    return ioerr(RequestViolation::HostIo);
                }
                Outcome::Done {
                    status: VIRTIO_BLK_S_OK as u8,
                    written: 0,
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut written = 0u64;
                for seg in data_in {
                    let from = usize::try_from(written).unwrap_or(usize::MAX);
                    let Some(id) = self.disk.id.get(from..) else {
                        break;
                    };
                    let n = id.len().min(usize::try_from(seg.len).unwrap_or(usize::MAX));
                    let Some(piece) = id.get(..n) else { break };
                    if ctx.mem.write_slice(piece, GuestAddress(seg.addr)).is_err() {
                        return ioerr(RequestViolation::HostIo);
                    }
                    written += n as u64;
                }
                ctx.add(DeviceCounter::BytesToGuest, written);
                Outcome::Done {
                    status: VIRTIO_BLK_S_OK as u8,
                    written,
                }
            }
            _ => Outcome::Refused {
                status: VIRTIO_BLK_S_UNSUPP as u8,
                error: RequestError::new(RequestViolation::Unsupported, u64::from(kind), len),
            },
        }
    }

    /// Moves the bytes of `segments` between guest memory and the disk at `offset`, in place
    /// (no bounce buffer).
    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        segments: &[Segment],
        mut offset: u64,
        direction: Direction,
    ) -> std::io::Result<()> {
        let fd = self.disk.file.as_raw_fd();
        for seg in segments {
            let len = usize::try_from(seg.len).map_err(std::io::Error::other)?;
            let slice = mem
                .get_slice(GuestAddress(seg.addr), len)
                .map_err(std::io::Error::other)?;
            if direction == Direction::ToGuest {
                // pread fills guest RAM through a raw pointer, which vm-memory's dirty log
                // never sees (nor does KVM's: the kernel writes through the VMM's mapping).
                // Log the whole segment first: a short or failed read may have changed any
                // byte of it, and a diff snapshot must not miss one.
                slice.bitmap().mark_dirty(0, len);
            }
            let guard = slice.ptr_guard_mut();
            let mut done = 0usize;
            while done < len {
                let at = i64::try_from(offset + done as u64).map_err(std::io::Error::other)?;
                // SAFETY: `guard` maps `len` bytes of guest RAM that stay mapped while the
                // guard lives (the VM's memory outlives every device), and `done < len`, so
                // the kernel reads or writes only inside that mapping. The guest may race
                // with us on these bytes; that only affects the guest's own data.
                let n = unsafe {
                    let ptr = guard.as_ptr().add(done);
                    match direction {
                        Direction::ToGuest => libc::pread(fd, ptr.cast(), len - done, at),
                        Direction::ToDisk => libc::pwrite(fd, ptr.cast(), len - done, at),
                    }
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the backing file is shorter than the disk",
                    ));
                }
                done += n as usize;
            }
            offset += seg.len;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToGuest,
    ToDisk,
}

/// Writes a request's status byte; the used length for `written` data bytes.
fn write_status(ctx: &QueueContext<'_>, status_at: u64, status: u8, written: u64) -> u32 {
    // The status byte lies in a validated writable buffer.
    let _ = ctx.mem.write_obj(status, GuestAddress(status_at));
    u32::try_from(written + 1).unwrap_or(u32::MAX)
}

/// Answers chain `head` with `status`.
fn answer(
    ctx: &mut QueueContext<'_>,
    queue: usize,
    head: u16,
    status_at: u64,
    status: u8,
    written: u64,
) {
    let used = write_status(ctx, status_at, status, written);
    ctx.complete(queue, head, used);
}

/// What a request takes from the bandwidth bucket: its data, less the header and status (the
/// type is not read yet, so a flush or get-id counts the little it carries).
fn data_bytes(chain: &Chain) -> u64 {
    (chain.readable_len() + chain.writable_len()).saturating_sub(HEADER_LEN + 1)
}

/// The image format whose header the data written to sector 0 begins with, if any.
fn image_header(mem: &GuestMemoryMmap, data: &[Segment]) -> Option<ImageFormat> {
    let mut head = [0u8; magic::PROBE_LEN];
    let mut filled = 0usize;
    for seg in data {
        let Some(dst) = head.get_mut(filled..) else {
            break;
        };
        let n = dst
            .len()
            .min(usize::try_from(seg.len).unwrap_or(usize::MAX));
        let dst = dst.get_mut(..n)?;
        mem.read_slice(dst, GuestAddress(seg.addr)).ok()?;
        filled += n;
    }
    magic::detect(head.get(..filled)?)
}

/// The request type and sector from the first 16 readable bytes, or None when there are not
/// 16 of them.
fn read_header(mem: &GuestMemoryMmap, readable: &[&Buffer]) -> Option<(u32, u64)> {
    let mut header = [0u8; HEADER_LEN as usize];
    let mut filled = 0usize;
    for seg in segments(readable, 0, HEADER_LEN) {
        let n = usize::try_from(seg.len).ok()?;
        let dst = header.get_mut(filled..filled + n)?;
        mem.read_slice(dst, GuestAddress(seg.addr)).ok()?;
        filled += n;
    }
    if filled != header.len() {
        return None;
    }
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
    Some((
        u32::from_le_bytes([t0, t1, t2, t3]),
        u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
    ))
}

impl QueueHandler for BlockQueue {
    fn process_queue(&mut self, ctx: &mut QueueContext<'_>, queue: usize) {
        // A request left half done goes first, on the file it started on.
        self.advance(ctx, queue);
        if self.in_flight.is_some() {
            return;
        }
        // A backing file the host swapped in serves every request from here on.
        if let Some(next) = self.backing.take_next() {
            self.disk = next;
        }
        drain(ctx, queue, |ctx| {
            while self.in_flight.is_none() {
                let next = ctx.next_limited_chain(
                    queue,
                    MAX_REQUEST_BYTES,
                    &mut self.limiter,
                    &mut self.parked,
                    data_bytes,
                );
                let Some(chain) = next else {
                    break;
                };
                self.serve(ctx, queue, &chain);
            }
        });
    }

    fn reset(&mut self) {
        // The driver reset the device: the requests are forgotten with the rings.
        self.in_flight = None;
        self.parked = None;
    }

    fn held_chains(&self, _queue: usize) -> u16 {
        // No chain is taken while one is in flight, so at most one of the two is held.
        u16::from(self.in_flight.is_some()) + u16::from(self.parked.is_some())
    }

    fn save_state(&self) -> HandlerState {
        HandlerState::of_limiters(&[&self.limiter])
    }

    fn restore_state(&mut self, state: &HandlerState) -> bool {
        state.restore_limiters(&mut [&mut self.limiter]);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(addr: u64, len: u32) -> Buffer {
        Buffer {
            addr,
            len,
            writable: false,
        }
    }

    #[test]
    fn segments_cut_the_byte_stream_across_buffer_boundaries() {
        let (a, b, c) = (buf(0x1000, 10), buf(0x2000, 6), buf(0x3000, 100));
        let all = [&a, &b, &c];
        assert_eq!(
            segments(&all, 8, 10),
            vec![
                Segment {
                    addr: 0x1008,
                    len: 2
                },
                Segment {
                    addr: 0x2000,
                    len: 6
                },
                Segment {
                    addr: 0x3000,
                    len: 2
                },
            ]
        );
        assert_eq!(segments(&all, 16, 0), vec![]);
        assert_eq!(segments(&all, 200, 5), vec![]);
        assert_eq!(
            segments(&all, 0, 1000).iter().map(|s| s.len).sum::<u64>(),
            116
        );
    }
}
