//! What the fuzz targets share: guest memory built from the fuzzer's bytes, a virtio device's
//! queue side driven as the event loop drives it, and the invariants every run must keep.
//!
//! The input lays out, for each queue, its descriptor table (16 descriptors) and available
//! ring; the rest is buffer memory. Descriptors may point anywhere, inside RAM or not. After
//! each notification the harness checks that
//! - the device wrote only into the used rings and into buffers some descriptor marked
//!   device-writable (before or after the run), and outside the used rings nothing at all when
//!   it refused every chain;
//! - every counter (requests, bytes, refusals by reason) only grew.

use std::sync::Arc;

use bulkhead::devices::virtio::queue::GuestQueue;
use bulkhead::devices::virtio::shared::DeviceShared;
use bulkhead::devices::virtio::worker::QueueHandler;
use bulkhead::devices::virtio::{QueueConfig, VirtioWorker};
use bulkhead::telemetry::{ChainViolation, DeviceCounter, DeviceTelemetry, OnViolation, Violation};
use vm_memory::{Bytes, GuestAddress};
use bulkhead::vstate::dirty::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Queue size the harness configures (the rings of 16 entries the fuzzer fills).
pub const QSIZE: u16 = 16;
const DESC_BYTES: usize = 16 * QSIZE as usize;
/// flags, idx, ring[16] and used_event.
const AVAIL_BYTES: usize = 4 + 2 * QSIZE as usize + 2;
const USED_BYTES: u64 = 4 + 8 * QSIZE as u64 + 2;
/// Each queue's rings live in their own 16 KiB: descriptors, then avail at +4 KiB, used at
/// +8 KiB.
const QUEUE_STRIDE: u64 = 0x4000;
/// Guest RAM: two regions with a hole between them.
const REGION_A: (u64, usize) = (0, 0x1_0000);
const REGION_B: (u64, usize) = (0x2_0000, 0x4000);
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Guest memory laid out from `data`; the bytes left over after the rings.
pub fn memory(data: &[u8], queues: usize) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(REGION_A.0), REGION_A.1),
        (GuestAddress(REGION_B.0), REGION_B.1),
    ])
    .expect("guest memory");
    let mut rest = data;
    for q in 0..queues as u64 {
        let base = q * QUEUE_STRIDE;
        let (desc, tail) = rest.split_at(rest.len().min(DESC_BYTES));
        mem.write_slice(desc, GuestAddress(base))
            .expect("descriptors");
        let (avail, tail) = tail.split_at(tail.len().min(AVAIL_BYTES));
        mem.write_slice(avail, GuestAddress(base + 0x1000))
            .expect("avail");
        rest = tail;
    }
    // Buffer memory: after the last queue's rings in region A, then region B.
    let buffers_at = queues as u64 * QUEUE_STRIDE;
    let room_a = (REGION_A.1 as u64).saturating_sub(buffers_at) as usize;
    let (a, b) = rest.split_at(rest.len().min(room_a));
    if !a.is_empty() {
        mem.write_slice(a, GuestAddress(buffers_at))
            .expect("buffers");
    }
    let b = &b[..b.len().min(REGION_B.1)];
    if !b.is_empty() {
        mem.write_slice(b, GuestAddress(REGION_B.0))
            .expect("buffers");
    }
    mem
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<(u64, Vec<u8>)> {
    [REGION_A, REGION_B]
        .iter()
        .map(|&(at, len)| {
            let mut bytes = vec![0u8; len];
            mem.read_slice(&mut bytes, GuestAddress(at))
                .expect("snapshot");
            (at, bytes)
        })
        .collect()
}

/// A queue's configuration in the harness layout.
pub fn queue_config(q: usize) -> QueueConfig {
    let base = q as u64 * QUEUE_STRIDE;
    QueueConfig {
        size: QSIZE,
        desc_table: base,
        avail_ring: base + 0x1000,
        used_ring: base + 0x2000,
    }
}

/// One descriptor as the guest wrote it.
fn descriptor(mem: &GuestMemoryMmap, at: u64) -> Option<(u64, u32, u16)> {
    let mut raw = [0u8; 16];
    mem.read_slice(&mut raw, GuestAddress(at)).ok()?;
    let addr = u64::from_le_bytes(raw[0..8].try_into().ok()?);
    let len = u32::from_le_bytes(raw[8..12].try_into().ok()?);
    let flags = u16::from_le_bytes(raw[12..14].try_into().ok()?);
    Some((addr, len, flags))
}

/// Where a device may write: the used rings and every buffer a descriptor (in a table, or in
/// an indirect table one names) marks device-writable.
fn writable_ranges(mem: &GuestMemoryMmap, queues: usize) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for q in 0..queues {
        let c = queue_config(q);
        out.push((c.used_ring, USED_BYTES));
        for i in 0..u64::from(QSIZE) {
            let Some((addr, len, flags)) = descriptor(mem, c.desc_table + 16 * i) else {
                continue;
            };
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                // The device takes indirect tables of up to the queue's size.
                for j in 0..u64::from(len / 16).min(u64::from(QSIZE)) {
                    if let Some((a, l, f)) = descriptor(mem, addr.wrapping_add(16 * j)) {
                        if f & VIRTQ_DESC_F_WRITE != 0 {
                            out.push((a, u64::from(l)));
                        }
                    }
                }
            } else if flags & VIRTQ_DESC_F_WRITE != 0 {
                out.push((addr, u64::from(len)));
            }
        }
    }
    out
}

