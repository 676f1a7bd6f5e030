//! virtio-fs (virtio 1.2 section 5.11), the register side: device id 26, a high-priority queue
//! and one request queue, and a read-only config space holding the share's tag (what the guest
//! mounts: `mount -t virtiofs TAG DIR`) and the number of request queues. The queues are
//! served by the vhost-user backend ([`super::vhost_user`]), never by the VMM: the queue side
//! here ([`FsQueues`]) only hands them to the backend when the driver starts the device and
//! takes them back when it resets it.
//!
//! What the guest writes reaches the backend through the transport's checks (feature
//! negotiation, status order, each ring inside RAM and not overlapping another) and nothing
//! else: FUSE requests are the backend's to parse, in its own sandbox.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::vhost_user::{Backend, BackendQueue};
use super::{
    read_config_bytes, ActivateError, QueueConfig, QueueContext, QueueHandler, VirtioDevice,
};
use crate::warn_limited;

pub const VIRTIO_ID_FS: u32 = 26;
/// The tag field's size in the config space; a shorter tag is NUL-padded.
pub const TAG_LEN: usize = crate::config::MAX_TAG_LEN;
/// The high-priority queue, then one request queue.
const QUEUE_SIZES: [u16; 2] = [1024, 1024];
/// How many queues a share's backend serves.
pub const QUEUES: usize = QUEUE_SIZES.len();
/// How long a reset waits for the backend to let go of the rings.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// Whether the backend holds the queues, so that a reset (the driver writing 0 to Status, on
/// a vCPU thread) returns only once the queue side has taken them back on the VMM thread:
/// the driver frees the rings when the write returns, and the backend must not write into
/// them after that.
#[derive(Debug, Default)]
struct Held {
    queues: Mutex<bool>,
    released: Condvar,
}

impl Held {
    fn set(&self, held: bool) {
        *self.queues.lock().unwrap_or_else(|e| e.into_inner()) = held;
        if !held {
            self.released.notify_all();
        }
    }

    /// Waits until the backend no longer holds the queues; false if it still did at the end.
    fn wait_released(&self, limit: Duration) -> bool {
        let held = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let (held, _) = self
            .released
            .wait_timeout_while(held, limit, |held| *held)
            .unwrap_or_else(|e| e.into_inner());
        !*held
    }
}
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// What the guest may be offered of the backend's features: the ring features the backend
/// implements. Nothing the transport would have to take part in (packed rings, an IOMMU)
/// passes, whatever the backend says; VERSION_1 the transport adds itself.
const PASSED_FEATURES: u64 = VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag {0:?}: use 1 to {TAG_LEN} characters from A-Z a-z 0-9 . _ -")]
    Tag(String),
}

/// The register side of one share.
#[derive(Debug)]
pub struct Fs {
    /// The config space: the tag, NUL-padded, then `num_request_queues` (le32).
    config: [u8; TAG_LEN + 4],
    features: u64,
    /// What the driver acked at its last start, for the queue side to tell the backend.
    acked: Arc<AtomicU64>,
    held: Arc<Held>,
}

/// A share's two sides: the register side, and the queue side that hands the queues to
/// `backend`.
pub fn split(tag: &str, backend: Backend) -> Result<(Fs, FsQueues), FsError> {
    let fs = Fs::new(tag, backend.features())?;
    let queues = FsQueues {
        backend,
        acked: fs.acked.clone(),
        held: fs.held.clone(),
        kicks: Vec::new(),
        call: None,
    };
    Ok((fs, queues))
}

impl Fs {
    /// The device for the share tagged `tag`, offering what of `backend_features` may pass.
    pub fn new(tag: &str, backend_features: u64) -> Result<Fs, FsError> {
        if !crate::config::is_share_tag(tag) {
            return Err(FsError::Tag(tag.to_string()));
        }
        let mut config = [0u8; TAG_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        let request_queues = (QUEUE_SIZES.len() as u32 - 1).to_le_bytes();
        config[TAG_LEN..].copy_from_slice(&request_queues);
        Ok(Fs {
            config,
            features: backend_features & PASSED_FEATURES,
            acked: Arc::new(AtomicU64::new(0)),
            held: Arc::new(Held::default()),
        })
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) -> bool {
        read_config_bytes(&self.config, offset, data)
    }

    /// The config space is read-only.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
        false
    }

    /// Both queues must be ready (the default rule); the acked features are kept for the
    /// backend.
    fn activate(
        &mut self,
        features: u64,
        queues: &[Option<QueueConfig>],
    ) -> Result<(), ActivateError> {
        if let Some(index) = queues.iter().position(Option::is_none) {
            return Err(ActivateError::QueueNotReady(
                u16::try_from(index).unwrap_or(u16::MAX),
            ));
        }
        self.acked.store(features, Ordering::Release);
        Ok(())
    }

