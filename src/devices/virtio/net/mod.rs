//! virtio-net (virtio 1.2 section 5.1) on a tap: one receive and one transmit queue.
//!
//! No offloads are offered, so every header the driver sends must be all zeros (no checksum
//! or segmentation requests); anything else is refused and counted. A frame whose source MAC
//! is not the VM's never reaches the tap: a tenant can not spoof another's address.

mod tap;

use std::os::fd::RawFd;

use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;

pub use tap::{Tap, TapError, MAX_NAME_LEN as MAX_TAP_NAME_LEN};

use super::chain::Chain;
use super::rate_limiter::{self, RateLimiter};
use super::worker::{drain, HandlerState, QueueContext, QueueHandler};
use super::RequestError;
use super::{read_config_bytes, VirtioDevice};
use crate::telemetry::{DeviceCounter, RequestViolation};
use crate::{debug_limited, warn_limited};

const VIRTIO_ID_NET: u32 = 1;
const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZES: [u16; 2] = [256, 256];
/// struct virtio_net_hdr_v1 (VERSION_1 always uses this size).
const HEADER_LEN: usize = 12;
const NUM_BUFFERS_OFFSET: usize = 10;
const ETH_HEADER_LEN: usize = 14;
/// The largest frame: Linux's largest MTU on virtio-net without offloads, plus the Ethernet
/// and VLAN headers.
const MAX_FRAME: usize = 65535 + ETH_HEADER_LEN + 4;
const MAX_CHAIN_BYTES: u64 = (HEADER_LEN + MAX_FRAME) as u64;
const TAP_TOKEN: u32 = 0;

/// The register side: the MAC address in config space.
#[derive(Debug)]
pub struct Net {
    mac: [u8; 6],
}

impl Net {
    pub fn new(mac: [u8; 6]) -> Net {
        Net { mac }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_NET_F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) -> bool {
        read_config_bytes(&self.mac, offset, data)
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
        // The MAC is the VMM's to choose (VIRTIO_NET_F_CTRL_MAC_ADDR is not offered).
        false
    }
}

/// The queue side: frames between the queues and the tap.
#[derive(Debug)]
pub struct NetQueues {
    tap: Tap,
    mac: [u8; 6],
    /// A frame read from the tap that waits for a receive buffer.
    pending: Option<usize>,
    rx_frame: Vec<u8>,
    tx_frame: Vec<u8>,
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
    /// A frame to send that the tx limiter holds back: the next one sent.
    tx_parked: Option<Chain>,
}

impl NetQueues {
    pub fn new(tap: Tap, mac: [u8; 6]) -> NetQueues {
        NetQueues {
            tap,
            mac,
            pending: None,
            rx_frame: vec![0; MAX_FRAME],
            tx_frame: Vec::with_capacity(MAX_FRAME),
            rx_limiter: None,
            tx_limiter: None,
            tx_parked: None,
        }
    }

    /// Limits what the guest receives (`rx`) and sends (`tx`): bytes and frames.
    pub fn with_limiters(mut self, rx: Option<RateLimiter>, tx: Option<RateLimiter>) -> Self {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
        self
    }

