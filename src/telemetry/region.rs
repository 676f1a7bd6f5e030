//! The telemetry region: one block of shared memory through which the VM process reports to
//! its supervisor without a system call.
//!
//! The supervisor creates it (a sealed memfd, mapped shared) before it forks the VM process,
//! which so shares the same pages. Every field is an atomic integer, so both sides may touch it at
//! once and all-zero bytes are a valid initial state. The VM process writes counters with
//! relaxed adds, the exit and seccomp records, and events through [`super::ring`]; the
//! supervisor only reads (and frees ring cells). Everything the supervisor reads is untrusted:
//! counts are taken as plain numbers and every index or code is checked before use.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use super::ring::Ring;
use super::vocabulary::{
    ChainViolation, ExitKind, RequestViolation, TransportViolation, Violation, VmCounter,
};

/// The most vCPUs a region has rows for (the MP table's limit).
pub const MAX_VCPUS: usize = 254;
/// The most virtio devices a region has slots for (one IRQ each, 5 to 23).
pub const MAX_DEVICES: usize = 19;

const MAGIC: u64 = u64::from_le_bytes(*b"BLKHDTEL");
/// Bumped whenever the layout changes; the supervisor and the VM process are one binary, so
/// a mismatch means a foreign or corrupted region.
const VERSION: u64 = 1;

const VM_COUNTERS: usize = 16;
/// A vCPU's exit counters fill two cache lines, so vCPUs never share one.
const EXIT_ROW: usize = 16;
const DEVICE_COUNTERS: usize = 8;
const VIOLATION_SLOTS: usize = 48;

const _: () = assert!(VmCounter::COUNT <= VM_COUNTERS);
const _: () = assert!(ExitKind::COUNT <= EXIT_ROW);
const _: () = assert!(
    TransportViolation::COUNT + ChainViolation::COUNT + RequestViolation::COUNT <= VIOLATION_SLOTS
);

super::vocabulary::vocabulary! {
    /// What each virtio device counts besides refusals.
    pub enum DeviceCounter {
        /// Requests (chains) the device took from its queues, valid or not.
        Requests = "requests",
        /// Bytes the device read from guest buffers.
        BytesFromGuest = "bytes_from_guest",
        /// Bytes the device wrote into guest buffers.
        BytesToGuest = "bytes_to_guest",
        /// Interrupts raised.
        Interrupts = "interrupts",
        /// Host-side data dropped: no guest buffer big enough, or the backend full.
        Dropped = "dropped",
        /// Times the device was put in NEEDS_RESET as the response to a violation.
        PolicyResets = "policy_resets",
        /// Times the device stopped serving a queue because it had used its work budget for
        /// one wakeup, and came back after the other events.
        Yields = "yields",
        /// Times a rate limiter held a queue back until its bucket refilled.
        Throttled = "throttled",
    }
}
const _: () = assert!(DeviceCounter::COUNT <= DEVICE_COUNTERS);

/// The flat counter index of a violation: transport reasons, then chain, then request.
pub fn violation_slot(v: Violation) -> usize {
    match v {
        Violation::Transport(t) => t.index(),
        Violation::Chain(c) => TransportViolation::COUNT + c.index(),
        Violation::Request(r) => TransportViolation::COUNT + ChainViolation::COUNT + r.index(),
    }
}

/// One vCPU's exit counters.
#[repr(C)]
pub struct VcpuRow {
    exits: [AtomicU64; EXIT_ROW],
}