    /// Returns once the backend has let go of the rings (the queue side stops it when it sees
    /// the reset), so the driver may free them.
    fn reset(&mut self) {
        if !self.held.wait_released(STOP_WAIT) {
            warn_limited!(
                "virtio-fs: the backend did not give the queues back within {STOP_WAIT:?}"
            );
        }
    }
}

/// The queue side of a share: the backend serves the queues; this gives them to it at each
/// start of the device and takes them back at each reset, on the VMM thread.
pub struct FsQueues {
    backend: Backend,
    acked: Arc<AtomicU64>,
    /// The queues' notification eventfds (the backend waits on them) and the device's irqfd
    /// (the backend signals it).
    kicks: Vec<EventFd>,
    call: Option<EventFd>,
    held: Arc<Held>,
}

impl FsQueues {
    /// Takes every queue back from the backend, then lets a waiting reset return.
    fn stop(&mut self) {
        if let Err(e) = self.backend.stop(QUEUES) {
            warn_limited!("virtio-fs: {}", crate::error_chain(&e));
        }
        self.held.set(false);
    }
}

impl QueueHandler for FsQueues {
    /// Never called with work: the worker leaves the queues' eventfds to the backend.
    fn process_queue(&mut self, _ctx: &mut QueueContext<'_>, _queue: usize) {}

    fn served_elsewhere(&self) -> bool {
        true
    }

    fn take_eventfds(&mut self, queues: &[EventFd], irq: &EventFd) -> std::io::Result<()> {
        self.kicks = queues
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<_, _>>()?;
        self.call = Some(irq.try_clone()?);
        Ok(())
    }

    fn activated(&mut self, ctx: &mut QueueContext<'_>) {
        let acked = self.acked.load(Ordering::Acquire);
        let queues: Option<Vec<BackendQueue<'_>>> = match &self.call {
            Some(call) => ctx
                .queues
                .iter()
                .zip(&self.kicks)
                .map(|(q, kick)| {
                    q.as_ref().map(|q| BackendQueue {
                        config: *q.config(),
                        kick,
                        call,
                    })
                })
                .collect(),
            None => None,
        };
        let result = match &queues {
            // The register side refused a start without every queue: not reached.
            None => return,
            Some(queues) => {
                // Held from the first request on: a reset must wait even for a start that
                // failed half-way.
                self.held.set(true);
                self.backend.activate(acked, ctx.mem, queues)
            }
        };
        if let Err(e) = result {
            // The host's fault (the backend went away), not the guest's: nothing is counted
            // against it, and the driver learns the device can not run. Whatever queues the
            // backend did take are taken back now.
            warn_limited!("{}: {}", ctx.shared.name(), crate::error_chain(&e));
            ctx.shared.set_needs_reset();
            self.stop();
        }
    }

    fn reset(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_space_holds_the_padded_tag_and_one_request_queue_and_refuses_writes() {
        let mut fs = Fs::new("hostfs", u64::MAX).unwrap();
        let mut tag = [0xffu8; TAG_LEN];
        assert!(fs.read_config(0, &mut tag));
        assert_eq!(&tag[..6], b"hostfs");
        assert!(tag[6..].iter().all(|&b| b == 0));
        let mut queues = [0u8; 4];
        assert!(fs.read_config(TAG_LEN as u64, &mut queues));
        assert_eq!(u32::from_le_bytes(queues), 1);
        // Past the end, and any write, is refused.
        assert!(!fs.read_config(TAG_LEN as u64 + 1, &mut queues));
        assert!(!fs.write_config(0, b"x"));
        assert_eq!(fs.device_type(), 26);
        assert_eq!(fs.queue_max_sizes().len(), 2);
        // Only the ring features pass, however much the backend offers.
        assert_eq!(fs.features(), PASSED_FEATURES);
    }

    #[test]
    fn a_reset_waits_until_the_queue_side_has_taken_the_queues_back() {
        let held = Arc::new(Held::default());
        // Nothing held: no wait.
        assert!(held.wait_released(Duration::ZERO));
        held.set(true);
        assert!(!held.wait_released(Duration::from_millis(10)), "still held");
        let releaser = {
            let held = held.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                held.set(false);
            })
        };
        // Released by the other side well within the limit: the wait ends then.
        assert!(held.wait_released(Duration::from_secs(60)));
        releaser.join().unwrap();
    }

    #[test]
    fn a_tag_too_long_empty_or_with_other_characters_is_refused() {
        assert!(Fs::new(&"t".repeat(TAG_LEN), 0).is_ok());
        for bad in ["", "a b", "a/b", "tag\0", &"t".repeat(TAG_LEN + 1)] {
            assert_eq!(
                Fs::new(bad, 0).err(),
                Some(FsError::Tag(bad.to_string())),
                "{bad:?}"
            );
        }
    }
}
