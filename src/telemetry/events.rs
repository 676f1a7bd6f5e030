//! Events: the evidence behind a counter, carried from the VM process to the supervisor through
//! the ring. Counters say how often; an event says where (vCPU, device, queue, guest address,
//! port) so an alert can name it.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::region::{Region, MAX_DEVICES, MAX_VCPUS};
use super::ring::RawEvent;
use super::vocabulary::{Violation, VmCounter};

/// Something the guest did that a rule may want to see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A virtio device refused something. `a` and `b` are the evidence, by layer: the
    /// register offset and value written (transport), the guest address and length of the
    /// offending buffer or ring (chain), or request details (request: see
    /// [`request_evidence`]).
    Violation {
        device: u16,
        violation: Violation,
        queue: Option<u16>,
        a: u64,
        b: u64,
    },
    /// A port access no device claims.
    UnassignedPio {
        vcpu: u16,
        port: u16,
        size: u8,
        write: bool,
    },
    /// An MMIO access to an address with neither RAM nor a device.
    UnassignedMmio {
        vcpu: u16,
        addr: u64,
        size: u8,
        write: bool,
    },
    /// An MSR access outside the allow-list; answered with #GP.
    Msr {
        vcpu: u16,
        index: u32,
        write: bool,
        value: u64,
    },
    /// A vCPU triple-faulted.
    TripleFault { vcpu: u16 },
    /// KVM could not emulate an instruction (`internal`, with its suberror) or enter the
    /// guest (with the hardware reason).
    EntryFailure {
        vcpu: u16,
        internal: bool,
        code: u64,
    },
}

const KIND_VIOLATION: u64 = 1;
const KIND_PIO: u64 = 2;
const KIND_MMIO: u64 = 3;
const KIND_MSR: u64 = 4;
const KIND_TRIPLE: u64 = 5;
const KIND_ENTRY: u64 = 6;

const FLAG_WRITE: u64 = 1;
const FLAG_QUEUE: u64 = 2;
const FLAG_INTERNAL: u64 = 4;

/// word: kind (bits 0-7), layer (8-15), reason (16-23), flags (24-31), source vCPU or device
/// (32-47), queue (48-63).
fn word(kind: u64, layer: u8, reason: u8, flags: u64, source: u16, queue: u16) -> u64 {
    kind | u64::from(layer) << 8
        | u64::from(reason) << 16
        | flags << 24
        | u64::from(source) << 32
        | u64::from(queue) << 48
}

/// How many vCPUs and devices the VM really has, as the supervisor knows from its own
/// configuration: events naming others are rejected.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub vcpus: u16,
    pub devices: u16,
}

impl Event {
    /// False for probes of unassigned ports and MMIO (legacy devices' ports too): a guest can
    /// make them by the hundred thousand, so they may not fill the ring's last cells, which
    /// stay free for violations, faults and MSR probes.
    pub fn is_urgent(&self) -> bool {
        !matches!(
            self,
            Event::UnassignedPio { .. } | Event::UnassignedMmio { .. }
        )
    }

    pub fn encode(&self, time_ns: u64) -> RawEvent {
        let (word, a, b) = match *self {
            Event::Violation {
                device,
                violation,
                queue,
                a,
                b,
            } => {
                let (layer, reason) = violation.encode();
                let flags = if queue.is_some() { FLAG_QUEUE } else { 0 };
                let w = word(
                    KIND_VIOLATION,
                    layer,
                    reason,
                    flags,
                    device,
                    queue.unwrap_or(0),
                );
                (w, a, b)
            }
            Event::UnassignedPio {
                vcpu,
                port,
                size,
                write,
            } => {
                let flags = if write { FLAG_WRITE } else { 0 };
                (word(KIND_PIO, 0, size, flags, vcpu, 0), u64::from(port), 0)
            }
            Event::UnassignedMmio {
                vcpu,
                addr,
                size,
                write,
            } => {
                let flags = if write { FLAG_WRITE } else { 0 };
                (word(KIND_MMIO, 0, size, flags, vcpu, 0), addr, 0)
            }
            Event::Msr {
                vcpu,
                index,
                write,
                value,
            } => {
                let flags = if write { FLAG_WRITE } else { 0 };
                (
                    word(KIND_MSR, 0, 0, flags, vcpu, 0),
                    u64::from(index),
                    value,
                )
            }
            Event::TripleFault { vcpu } => (word(KIND_TRIPLE, 0, 0, 0, vcpu, 0), 0, 0),
            Event::EntryFailure {
                vcpu,
                internal,
                code,
            } => {
                let flags = if internal { FLAG_INTERNAL } else { 0 };
                (word(KIND_ENTRY, 0, 0, flags, vcpu, 0), code, 0)
            }
        };
        RawEvent {
            word,
            a,
            b,
            c: 0,
            time_ns,
        }
    }