/// Every counter of a device, refusals by reason included, in a fixed order.
fn counters(t: &DeviceTelemetry) -> Vec<u64> {
    let mut v: Vec<u64> = DeviceCounter::ALL.iter().map(|&c| t.get(c)).collect();
    v.extend(Violation::all().map(|r| t.refusals(r)));
    v
}

/// A device's queue side over fuzzer-made rings.
pub struct QueueHarness {
    pub mem: GuestMemoryMmap,
    pub shared: Arc<DeviceShared>,
    worker: VirtioWorker,
    queues: usize,
}

impl QueueHarness {
    /// Activates `queues` queues of `handler` over rings from `data`; `ctrl` picks the
    /// negotiated ring features (bit 0: indirect descriptors, bit 1: event index).
    pub fn new(
        handler: Box<dyn QueueHandler>,
        queues: usize,
        ctrl: u8,
        data: &[u8],
    ) -> QueueHarness {
        let mem = memory(data, queues);
        let evt = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let shared = DeviceShared::detached("virtio-fuzz0", OnViolation::Log).expect("device");
        let mut features = 0;
        if ctrl & 1 != 0 {
            features |= VIRTIO_RING_F_INDIRECT_DESC;
        }
        if ctrl & 2 != 0 {
            features |= VIRTIO_RING_F_EVENT_IDX;
        }
        let live = (0..queues)
            .map(|q| GuestQueue::new(&mem, queue_config(q), features).ok())
            .collect();
        shared.activate(live);
        let worker = VirtioWorker::new(
            shared.clone(),
            mem.clone(),
            (0..queues).map(|_| evt()).collect(),
            handler,
        )
        .expect("worker");
        QueueHarness {
            mem,
            shared,
            worker,
            queues,
        }
    }

    /// Notifies `queue` and checks the invariants.
    pub fn notify(&mut self, queue: usize) {
        let before_mem = snapshot(&self.mem);
        let allowed = writable_ranges(&self.mem, self.queues);
        let before = counters(&self.shared.telemetry);
        self.worker.serve_now(queue, 64);
        let after = counters(&self.shared.telemetry);
        // A chain may write another chain's indirect table (the walker keeps buffers off the
        // rings only), making a descriptor writable that was not: the ranges after the run
        // count too.
        let mut allowed = allowed;
        allowed.extend(writable_ranges(&self.mem, self.queues));
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            assert!(a >= b, "counter {i} went down: {b} -> {a}");
        }
        // Chains refused one by one; a broken ring (RingOutsideRam, AvailIndexJump) is
        // refused without taking a request.
        let refused = |v: &[u64]| -> u64 {
            let offset = DeviceCounter::ALL.len();
            Violation::all()
                .enumerate()
                .filter(|(_, r)| match r {
                    Violation::Chain(c) => !matches!(
                        c,
                        ChainViolation::RingOutsideRam | ChainViolation::AvailIndexJump
                    ),
                    _ => false,
                })
                .map(|(i, _)| v[offset + i])
                .sum()
        };
        let requests = |v: &[u64]| v[DeviceCounter::Requests.index()];
        let accepted =
            (requests(&after) - requests(&before)) - (refused(&after) - refused(&before));
        let all_refused = accepted == 0;
        let used: Vec<(u64, u64)> = (0..self.queues)
            .map(|q| (queue_config(q).used_ring, USED_BYTES))
            .collect();
        let inside =
            |ranges: &[(u64, u64)], at: u64| ranges.iter().any(|&(a, l)| at >= a && at - a < l);
        for ((base, old), (_, new)) in before_mem.iter().zip(snapshot(&self.mem)) {
            // Compared a block at a time (a memcmp), then byte by byte where they differ.
            for (block, (o, n)) in old.chunks(256).zip(new.chunks(256)).enumerate() {
                if o == n {
                    continue;
                }
                for (i, (ob, nb)) in o.iter().zip(n).enumerate() {
                    let at = base + (block * 256 + i) as u64;
                    if ob != nb {
                        assert!(
                            inside(&used, at) || (!all_refused && inside(&allowed, at)),
                            "the device wrote guest byte {at:#x} ({ob:#x} -> {nb:#x}), which no accepted chain offered ({accepted} chains accepted; counters {before:?} -> {after:?})"
                        );
                    }
                }
            }
        }
    }
}

/// The flags the fuzz targets use in their control byte.
pub fn queue_to_notify(ctrl: u8, queues: usize) -> usize {
    usize::from(ctrl >> 4) % queues.max(1)
}

/// A regular file in memory with `len` bytes of a known pattern.
pub fn memfd(len: usize) -> std::fs::File {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a valid NUL-terminated name; the descriptor is then owned by
    // the File alone.
    let fd = unsafe { libc::memfd_create(c"bulkhead-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` was just created and nothing else owns it.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    f.write_all(&pattern).expect("disk pattern");
    f
}

#[doc(hidden)]
pub const _FLAGS_USED: u16 = VIRTQ_DESC_F_NEXT;