    /// Moves frames from the tap into receive buffers until either runs out.
    fn receive(&mut self, ctx: &mut QueueContext<'_>) {
        loop {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(Some(len)) => len,
                    Ok(None) => return,
                    Err(e) => {
                        warn_limited!(
                            "{}: tap {} read failed: {e}",
                            ctx.device_name(),
                            self.tap.name()
                        );
                        return;
                    }
                },
            };
            // The frame waits here (the tap keeps the rest) while the limiter says so.
            if let Err(wait) = rate_limiter::peek(&mut self.rx_limiter, len as u64) {
                self.pending = Some(len);
                ctx.throttle(RX, wait);
                return;
            }
            let Some(chain) = ctx.next_chain(RX, MAX_CHAIN_BYTES) else {
                // Wait for the driver to add buffers; the frame stays here meanwhile.
                self.pending = Some(len);
                return;
            };
            // Checked just above, on this thread: the tokens are there.
            if let Some(l) = &mut self.rx_limiter {
                l.consume(len as u64);
            }
            let written = self.deliver(ctx, &chain, len);
            if written.is_none() {
                // This chain could not take the frame: the frame is dropped (it would not
                // fit the next one either, or the chain was not a receive buffer).
                ctx.add(DeviceCounter::Dropped, 1);
            }
            ctx.complete(RX, chain.head, written.unwrap_or(0));
        }
    }

    /// Writes the header and frame into `chain`; the bytes written, or None when refused.
    fn deliver(&self, ctx: &QueueContext<'_>, chain: &Chain, len: usize) -> Option<u32> {
        if chain.readable_len() > 0 {
            ctx.refuse(RequestViolation::UnexpectedReadable);
            return None;
        }
        let total = HEADER_LEN + len;
        // num_buffers = 1: without VIRTIO_NET_F_MRG_RXBUF each frame uses one chain.
        let mut header = [0u8; HEADER_LEN];
        header[NUM_BUFFERS_OFFSET] = 1;
        let frame = self.rx_frame.get(..len)?;
        // Refused when the frame does not fit the chain's writable buffers.
        if !chain.write_parts(ctx.mem, &[&header, frame]) {
            return None;
        }
        ctx.add(DeviceCounter::BytesToGuest, total as u64);
        u32::try_from(total).ok()
    }

    /// Sends every frame the driver queued.
    fn transmit(&mut self, ctx: &mut QueueContext<'_>) {
        let NetQueues {
            tap,
            mac,
            tx_frame,
            tx_limiter,
            tx_parked,
            ..
        } = self;
        let mut sender = Sender { tap, mac, tx_frame };
        drain(ctx, TX, |ctx| {
            while let Some(chain) =
                ctx.next_limited_chain(TX, MAX_CHAIN_BYTES, tx_limiter, tx_parked, frame_bytes)
            {
                if let Err(reason) = sender.send(ctx, &chain) {
                    ctx.refuse(reason);
                }
                ctx.complete(TX, chain.head, 0);
            }
        });
    }
}

/// What a frame to send takes from the bandwidth bucket: the frame, less the virtio header.
fn frame_bytes(chain: &Chain) -> u64 {
    chain.readable_len().saturating_sub(HEADER_LEN as u64)
}

/// The transmit side's share of [`NetQueues`].
struct Sender<'a> {
    tap: &'a mut Tap,
    mac: &'a [u8; 6],
    tx_frame: &'a mut Vec<u8>,
}

impl Sender<'_> {
    fn send(&mut self, ctx: &QueueContext<'_>, chain: &Chain) -> Result<(), RequestError> {
        if chain.writable_len() > 0 {
            return Err(RequestViolation::UnexpectedWritable.into());
        }
        self.tx_frame.clear();
        if !chain.read_into(ctx.mem, self.tx_frame) {
            return Err(RequestViolation::HostIo.into());
        }
        let (header, frame) = self
            .tx_frame
            .split_at_checked(HEADER_LEN)
            .ok_or(RequestError::new(RequestViolation::BadHeader, 0, 0))?;
        // Without offloads there is nothing to ask for: flags, GSO type, lengths and offsets
        // must all be zero. num_buffers (the last two bytes) is not checked: the specification
        // wants zero, but Linux leaves it uninitialised when MRG_RXBUF is not negotiated.
        if header
            .get(..NUM_BUFFERS_OFFSET)
            .is_some_and(|h| h.iter().any(|&b| b != 0))
        {
            debug_limited!(
                "{}: refused virtio-net header {header:02x?}",
                ctx.device_name()
            );
            return Err(RequestViolation::BadHeader.into());
        }
        if frame.len() < ETH_HEADER_LEN {
            return Err(RequestError::new(
                RequestViolation::BadLength,
                0,
                frame.len() as u64,
            ));
        }
        if frame.get(6..12) != Some(&self.mac[..]) {
            // The evidence: the MAC the guest claimed, as a 48-bit number.
            let mac = frame.get(6..12).map_or(0, |m| {
                m.iter().fold(0u64, |acc, &b| acc << 8 | u64::from(b))
            });
            return Err(RequestError::new(
                RequestViolation::ForeignSourceMac,
                mac,
                frame.len() as u64,
            ));
        }
        match self.tap.write_frame(frame) {
            Ok(true) => ctx.add(DeviceCounter::BytesFromGuest, frame.len() as u64),
            // A full queue, or the tap's link is down (EIO): the wire drops the frame.
            Ok(false) => ctx.add(DeviceCounter::Dropped, 1),
            Err(e) => {
                warn_limited!(
                    "{}: tap {} write failed: {e}",
                    ctx.device_name(),
                    self.tap.name()
                );
                return Err(RequestViolation::HostIo.into());
            }
        }
        Ok(())
    }
}

