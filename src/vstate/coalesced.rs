//! Port writes KVM keeps in a ring instead of leaving KVM_RUN for each (coalesced PIO).
//!
//! A polled console costs two exits per byte: the line status read, then the data register
//! write. The read needs an answer; the write, while the UART raises no interrupt for it and
//! loops nothing back, only hands a byte to the console. With the data register registered as a
//! coalesced zone, KVM appends such writes to a ring page it shares with this process and lets
//! the guest run on. The ring is drained in order before any exit is handled (so the status read
//! that follows a write sees it done, and nothing is reordered against the guest's other
//! accesses), when a vCPU is kicked (the VMM thread kicks one when its timer finds writes
//! waiting), and when the VM stops or pauses. KVM puts a write it has no room for through as
//! an ordinary exit, after the ring is drained. The device says when its writes may be held back
//! (`wanted`). The zone is registered only once enough such writes exited (registering costs a
//! short VM its teardown time, see `FIRST_THRESHOLD`), and dropped as soon as the device stops
//! being quiet, before the vCPU that changed it runs again.
//!
//! The ring's indices are written by KVM (`last`) and by us (`first`) and are checked before
//! use; an entry only ever carries the registered port, as KVM wrote it, and is handed to the
//! port bus like any other write.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};

use crate::devices::Bus;
use crate::warn_limited;

