//! What one virtio device counts: requests, bytes, and every refusal by its reason.
//!
//! Counting never blocks: every counter is a relaxed atomic, bumped from vCPU threads (the
//! transport) and from the VMM thread (the queues) alike.

use std::sync::atomic::{AtomicU64, Ordering};

use super::chain::ChainViolation;
use super::mmio::TransportViolation;
use crate::telemetry::DeviceSnapshot;

/// Why a device refused a well-formed chain's request. Shared by all device types, so the
/// telemetry export has one vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum RequestViolation {
    /// A request header that is too short or malformed.
    BadHeader,
    /// A request type or operation the device does not implement.
    Unsupported,
    /// A block request reaching past the end of the disk.
    OutOfRange,
    /// A data length that is not whole sectors, or disagrees with the request.
    BadLength,
    /// A write to a read-only disk.
    ReadOnly,
    /// No device-writable byte to put the request's status in.
    NoStatus,
    /// A device-readable buffer where the device only writes.
    UnexpectedReadable,
    /// A device-writable buffer where the device only reads.
    UnexpectedWritable,
    /// A frame sent with a source MAC address that is not the VM's.
    ForeignSourceMac,
    /// A vsock packet from another CID than the VM's, or to another than the host.
    WrongCid,
    /// A vsock peer sending more than the credit it was given.
    CreditOverrun,
    /// The host failed the I/O (not the guest's fault, but the guest saw an error).
    HostIo,
}

impl RequestViolation {
    pub const ALL: [RequestViolation; 12] = [
        RequestViolation::BadHeader,
        RequestViolation::Unsupported,
        RequestViolation::OutOfRange,
        RequestViolation::BadLength,
        RequestViolation::ReadOnly,
        RequestViolation::NoStatus,
        RequestViolation::UnexpectedReadable,
        RequestViolation::UnexpectedWritable,
        RequestViolation::ForeignSourceMac,
        RequestViolation::WrongCid,
        RequestViolation::CreditOverrun,
        RequestViolation::HostIo,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RequestViolation::BadHeader => "bad_header",
            RequestViolation::Unsupported => "unsupported",
            RequestViolation::OutOfRange => "out_of_range",
            RequestViolation::BadLength => "bad_length",
            RequestViolation::ReadOnly => "read_only",
            RequestViolation::NoStatus => "no_status",
            RequestViolation::UnexpectedReadable => "unexpected_readable",
            RequestViolation::UnexpectedWritable => "unexpected_writable",
            RequestViolation::ForeignSourceMac => "foreign_source_mac",
            RequestViolation::WrongCid => "wrong_cid",
            RequestViolation::CreditOverrun => "credit_overrun",
            RequestViolation::HostIo => "host_io",
        }
    }
}

/// A refusal, by the layer that refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Transport(TransportViolation),
    Chain(ChainViolation),
    Request(RequestViolation),
}

impl From<TransportViolation> for Refusal {
    fn from(v: TransportViolation) -> Refusal {
        Refusal::Transport(v)
    }
}

impl From<ChainViolation> for Refusal {
    fn from(v: ChainViolation) -> Refusal {
        Refusal::Chain(v)
    }
}

impl From<RequestViolation> for Refusal {
    fn from(v: RequestViolation) -> Refusal {
        Refusal::Request(v)
    }
}

/// One device's counters.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Requests (chains) the device took from its queues, valid or not.
    pub requests: AtomicU64,
    /// Bytes the device read from guest buffers.
    pub bytes_from_guest: AtomicU64,
    /// Bytes the device wrote into guest buffers.
    pub bytes_to_guest: AtomicU64,
    /// Interrupts raised.
    pub interrupts: AtomicU64,
    /// Host-side data the device dropped: no guest buffer big enough, or the backend full.
    pub dropped: AtomicU64,
    transport: [AtomicU64; TransportViolation::ALL.len()],
    chain: [AtomicU64; ChainViolation::ALL.len()],
    request: [AtomicU64; RequestViolation::ALL.len()],
}

impl DeviceCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn slot(&self, refusal: Refusal) -> Option<&AtomicU64> {
        match refusal {
            Refusal::Transport(v) => self.transport.get(v as usize),
            Refusal::Chain(v) => self.chain.get(v as usize),
            Refusal::Request(v) => self.request.get(v as usize),
        }
    }

    /// Counts one refusal.
    pub fn refuse(&self, refusal: impl Into<Refusal>) {
        if let Some(c) = self.slot(refusal.into()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How often the device refused for `refusal`.
    pub fn refusals(&self, refusal: impl Into<Refusal>) -> u64 {
        self.slot(refusal.into())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// A copy for reporting. Refusal reasons are named `layer.reason`; all are listed, zeros
    /// included, so an export has a stable shape.
    pub fn snapshot(&self, device: &str) -> DeviceSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut refusals = Vec::new();
        for v in TransportViolation::ALL {
            refusals.push((format!("transport.{}", v.name()), self.refusals(v)));
        }
        for v in ChainViolation::ALL {
            refusals.push((format!("chain.{}", v.name()), self.refusals(v)));
        }
        for v in RequestViolation::ALL {
            refusals.push((format!("request.{}", v.name()), self.refusals(v)));
        }
        DeviceSnapshot {
            device: device.to_string(),
            requests: load(&self.requests),
            bytes_from_guest: load(&self.bytes_from_guest),
            bytes_to_guest: load(&self.bytes_to_guest),
            interrupts: load(&self.interrupts),
            dropped: load(&self.dropped),
            refusals,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_lands_in_its_own_named_counter() {
        let c = DeviceCounters::default();
        c.refuse(ChainViolation::Loop);
        c.refuse(ChainViolation::Loop);
        c.refuse(TransportViolation::BadAccess);
        c.refuse(RequestViolation::ReadOnly);
        assert_eq!(c.refusals(ChainViolation::Loop), 2);
        assert_eq!(c.refusals(ChainViolation::ZeroLength), 0);
        let s = c.snapshot("virtio-blk0");
        let get = |name: &str| s.refusals.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        assert_eq!(get("chain.loop"), Some(2));
        assert_eq!(get("transport.bad_access"), Some(1));
        assert_eq!(get("request.read_only"), Some(1));
        assert_eq!(get("request.host_io"), Some(0));
        let text = s.to_string();
        assert!(text.starts_with("virtio-blk0:"), "{text}");
        assert!(text.contains("chain.loop=2"), "{text}");
        assert!(
            !text.contains("chain.zero_length"),
            "zeros are left out of the text: {text}"
        );
    }
}