    /// Turns untrusted words back into an event, or None when they name no valid event of
    /// this VM.
    pub fn decode(raw: &RawEvent, limits: Limits) -> Option<Event> {
        let w = raw.word;
        let kind = w & 0xff;
        let layer = (w >> 8) as u8;
        let reason = (w >> 16) as u8;
        let flags = (w >> 24) & 0xff;
        let source = (w >> 32) as u16;
        let queue = (w >> 48) as u16;
        let write = flags & FLAG_WRITE != 0;
        let vcpu_ok = source < limits.vcpus && usize::from(source) < MAX_VCPUS;
        let event = match kind {
            KIND_VIOLATION => {
                if source >= limits.devices || usize::from(source) >= MAX_DEVICES {
                    return None;
                }
                Event::Violation {
                    device: source,
                    violation: Violation::decode(layer, reason)?,
                    queue: (flags & FLAG_QUEUE != 0).then_some(queue),
                    a: raw.a,
                    b: raw.b,
                }
            }
            KIND_PIO if vcpu_ok && matches!(reason, 1 | 2 | 4) => Event::UnassignedPio {
                vcpu: source,
                port: u16::try_from(raw.a).ok()?,
                size: reason,
                write,
            },
            KIND_MMIO if vcpu_ok && matches!(reason, 1 | 2 | 4 | 8) => Event::UnassignedMmio {
                vcpu: source,
                addr: raw.a,
                size: reason,
                write,
            },
            KIND_MSR if vcpu_ok => Event::Msr {
                vcpu: source,
                index: u32::try_from(raw.a).ok()?,
                write,
                value: raw.b,
            },
            KIND_TRIPLE if vcpu_ok => Event::TripleFault { vcpu: source },
            KIND_ENTRY if vcpu_ok => Event::EntryFailure {
                vcpu: source,
                internal: flags & FLAG_INTERNAL != 0,
                code: raw.a,
            },
            _ => return None,
        };
        Some(event)
    }
}

/// The VM process's side: counts into the region and posts events, never blocking.
#[derive(Debug, Clone)]
pub struct Reporter {
    region: Arc<Region>,
    /// Wakes the supervisor; None when nobody listens (a VM run in-process by tests).
    wake: Option<Arc<EventFd>>,
}

impl Reporter {
    pub fn new(region: Arc<Region>, wake: Option<EventFd>) -> Reporter {
        Reporter {
            region,
            wake: wake.map(Arc::new),
        }
    }

