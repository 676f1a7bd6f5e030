//! virtio-rng (entropy device, virtio 1.2 section 5.4): random bytes from the host's
//! getrandom(2), at most [`REQUEST_CAP`] per request.

use vm_memory::{Bytes, GuestAddress};

use super::chain::Chain;
use super::rate_limiter::RateLimiter;
use super::worker::{drain, HandlerState, QueueContext, QueueHandler};
use super::VirtioDevice;
use crate::telemetry::{DeviceCounter, RequestViolation};
use crate::warn_limited;

const VIRTIO_ID_RNG: u32 = 4;
const QUEUE_SIZES: [u16; 1] = [256];
/// The most bytes one request gets, however large its buffers: a guest can not make the
/// VMM thread spend long on one request.
pub const REQUEST_CAP: usize = 4096;
/// Buffers may add up to more than the cap (the driver just gets fewer bytes), but not to
/// more than this.
const MAX_CHAIN_BYTES: u64 = 1 << 20;

/// The register side: no features, no config space.
#[derive(Debug, Default)]
pub struct Rng;

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, _offset: u64, _data: &mut [u8]) -> bool {
        false
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
        false
    }
}

/// The queue side.
#[derive(Debug, Default)]
pub struct RngQueue {
    limiter: Option<RateLimiter>,
    /// A request the rate limiter holds back: the next one served.
    parked: Option<Chain>,
}

impl RngQueue {
    /// Limits the bytes and requests the guest may draw (Firecracker's entropy limiter).
    pub fn with_limiter(limiter: Option<RateLimiter>) -> RngQueue {
        RngQueue {
            limiter,
            parked: None,
        }
    }
}

/// What a request takes from the bandwidth bucket: what it will be given.
fn requested_bytes(chain: &Chain) -> u64 {
    chain.writable_len().min(REQUEST_CAP as u64)
}

impl QueueHandler for RngQueue {
    fn reset(&mut self) {
        self.parked = None;
    }

    fn held_chains(&self, _queue: usize) -> u16 {
        u16::from(self.parked.is_some())
    }

    fn save_state(&self) -> HandlerState {
        HandlerState::of_limiters(&[&self.limiter])
    }

    fn restore_state(&mut self, state: &HandlerState) -> bool {
        state.restore_limiters(&mut [&mut self.limiter]);
        true
    }

    fn process_queue(&mut self, ctx: &mut QueueContext<'_>, queue: usize) {
        let (limiter, parked) = (&mut self.limiter, &mut self.parked);
        drain(ctx, queue, |ctx| {
            while let Some(chain) =
                ctx.next_limited_chain(queue, MAX_CHAIN_BYTES, limiter, parked, requested_bytes)
            {
                let written = if chain.readable_len() > 0 {
                    ctx.refuse(RequestViolation::UnexpectedReadable);
                    0
                } else {
                    fill(ctx, &chain.buffers)
                };
                ctx.complete(queue, chain.head, written);
            }
        });
    }
}

/// Fills the chain's buffers with random bytes, up to the cap. Returns the bytes written.
fn fill(ctx: &QueueContext<'_>, buffers: &[super::chain::Buffer]) -> u32 {
    let mut random = [0u8; REQUEST_CAP];
    let mut written = 0usize;
    for buffer in buffers {
        let room = REQUEST_CAP - written;
        if room == 0 {
            break;
        }
        let want = room.min(buffer.len as usize);
        let Some(bytes) = random.get_mut(..want) else {
            break;
        };
        if let Err(e) = getrandom(bytes) {
            ctx.refuse(RequestViolation::HostIo);
            warn_limited!("{}: getrandom failed: {e}", ctx.device_name());
            break;
        }
        // The buffer was validated to lie inside one RAM region.
        if ctx
            .mem
            .write_slice(bytes, GuestAddress(buffer.addr))
            .is_err()
        {
            break;
        }
        written += want;
    }
    ctx.add(DeviceCounter::BytesToGuest, written as u64);
    u32::try_from(written).unwrap_or(0)
}

/// Fills `buf` from the kernel's CSPRNG (blocking only until it is first seeded).
pub(crate) fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let Some(rest) = buf.get_mut(done..) else {
            break;
        };
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}
