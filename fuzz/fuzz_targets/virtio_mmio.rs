//! The virtio-mmio transport, driven by a sequence of register reads and writes of any width
//! at any offset, in front of each real device's register side. Invariants: counters only
//! grow; the queue side is live only while the status shows FEATURES_OK and DRIVER_OK; the
//! magic and version registers never change.
#![no_main]


use bulkhead::devices::bus::BusDevice;
use bulkhead::devices::virtio::block::Block;
use bulkhead::devices::virtio::net::Net;
use bulkhead::devices::virtio::rng::Rng;
use bulkhead::devices::virtio::vsock::Vsock;
use bulkhead::devices::virtio::{DeviceShared, MmioTransport, VirtioDevice};
use bulkhead::telemetry::{OnViolation, Violation};
use bulkhead_fuzz::memory;
use libfuzzer_sys::fuzz_target;

const FEATURES_OK: u32 = 8;
const DRIVER_OK: u32 = 4;

fn device(kind: u8) -> Box<dyn VirtioDevice + Send> {
    match kind % 4 {
        0 => Box::new(Rng),
        1 => Box::new(Net::new([6, 0, 0, 0, 0, 1])),
        2 => Box::new(Vsock::new(3)),
        _ => {
            let file = bulkhead_fuzz::memfd(4096);
            let disk = bulkhead::devices::virtio::block::Disk::from_file(
                file,
                std::path::Path::new("fuzz.img"),
                kind & 4 != 0,
                "fuzz",
            )
            .expect("disk");
            Box::new(Block::new(&disk))
        }
    }
}

fn read32(t: &MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, ops)) = data.split_first() else {
        return;
    };
    let policy = if kind & 8 != 0 {
        OnViolation::ResetDevice
    } else {
        OnViolation::Log
    };
    let shared = DeviceShared::detached("virtio-fuzz0", policy).expect("device");
    // The rings the driver may point at: two regions of RAM with a hole, as elsewhere.
    let t = MmioTransport::new(device(kind), shared.clone(), memory(&[], 1));
    let counters = || -> Vec<u64> {
        Violation::all()
            .map(|v| shared.telemetry.refusals(v))
            .collect()
    };
    let (magic, version) = (read32(&t, 0), read32(&t, 4));
    let mut seen = counters();
    // Each operation: a kind byte (read or write, and the width), a 16-bit offset, and up to
    // eight bytes of value.
    for op in ops.chunks(11) {
        let [k, lo, hi, value @ ..] = op else {
            break;
        };
        let width = [1usize, 2, 4, 8, 3, 0][usize::from(k >> 1) % 6];
        let offset = u64::from(u16::from_le_bytes([*lo, *hi])) % 0x400;
        if k & 1 == 0 {
            let mut buf = [0u8; 8];
            let _ = t.read(offset, &mut buf[..width]);
        } else {
            let mut buf = [0u8; 8];
            for (d, s) in buf.iter_mut().zip(value) {
                *d = *s;
            }
            let _ = t.write(offset, &buf[..width]);
        }
        let now = counters();
        for (b, a) in seen.iter().zip(&now) {
            assert!(a >= b, "a refusal counter went down");
        }
        seen = now;
        let status = t.status();
        if shared.active().is_some() {
            assert!(
                status & (FEATURES_OK | DRIVER_OK) == FEATURES_OK | DRIVER_OK,
                "the queues are live with status {status:#x}"
            );
        }
        assert_eq!(read32(&t, 0), magic);
        assert_eq!(read32(&t, 4), version);
    }
});