impl QueueHandler for NetQueues {
    fn process_queue(&mut self, ctx: &mut QueueContext<'_>, queue: usize) {
        match queue {
            RX => self.receive(ctx),
            TX => self.transmit(ctx),
            _ => {}
        }
    }

    fn activated(&mut self, ctx: &mut QueueContext<'_>) {
        self.receive(ctx);
    }

    fn reset(&mut self) {
        self.pending = None;
        self.tx_parked = None;
    }

    fn held_chains(&self, queue: usize) -> u16 {
        // A received frame waiting for room is host data, not a chain: it is dropped, as a
        // frame on a busy link may be.
        if queue == TX {
            u16::from(self.tx_parked.is_some())
        } else {
            0
        }
    }

    fn save_state(&self) -> HandlerState {
        HandlerState::of_limiters(&[&self.rx_limiter, &self.tx_limiter])
    }

    fn restore_state(&mut self, state: &HandlerState) -> bool {
        state.restore_limiters(&mut [&mut self.rx_limiter, &mut self.tx_limiter]);
        true
    }

    fn backend_fds(&self) -> Vec<(RawFd, u32)> {
        vec![(self.tap.as_raw_fd(), TAP_TOKEN)]
    }

    fn backend_ready(&mut self, ctx: Option<&mut QueueContext<'_>>, _token: u32) {
        match ctx {
            Some(ctx) => self.receive(ctx),
            // The link is down until the driver starts the device: drop what arrives.
            None => {
                while let Ok(Some(_)) = self.tap.read_frame(&mut self.rx_frame) {}
                self.pending = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    use std::time::{Duration, Instant};

    use crate::vstate::dirty::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::virtio::queue::GuestQueue;
    use crate::devices::virtio::rate_limiter::{RateLimiter, TokenBucket};
    use crate::devices::virtio::{DeviceShared, QueueConfig, VirtioWorker};
    use crate::telemetry::OnViolation;

    const MAC: [u8; 6] = [6, 0, 0, 0, 0, 1];

    /// A tap stand-in: one end of a datagram socket pair, and the wire at the other end.
    fn wire() -> (Tap, std::fs::File) {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair returns.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: both descriptors are new and owned by nothing else.
        let (a, b) = unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        };
        (Tap::from_file(a, "test0"), b)
    }

    fn frames_on(wire: &mut std::fs::File) -> usize {
        let mut buf = [0u8; 2048];
        std::iter::from_fn(|| wire.read(&mut buf).ok()).count()
    }

    #[test]
    fn a_tx_limit_of_one_frame_per_100_ms_holds_the_rest_until_the_bucket_refills() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let shared = DeviceShared::detached("virtio-net0", OnViolation::Log).unwrap();
        // The TX queue (1) at 0x1000..; three 60-byte frames from the VM's MAC.
        let tx = QueueConfig {
            size: 16,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        };
        let mut frame = vec![0u8; HEADER_LEN + 60];
        frame[HEADER_LEN + 6..HEADER_LEN + 12].copy_from_slice(&MAC);
        for i in 0..3u64 {
            let buf = 0x4000 + i * 0x100;
            mem.write_slice(&frame, GuestAddress(buf)).unwrap();
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&buf.to_le_bytes());
            d[8..12].copy_from_slice(&(frame.len() as u32).to_le_bytes());
            mem.write_slice(&d, GuestAddress(0x1000 + i * 16)).unwrap();
            mem.write_obj(i as u16, GuestAddress(0x2004 + i * 2))
                .unwrap();
        }
        mem.write_obj(3u16, GuestAddress(0x2002)).unwrap();
        let queue = GuestQueue::new(&mem, tx, 0).unwrap();
        shared.activate(vec![None, Some(queue)]);
        let (tap, mut wire) = wire();
        let now = Instant::now();
        let ops = TokenBucket::new(1, 0, Duration::from_millis(100), now);
        let queues = NetQueues::new(tap, MAC).with_limiters(None, RateLimiter::new(None, ops));
        let mut worker =
            VirtioWorker::new(shared.clone(), mem, vec![evt(), evt()], Box::new(queues)).unwrap();
        assert!(worker.serve_now(1, 0));
        assert_eq!(frames_on(&mut wire), 1, "the bucket held one frame");
        assert_eq!(shared.telemetry.get(DeviceCounter::Throttled), 1);
        // Asked again at once (a driver's notification): still nothing to give.
        worker.serve_now(1, 0);
        assert_eq!(frames_on(&mut wire), 0);
        std::thread::sleep(Duration::from_millis(110));
        worker.serve_now(1, 0);
        assert_eq!(frames_on(&mut wire), 1, "one frame per refill");
        std::thread::sleep(Duration::from_millis(110));
        worker.serve_now(1, 0);
        assert_eq!(frames_on(&mut wire), 1);
        assert!(now.elapsed() >= Duration::from_millis(200));
    }

