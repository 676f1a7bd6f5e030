//! A live virtqueue on the device side: virtio-queue keeps the ring indices, memory ordering
//! and notification suppression; [`read_chain`] decides whether each chain is acceptable.

use crate::vstate::dirty::GuestMemoryMmap;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;

use super::chain::{check_rings, read_chain, Chain, ChainError, ChainViolation};
use super::QueueConfig;

/// What the driver made available next.
#[derive(Debug, PartialEq, Eq)]
pub enum Popped {
    /// A chain that passed every check.
    Chain(Chain),
    /// A chain refused for `error.reason`; its head goes back to the driver unused.
    Refused { head: u16, error: ChainError },
    /// The rings themselves are unusable: the device can not go on.
    Broken(ChainError),
}

/// One queue of an activated device.
#[derive(Debug)]
pub struct GuestQueue {
    ring: Queue,
    config: QueueConfig,
    indirect: bool,
    /// Used entries added since the last interrupt decision.
    added: bool,
}

impl GuestQueue {
    /// A queue with the layout the driver configured and the features it negotiated. The
    /// transport has checked size and alignment; this checks the rings lie in guest RAM.
    pub fn new(
        mem: &GuestMemoryMmap,
        config: QueueConfig,
        features: u64,
    ) -> Result<GuestQueue, ChainError> {
        check_rings(mem, &config)?;
        let broken = |_| ChainError::new(ChainViolation::RingOutsideRam, config.desc_table, 0);
        let mut ring = Queue::new(config.size).map_err(broken)?;
        ring.try_set_desc_table_address(GuestAddress(config.desc_table))
            .map_err(broken)?;
        ring.try_set_avail_ring_address(GuestAddress(config.avail_ring))
            .map_err(broken)?;
        ring.try_set_used_ring_address(GuestAddress(config.used_ring))
            .map_err(broken)?;
        ring.set_event_idx(features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        ring.set_ready(true);
        Ok(GuestQueue {
            ring,
            config,
            indirect: features & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0,
            added: false,
        })
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Where the device is in the rings: the next available entry it will take, and the next
    /// used entry it will fill.
    pub fn position(&self) -> (u16, u16) {
        (self.ring.next_avail(), self.ring.next_used())
    }

    /// Puts the device back at a saved position (a restore). The driver's available index is
    /// still checked against it on the next pop, as always.
    pub fn set_position(&mut self, next_avail: u16, next_used: u16) {
        self.ring.set_next_avail(next_avail);
        self.ring.set_next_used(next_used);
    }

    /// The next available chain, validated, or None when the driver has made nothing new
    /// available. `max_bytes` is the largest request the device accepts.
    pub fn pop(&mut self, mem: &GuestMemoryMmap, max_bytes: u64) -> Option<Popped> {
        let head = match self.ring.iter(mem) {
            Ok(mut available) => available.next()?.head_index(),
            Err(virtio_queue::Error::InvalidAvailRingIndex) => {
                // The evidence: where the driver moved the index, and where the device was.
                let avail = self
                    .ring
                    .avail_idx(mem, std::sync::atomic::Ordering::Relaxed)
                    .map_or(0, |w| u64::from(w.0));
                let seen = u64::from(self.ring.next_avail());
                let error = ChainError::new(ChainViolation::AvailIndexJump, avail, seen);
                return Some(Popped::Broken(error));
            }
            Err(_) => {
                let error =
                    ChainError::new(ChainViolation::RingOutsideRam, self.config.avail_ring, 0);
                return Some(Popped::Broken(error));
            }
        };
        Some(
            match read_chain(mem, &self.config, head, self.indirect, max_bytes) {
                Ok(chain) => Popped::Chain(chain),
                Err(error) => Popped::Refused { head, error },
            },
        )
    }

    /// Returns chain `head` to the driver with `len` bytes written. False when the head is
    /// not a descriptor of this queue (it is then dropped: there is nothing to return).
    pub fn add_used(&mut self, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
        if head >= self.config.size {
            return false;
        }
        let ok = self.ring.add_used(mem, head, len).is_ok();
        self.added |= ok;
        ok
    }

    /// Whether the driver wants an interrupt for the entries added since the last call.
    pub fn take_interrupt(&mut self, mem: &GuestMemoryMmap) -> bool {
        if !std::mem::take(&mut self.added) {
            return false;
        }
        // On a read error, interrupt: a spurious interrupt is harmless, a lost one stalls.
        self.ring.needs_notification(mem).unwrap_or(true)
    }

    /// Asks the driver not to notify while the device is draining the queue.
    pub fn disable_notification(&mut self, mem: &GuestMemoryMmap) {
        let _ = self.ring.disable_notification(mem);
    }

    /// Asks the driver to notify again; true when more chains arrived in the meantime.
    pub fn enable_notification(&mut self, mem: &GuestMemoryMmap) -> bool {
        self.ring.enable_notification(mem).unwrap_or(false)
    }
}