/// Errors setting up the ring.
#[derive(Debug, thiserror::Error)]
pub enum CoalescedError {
    #[error("cannot map KVM's coalesced I/O ring: {0}")]
    Map(#[source] std::io::Error),
}

/// The ring page, mapped from a vCPU's file (every vCPU maps the same VM-wide page; the mapping
/// keeps the VM alive, so it outlives the descriptor it came from).
struct RingPage {
    base: NonNull<u8>,
    len: usize,
    /// Entries the page holds.
    slots: u32,
}

// SAFETY: the page is shared memory that KVM and this process access through atomics and
// volatile reads only (see `CoalescedPort::drain`), and consumption is serialised by a mutex.
unsafe impl Send for RingPage {}
// SAFETY: as above.
unsafe impl Sync for RingPage {}

impl RingPage {
    fn map(vcpu_fd: &impl std::os::fd::AsRawFd) -> Result<RingPage, CoalescedError> {
        // SAFETY: sysconf with a constant name.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let len = usize::try_from(page).unwrap_or(4096);
        let offset = libc::off_t::try_from(len)
            .ok()
            .and_then(|l| l.checked_mul(libc::off_t::from(KVM_COALESCED_MMIO_PAGE_OFFSET as u16)))
            .ok_or_else(|| CoalescedError::Map(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: maps one page of the vCPU file at the offset KVM documents for the ring; a
        // new mapping overlaps nothing of ours, and the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu_fd.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(CoalescedError::Map(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| CoalescedError::Map(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        let header = std::mem::size_of::<kvm_coalesced_mmio_ring>();
        let entry = std::mem::size_of::<kvm_coalesced_mmio>();
        let slots = u32::try_from(len.saturating_sub(header) / entry).unwrap_or(0);
        Ok(RingPage { base, len, slots })
    }

    /// `first` (index 0) or `last` (index 1) of the ring's header.
    fn index(&self, which: usize) -> &AtomicU32 {
        // SAFETY: the header is two u32s at the start of the page, which is mapped, 4-byte
        // aligned and lives as long as `self`; KVM reads and writes them concurrently, so
        // they are only ever accessed atomically.
        unsafe { &*self.base.as_ptr().cast::<AtomicU32>().add(which) }
    }

    /// Entry `slot`, copied out (`slot` < `slots`).
    fn entry(&self, slot: u32) -> kvm_coalesced_mmio {
        let header = std::mem::size_of::<kvm_coalesced_mmio_ring>();
        let entry = std::mem::size_of::<kvm_coalesced_mmio>();
        // SAFETY: slot < slots, so the entry lies inside the mapped page; KVM published it
        // (its `last` moved past it, read with Acquire) and does not write it again until
        // `first` moves on; a volatile read copies it out whole.
        unsafe {
            self.base
                .as_ptr()
                .add(header + entry * slot as usize)
                .cast::<kvm_coalesced_mmio>()
                .read_volatile()
        }
    }
}

impl Drop for RingPage {
    fn drop(&mut self) {
        // SAFETY: the page was mapped by `map` with this length and nothing refers to it
        // once its owner is dropped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Exiting writes to the port, while the device was quiet, that turn the zone on at first.
/// Registering a zone makes KVM swap its I/O bus, and a VM destroyed within about 15 ms of
/// that waits out an SRCU grace period: 12-17 ms added to a short VM's end (a test guest that
/// prints a line and exits). A guest that writes this much console output lives long enough.
const FIRST_THRESHOLD: u32 = 256;
/// The most the threshold grows to: each time the zone is turned off (a driver turning its
/// transmit interrupt on, as Linux's tty output does around every burst), it doubles, so a
/// guest toggling IER costs at most one registration per this many quiet writes.
const MAX_THRESHOLD: u32 = 1 << 20;

/// What a port-write exit wrote to a port: one byte, or more (a wide access, or a string
/// write, `rep outs`, whose bytes arrive together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrittenPort {
    Byte(u16),
    Wide(u16),
}

/// One port whose writes KVM may hold back, and the ring they wait in.
pub struct CoalescedPort {
    fd: Arc<VmFd>,
    port: u16,
    ring: RingPage,
    /// Set by the device: its writes to `port` have no effect but their data.
    wanted: Arc<AtomicBool>,
    /// Whether the zone is registered with KVM now.
    registered: AtomicBool,
    /// Writes to `port` that exited while the device was quiet and the zone off.
    quiet_exits: AtomicU32,
    /// How many of those turn the zone on.
    threshold: AtomicU32,
    /// Coalescing is over for the VM's life: a registration change failed (the zone is left
    /// as it is), or the guest wrote more than a byte to the port at once (the zone is off).
    broken: AtomicBool,
    /// One consumer of the ring at a time; zone changes happen under it too.
    lock: Mutex<()>,
}

impl CoalescedPort {
    /// The ring for `port`, or None when this KVM can not hold port writes back. The zone is
    /// registered later, once the guest has written enough to `port` while `wanted` is set.
    pub fn new(
        kvm: &Kvm,
        fd: Arc<VmFd>,
        vcpu_fd: &impl std::os::fd::AsRawFd,
        port: u16,
        wanted: Arc<AtomicBool>,
    ) -> Result<Option<CoalescedPort>, CoalescedError> {
        if !kvm.check_extension(Cap::CoalescedPio) || !kvm.check_extension(Cap::CoalescedMmio) {
            return Ok(None);
        }
        let ring = RingPage::map(vcpu_fd)?;
        if ring.slots < 2 {
            return Ok(None);
        }
        Ok(Some(CoalescedPort {
            fd,
            port,
            ring,
            wanted,
            registered: AtomicBool::new(false),
            quiet_exits: AtomicU32::new(0),
            threshold: AtomicU32::new(FIRST_THRESHOLD),
            broken: AtomicBool::new(false),
            lock: Mutex::new(()),
        }))
    }

    /// Whether writes wait in the ring (never, with an index out of range: `drain` would
    /// find nothing to hand over).
    pub fn holds_writes(&self) -> bool {
        let first = self.ring.index(0).load(Ordering::Relaxed);
        let last = self.ring.index(1).load(Ordering::Acquire);
        first != last && first < self.ring.slots && last < self.ring.slots
    }

    /// [`CoalescedPort::drain`], or nothing when another thread is draining: for a thread that
    /// must not wait on a vCPU blocked writing the console.
    pub fn try_drain(&self, pio: &Bus) -> u64 {
        if !self.holds_writes() {
            return 0;
        }
        match self.lock.try_lock() {
            Ok(_held) => self.drain_locked(pio),
            Err(_) => 0,
        }
    }

    /// Handles every write waiting in the ring, oldest first, through `pio`. Returns how many.
    pub fn drain(&self, pio: &Bus) -> u64 {
        if !self.holds_writes() {
            return 0;
        }
        let _held = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.drain_locked(pio)
    }

    /// After an exit was handled (`wrote`: what a port write exit wrote): turns the zone off
    /// at once when the device stopped being quiet, and on once enough quiet writes exited.
    /// More than a byte written to the port at once (`rep outsb` reaching user space) turns
    /// it off for good: KVM may drop or repeat the part of a string write that does not fit
    /// in the ring, and a guest that writes strings is not told apart from one that does not.
    /// Returns how many held-back writes it handled on the way.
    pub fn follow(&self, pio: &Bus, wrote: Option<WrittenPort>) -> u64 {
        if wrote == Some(WrittenPort::Wide(self.port)) && !self.broken.load(Ordering::Relaxed) {
            let _held = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.stop_for_good();
            return self.drain_locked(pio);
        }
        // SeqCst on `wanted` and `registered`, here and where they are stored: a device turning
        // quiet off on one vCPU while another registers the zone must see the other's store.
        let want = self.wanted.load(Ordering::SeqCst);
        let registered = self.registered.load(Ordering::SeqCst);
        if registered == want || self.broken.load(Ordering::Relaxed) {
            return 0;
        }
        if want {
            if wrote != Some(WrittenPort::Byte(self.port)) {
                return 0;
            }
            let exits = self.quiet_exits.fetch_add(1, Ordering::Relaxed) + 1;
            if exits < self.threshold.load(Ordering::Relaxed) {
                return 0;
            }
        }
        let _held = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.settle_locked(pio)
    }

    /// Stops coalescing for the VM's life: the zone is dropped and never registered again.
    /// With the lock held; what the ring holds is the caller's to drain.
    fn stop_for_good(&self) {
        self.broken.store(true, Ordering::Relaxed);
        if self.registered.load(Ordering::SeqCst) {
            let addr = IoEventAddress::Pio(u64::from(self.port));
            match self.fd.unregister_coalesced_mmio(addr, 1) {
                Ok(()) => self.registered.store(false, Ordering::SeqCst),
                Err(e) => {
                    warn_limited!("cannot stop holding back port {:#x} writes: {e}", self.port)
                }
            }
        }
    }

    /// Registers or unregisters until the zone matches `wanted`; with the lock held.
    fn settle_locked(&self, pio: &Bus) -> u64 {
        let mut handled = 0;
        while !self.broken.load(Ordering::Relaxed) {
            let want = self.wanted.load(Ordering::SeqCst);
            if want == self.registered.load(Ordering::SeqCst) {
                break;
            }
            let addr = IoEventAddress::Pio(u64::from(self.port));
            if want {
                if let Err(e) = self.fd.register_coalesced_mmio(addr, 1) {
                    self.broken.store(true, Ordering::Relaxed);
                    warn_limited!("port {:#x} writes will exit each: {e}", self.port);
                    break;
                }
                self.registered.store(true, Ordering::SeqCst);
            } else {
                // Off first, then drained: KVM appends until the unregister returns, and
                // what it appended must not wait for the next exit.
                if let Err(e) = self.fd.unregister_coalesced_mmio(addr, 1) {
                    self.broken.store(true, Ordering::Relaxed);
                    warn_limited!("cannot stop holding back port {:#x} writes: {e}", self.port);
                    break;
                }
                self.registered.store(false, Ordering::SeqCst);
                handled += self.drain_locked(pio);
                self.quiet_exits.store(0, Ordering::Relaxed);
                let next = self.threshold.load(Ordering::Relaxed).saturating_mul(2);
                self.threshold
                    .store(next.min(MAX_THRESHOLD), Ordering::Relaxed);
            }
        }
        handled
    }

    fn drain_locked(&self, pio: &Bus) -> u64 {
        let slots = self.ring.slots;
        let mut first = self.ring.index(0).load(Ordering::Relaxed);
        let last = self.ring.index(1).load(Ordering::Acquire);
        if first >= slots || last >= slots {
            // Not what KVM writes; start over rather than read outside the page.
            warn_limited!("coalesced I/O ring indices out of range ({first}, {last}); reset");
            self.ring.index(0).store(last % slots, Ordering::Release);
            return 0;
        }
        let mut handled = 0;
        while first != last {
            let e = self.ring.entry(first);
            let len = usize::try_from(e.len).unwrap_or(usize::MAX);
            // SAFETY: both members of the union are a plain u32; any value is valid.
            let is_port = unsafe { e.__bindgen_anon_1.pio } == 1;
            if is_port && e.phys_addr == u64::from(self.port) {
                if let Some(data) = e.data.get(..len) {
                    pio.write(e.phys_addr, data);
                    handled += 1;
                }
            }
            first = (first + 1) % slots;
            // Frees the slot for KVM, which reads `first` to see the room left.
            self.ring.index(0).store(first, Ordering::Release);
        }
        handled
    }
}