    #[test]
    fn an_rx_bandwidth_limit_keeps_the_frame_waiting_until_the_bucket_has_room() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let shared = DeviceShared::detached("virtio-net0", OnViolation::Log).unwrap();
        // The RX queue (0): four 2 KiB receive buffers.
        let rx = QueueConfig {
            size: 16,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        };
        for i in 0..4u64 {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&(0x4000 + i * 0x800).to_le_bytes());
            d[8..12].copy_from_slice(&2048u32.to_le_bytes());
            d[12..14].copy_from_slice(&2u16.to_le_bytes()); // VIRTQ_DESC_F_WRITE
            mem.write_slice(&d, GuestAddress(0x1000 + i * 16)).unwrap();
            mem.write_obj(i as u16, GuestAddress(0x2004 + i * 2))
                .unwrap();
        }
        mem.write_obj(4u16, GuestAddress(0x2002)).unwrap();
        let queue = GuestQueue::new(&mem, rx, 0).unwrap();
        shared.activate(vec![Some(queue), None]);
        let (tap, wire) = wire();
        // Three 60-byte frames from the network; 100 bytes per 100 ms may reach the guest.
        for _ in 0..3 {
            std::io::Write::write_all(&mut &wire, &[0xffu8; 60]).unwrap();
        }
        let bw = TokenBucket::new(100, 0, Duration::from_millis(100), Instant::now());
        let queues = NetQueues::new(tap, MAC).with_limiters(RateLimiter::new(bw, None), None);
        let mut worker = VirtioWorker::new(
            shared.clone(),
            mem.clone(),
            vec![evt(), evt()],
            Box::new(queues),
        )
        .unwrap();
        let used = |mem: &GuestMemoryMmap| mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap();
        worker.serve_now(0, 0);
        assert_eq!(used(&mem), 1, "the first frame fits the bucket");
        assert_eq!(shared.telemetry.get(DeviceCounter::Throttled), 1);
        std::thread::sleep(Duration::from_millis(70));
        worker.serve_now(0, 0);
        assert_eq!(used(&mem), 2, "60 bytes earned after 60 ms");
        std::thread::sleep(Duration::from_millis(70));
        worker.serve_now(0, 0);
        assert_eq!(used(&mem), 3);
        // Nothing was dropped on the way: the frames waited.
        assert_eq!(shared.telemetry.get(DeviceCounter::Dropped), 0);
        assert_eq!(
            shared.telemetry.get(DeviceCounter::BytesToGuest),
            3 * (HEADER_LEN as u64 + 60)
        );
    }
}
