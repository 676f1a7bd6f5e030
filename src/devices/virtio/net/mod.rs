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
use super::worker::{drain, QueueContext, QueueHandler};
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
            let _ = rate_limiter::take(&mut self.rx_limiter, len as u64);
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