    /// A reporter over a private region, for code run without a supervisor (tests).
    pub fn detached() -> Result<Reporter, super::region::RegionError> {
        Ok(Reporter::new(Arc::new(Region::anonymous()?), None))
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Sends `event` to the supervisor; a full channel drops it and counts the drop. The
    /// wake-up is one eventfd write per supervisor drain, not one per event.
    pub fn post(&self, event: Event) {
        if !self
            .region
            .ring
            .push(event.encode(monotonic_ns()), event.is_urgent())
        {
            self.region.count(VmCounter::EventsDropped);
            return;
        }
        if self.region.ring.needs_wake() {
            if let Some(wake) = &self.wake {
                // A full eventfd counter still leaves the supervisor awake.
                let _ = wake.write(1);
            }
        }
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds (a vDSO call, no system call on this host).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Names for a request refusal's two evidence words, by reason.
pub fn request_evidence(v: super::vocabulary::RequestViolation) -> (&'static str, &'static str) {
    use super::vocabulary::RequestViolation::*;
    match v {
        OutOfRange | BadLength | ReadOnly | HostIo => ("sector", "length"),
        ImageMagic => ("format", "length"),
        ForeignSourceMac => ("source_mac", "frame_length"),
        WrongCid => ("source_cid", "destination_cid"),
        CreditOverrun => ("credit", "bytes"),
        BadHeader | Unsupported | NoStatus | UnexpectedReadable | UnexpectedWritable => {
            ("request_type", "length")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::vocabulary::{ChainViolation, RequestViolation};

    const LIMITS: Limits = Limits {
        vcpus: 2,
        devices: 3,
    };

    #[test]
    fn every_kind_of_event_survives_the_ring_words() {
        let events = [
            Event::Violation {
                device: 2,
                violation: Violation::Chain(ChainViolation::OutsideRam),
                queue: Some(1),
                a: 0xc000_0000,
                b: 64,
            },
            Event::Violation {
                device: 0,
                violation: Violation::Request(RequestViolation::ImageMagic),
                queue: None,
                a: 0,
                b: 512,
            },
            Event::UnassignedPio {
                vcpu: 1,
                port: 0x3f4,
                size: 1,
                write: false,
            },
            Event::UnassignedMmio {
                vcpu: 0,
                addr: 0xc000_1000,
                size: 4,
                write: true,
            },
            Event::Msr {
                vcpu: 0,
                index: 0x1234_5678,
                write: true,
                value: 9,
            },
            Event::TripleFault { vcpu: 1 },
            Event::EntryFailure {
                vcpu: 0,
                internal: true,
                code: 1,
            },
        ];
        for e in events {
            assert_eq!(Event::decode(&e.encode(5), LIMITS), Some(e));
        }
    }

    #[test]
    fn events_naming_vcpus_devices_or_reasons_the_vm_lacks_are_rejected() {
        let bad_device = Event::Violation {
            device: 3,
            violation: Violation::Chain(ChainViolation::Loop),
            queue: None,
            a: 0,
            b: 0,
        };
        assert_eq!(Event::decode(&bad_device.encode(0), LIMITS), None);
        let bad_vcpu = Event::TripleFault { vcpu: 2 };
        assert_eq!(Event::decode(&bad_vcpu.encode(0), LIMITS), None);
        let mut raw = Event::TripleFault { vcpu: 0 }.encode(0);
        raw.word = (raw.word & !0xff) | 99;
        assert_eq!(Event::decode(&raw, LIMITS), None);
        let raw = RawEvent {
            word: word(KIND_VIOLATION, 1, 250, 0, 0, 0),
            ..Default::default()
        };
        assert_eq!(Event::decode(&raw, LIMITS), None);
        let raw = RawEvent {
            word: word(KIND_PIO, 0, 3, 0, 0, 0),
            ..Default::default()
        };
        assert_eq!(Event::decode(&raw, LIMITS), None, "a 3-byte port access");
    }

    #[test]
    fn floods_of_probes_leave_room_for_an_attack_event() {
        let r = Reporter::detached().unwrap();
        for i in 0..2 * crate::telemetry::ring::CELLS {
            r.post(Event::UnassignedPio {
                vcpu: 0,
                port: 0x4000 + (i % 64) as u16,
                size: 1,
                write: false,
            });
        }
        assert!(r.region().vm_counter(VmCounter::EventsDropped) > 0);
        let attack = Event::Msr {
            vcpu: 0,
            index: 0x1234_5678,
            write: false,
            value: 0,
        };
        let dropped = r.region().vm_counter(VmCounter::EventsDropped);
        r.post(attack);
        assert_eq!(r.region().vm_counter(VmCounter::EventsDropped), dropped);
    }

    #[test]
    fn a_full_channel_counts_the_dropped_event() {
        let r = Reporter::detached().unwrap();
        for _ in 0..crate::telemetry::ring::CELLS {
            r.post(Event::TripleFault { vcpu: 0 });
        }
        assert_eq!(r.region().vm_counter(VmCounter::EventsDropped), 0);
        r.post(Event::TripleFault { vcpu: 0 });
        assert_eq!(r.region().vm_counter(VmCounter::EventsDropped), 1);
    }
}