impl VcpuRow {
    /// Counts one exit.
    #[inline]
    pub fn count(&self, kind: ExitKind) {
        if let Some(c) = self.exits.get(kind.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn get(&self, kind: ExitKind) -> u64 {
        self.exits
            .get(kind.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// All exits of every kind.
    pub fn total(&self) -> u64 {
        ExitKind::ALL
            .iter()
            .fold(0u64, |sum, &k| sum.wrapping_add(self.get(k)))
    }
}

/// One virtio device's counters.
#[repr(C)]
pub struct DeviceSlot {
    counters: [AtomicU64; DEVICE_COUNTERS],
    violations: [AtomicU64; VIOLATION_SLOTS],
}

impl DeviceSlot {
    #[inline]
    pub fn add(&self, counter: DeviceCounter, n: u64) {
        if let Some(c) = self.counters.get(counter.index()) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn get(&self, counter: DeviceCounter) -> u64 {
        self.counters
            .get(counter.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Counts one refusal.
    pub fn refuse(&self, v: Violation) {
        if let Some(c) = self.violations.get(violation_slot(v)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How often the device refused for `v`.
    pub fn refusals(&self, v: impl Into<Violation>) -> u64 {
        self.violations
            .get(violation_slot(v.into()))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// How the VM ended, as the VM process reports it: a claim the supervisor checks against the
/// exit status the kernel gives it.
#[repr(C)]
pub struct ExitRecord {
    /// 0 until written, then 1 (set last, with release ordering).
    state: AtomicU64,
    kind: AtomicU64,
    a: AtomicU64,
    b: AtomicU64,
}

impl ExitRecord {
    /// Records `(kind, a, b)`; the first record wins.
    pub fn write(&self, kind: u64, a: u64, b: u64) {
        if self.state.load(Ordering::Acquire) != 0 {
            return;
        }
        self.kind.store(kind, Ordering::Relaxed);
        self.a.store(a, Ordering::Relaxed);
        self.b.store(b, Ordering::Relaxed);
        self.state.store(1, Ordering::Release);
    }

    /// The record, if one was written.
    pub fn read(&self) -> Option<(u64, u64, u64)> {
        (self.state.load(Ordering::Acquire) == 1).then(|| {
            (
                self.kind.load(Ordering::Relaxed),
                self.a.load(Ordering::Relaxed),
                self.b.load(Ordering::Relaxed),
            )
        })
    }
}

/// What the SIGSYS handler hands over before the process dies: the thread and system call.
/// Written from a signal handler, so plain atomic stores only.
#[repr(C)]
pub struct SeccompRecord {
    state: AtomicU64,
    syscall: AtomicU64,
    thread: [AtomicU64; 2],
}

impl SeccompRecord {
    /// Async-signal-safe: atomic stores only.
    pub fn write(&self, syscall: i64, thread: &[u8; 16]) {
        let (lo, hi) = thread.split_at(8);
        let word = |b: &[u8]| {
            let mut w = [0u8; 8];
            w.copy_from_slice(b);
            u64::from_le_bytes(w)
        };
        self.syscall.store(syscall as u64, Ordering::Relaxed);
        self.thread[0].store(word(lo), Ordering::Relaxed);
        self.thread[1].store(word(hi), Ordering::Relaxed);
        self.state.store(1, Ordering::Release);
    }

    /// (system call number, thread name bytes) if the handler wrote them.
    pub fn read(&self) -> Option<(u64, [u8; 16])> {
        if self.state.load(Ordering::Acquire) != 1 {
            return None;
        }
        let mut name = [0u8; 16];
        let (lo, hi) = name.split_at_mut(8);
        lo.copy_from_slice(&self.thread[0].load(Ordering::Relaxed).to_le_bytes());
        hi.copy_from_slice(&self.thread[1].load(Ordering::Relaxed).to_le_bytes());
        Some((self.syscall.load(Ordering::Relaxed), name))
    }
}

/// The whole shared region.
#[repr(C)]
pub struct Page {
    magic: AtomicU64,
    version: AtomicU64,
    /// CLOCK_MONOTONIC nanoseconds when the guest reported boot complete; 0 until then.
    boot_complete_ns: AtomicU64,
    vm: [AtomicU64; VM_COUNTERS],
    pub exit: ExitRecord,
    pub seccomp: SeccompRecord,
    vcpus: [VcpuRow; MAX_VCPUS],
    devices: [DeviceSlot; MAX_DEVICES],
    pub ring: Ring,
}

impl Page {
    #[inline]
    pub fn count(&self, counter: VmCounter) {
        if let Some(c) = self.vm.get(counter.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds `n` to a VM counter.
    #[inline]
    pub fn add_vm(&self, counter: VmCounter, n: u64) {
        if let Some(c) = self.vm.get(counter.index()) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn vm_counter(&self, counter: VmCounter) -> u64 {
        self.vm
            .get(counter.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// vCPU `index`'s row, if the region has one.
    pub fn vcpu(&self, index: usize) -> Option<&VcpuRow> {
        self.vcpus.get(index)
    }

    /// Device `index`'s slot, if the region has one.
    pub fn device(&self, index: usize) -> Option<&DeviceSlot> {
        self.devices.get(index)
    }

    pub fn set_boot_complete(&self, ns: u64) {
        let _ = self.boot_complete_ns.compare_exchange(
            0,
            ns.max(1),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    pub fn boot_complete_ns(&self) -> Option<u64> {
        Some(self.boot_complete_ns.load(Ordering::Acquire)).filter(|&ns| ns != 0)
    }
}

/// The length of the mapping: the page rounded up to whole pages.
pub fn region_len() -> usize {
    std::mem::size_of::<Page>().div_ceil(4096) * 4096
}

/// Errors creating or attaching the region.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("cannot create the telemetry memfd: {0}")]
    Create(#[source] io::Error),
    #[error("cannot size or seal the telemetry memfd: {0}")]
    Seal(#[source] io::Error),
    #[error("cannot map the telemetry region: {0}")]
    Map(#[source] io::Error),
}

/// A mapping of the region.
pub struct Region {
    page: NonNull<Page>,
    len: usize,
}

// SAFETY: the region is only reached through `&Page`, whose fields are all atomics, so sharing
// and sending it between threads is as safe as sharing atomics.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("len", &self.len).finish()
    }
}

impl std::ops::Deref for Region {
    type Target = Page;

    fn deref(&self) -> &Page {
        // SAFETY: `page` points at a live mapping of at least size_of::<Page>() bytes, page
        // aligned, which stays mapped until `self` is dropped; any bit pattern is a valid
        // `Page` because it is made of atomic integers only.
        unsafe { self.page.as_ref() }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `page` and `len` are the mapping made in `map`; nothing borrows it past
        // `self`'s lifetime.
        unsafe { libc::munmap(self.page.as_ptr().cast(), self.len) };
    }
}

impl Region {
    /// A private region for a VM run without a supervisor (tests, benchmarks).
    pub fn anonymous() -> Result<Region, RegionError> {
        let region = Region::map(-1, libc::MAP_SHARED | libc::MAP_ANONYMOUS)?;
        region.init_header();
        Ok(region)
    }

    /// The supervisor's side: a new sealed memfd, mapped shared (a fork keeps sharing it), and
    /// its fd.
    pub fn create() -> Result<(Region, OwnedFd), RegionError> {
        let name = c"bulkhead-telemetry";
        // SAFETY: `name` is a valid C string; memfd_create has no other memory effects.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(RegionError::Create(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = region_len();
        // SAFETY: plain fd operations on our own memfd.
        let sized = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } == 0;
        // The VM process can neither shrink the region (which would make the supervisor's
        // reads fault with SIGBUS) nor grow it.
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: as above.
        if !sized || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(RegionError::Seal(io::Error::last_os_error()));
        }
        let region = Region::map(fd.as_raw_fd(), libc::MAP_SHARED)?;
        region.init_header();
        Ok((region, fd))
    }

    /// The VM process's side when it was not forked from the supervisor: maps the region
    /// `fd` (the supervisor's memfd, handed over) after checking it is sealed against resizing
    /// and large enough.
    pub fn attach(fd: &OwnedFd) -> Result<Region, RegionError> {
        let need = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        // SAFETY: fcntl on a descriptor the caller owns.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & need != need {
            return Err(RegionError::Seal(io::Error::other(
                "the handed-over region is not sealed against resizing",
            )));
        }
        let size = std::fs::File::from(fd.try_clone().map_err(RegionError::Map)?)
            .metadata()
            .map_err(RegionError::Map)?
            .len();
        if size < region_len() as u64 {
            return Err(RegionError::Map(io::Error::other(
                "the handed-over region is too small",
            )));
        }
        Region::map(fd.as_raw_fd(), libc::MAP_SHARED)
    }

    fn map(fd: RawFd, flags: libc::c_int) -> Result<Region, RegionError> {
        let len = region_len();
        // SAFETY: a fresh shared mapping of `len` bytes; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(RegionError::Map(io::Error::last_os_error()));
        }
        let page = NonNull::new(ptr.cast::<Page>())
            .ok_or(RegionError::Map(io::Error::other("null mapping")))?;
        Ok(Region { page, len })
    }

    fn init_header(&self) {
        self.magic.store(MAGIC, Ordering::Release);
        self.version.store(VERSION, Ordering::Release);
    }

    /// The page's address, for the SIGSYS handler (which can not hold a reference).
    pub fn as_ptr(&self) -> *const Page {
        self.page.as_ptr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_fits_in_a_few_pages_and_starts_zeroed() {
        let r = Region::anonymous().unwrap();
        assert!(region_len() <= 128 * 1024, "{}", region_len());
        assert_eq!(r.vm_counter(VmCounter::EventsDropped), 0);
        assert_eq!(r.vcpu(253).unwrap().total(), 0);
        assert!(r.vcpu(254).is_none());
        assert!(r.device(19).is_none());
        assert_eq!(r.boot_complete_ns(), None);
        assert!(r.exit.read().is_none());
    }

    #[test]
    fn a_created_region_is_sealed_against_resizing() {
        let (region, fd) = Region::create().unwrap();
        // SAFETY: fcntl and ftruncate on our own memfd.
        let (seals, shrink) = unsafe {
            (
                libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS),
                libc::ftruncate(fd.as_raw_fd(), 0),
            )
        };
        assert_ne!(seals & libc::F_SEAL_SHRINK, 0);
        assert_ne!(seals & libc::F_SEAL_GROW, 0);
        assert_ne!(shrink, 0, "the region could be shrunk");
        region.count(VmCounter::PioUnassignedReads);
        assert_eq!(region.vm_counter(VmCounter::PioUnassignedReads), 1);
    }

    #[test]
    fn every_violation_has_its_own_counter_slot() {
        let mut slots: Vec<usize> = Violation::all().map(violation_slot).collect();
        let n = slots.len();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), n);
        assert!(slots.iter().all(|&s| s < VIOLATION_SLOTS));
    }

    #[test]
    fn seccomp_record_round_trips_the_thread_name() {
        let r = Region::anonymous().unwrap();
        let mut name = [0u8; 16];
        name[..5].copy_from_slice(b"vcpu1");
        r.seccomp.write(41, &name);
        assert_eq!(r.seccomp.read(), Some((41, name)));
    }
}
