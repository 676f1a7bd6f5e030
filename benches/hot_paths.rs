//! Criterion micro-benchmarks of the paths every guest request takes through bulkhead, with no
//! KVM in the loop: exit dispatch (port I/O and MMIO, each with its telemetry), descriptor
//! chain validation, a whole virtio-blk request served from an in-memory ring, and the
//! telemetry updates alone. Run with `cargo bench --bench hot_paths`.
//!
//! They isolate bulkhead's own share of an exit or a request, which the end-to-end figures
//! (`scripts/bench`) can only show as a difference from the bare-KVM floor.

use std::hint::black_box;
use std::sync::{Arc, Mutex};

use bulkhead::vstate::dirty::GuestMemoryMmap;
use criterion::{criterion_group, criterion_main, Criterion};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use bulkhead::devices::legacy::{IoDelayPort, SerialPort};
use bulkhead::devices::virtio::block::{Block, BlockQueue, Disk};
use bulkhead::devices::virtio::chain::read_chain;
use bulkhead::devices::virtio::mmio::MmioTransport;
use bulkhead::devices::virtio::queue::GuestQueue;
use bulkhead::devices::virtio::shared::DeviceShared;
use bulkhead::devices::virtio::worker::VirtioWorker;
use bulkhead::devices::virtio::QueueConfig;
use bulkhead::devices::Bus;
use bulkhead::exit::ExitSignal;
use bulkhead::telemetry::{
    DeviceCounter, DeviceTelemetry, Event, ExitKind, OnViolation, Reporter, VmCounter,
};
use bulkhead::vstate::vcpu::{handle_exit, ExitAction, VcpuIo};

const MMIO_BASE: u64 = 0xd000_0000;
const QUEUE: QueueConfig = QueueConfig {
    size: 256,
    desc_table: 0x10_0000,
    avail_ring: 0x11_0000,
    used_ring: 0x12_0000,
};
/// Where request headers, data and status bytes go.
const HEADER: u64 = 0x20_0000;
const DATA: u64 = 0x30_0000;
const STATUS: u64 = 0x40_0000;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTIO_BLK_T_IN: u32 = 0;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("guest memory")
}

fn shared(name: &str) -> Arc<DeviceShared> {
    DeviceShared::detached(name, OnViolation::Log).expect("device")
}

/// A scratch disk on tmpfs when there is one, so the bench measures bulkhead, not the disk.
fn disk(bytes: u64) -> (Disk, std::path::PathBuf) {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("bulkhead-bench-{}.img", std::process::id()));
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(bytes))
        .expect("scratch disk");
    (Disk::open(&path, false, "bench").expect("open disk"), path)
}

fn vcpu_io(mmio: Bus) -> VcpuIo {
    let exit = Arc::new(ExitSignal::new().expect("exit signal"));
    let mut pio = Bus::new();
    pio.insert(Arc::new(IoDelayPort), 0x80, 1)
        .expect("port 0x80");
    let serial = SerialPort::new(
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        Box::new(std::io::sink()),
    );
    pio.insert(Arc::new(serial), 0x3f8, 8).expect("serial");
    VcpuIo {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        reporter: Reporter::detached().expect("reporter"),
        exit,
        pause: Arc::new(bulkhead::vstate::pause::PauseGate::new(1)),
        msr_list: Arc::from(Vec::new()),
        coalesced: None,
    }
}

fn exit_dispatch(c: &mut Criterion) {
    let (disk, path) = disk(1 << 20);
    let mut mmio = Bus::new();
    let transport = MmioTransport::new(Box::new(Block::new(&disk)), shared("blk"), memory());
    mmio.insert(Arc::new(transport), MMIO_BASE, 0x1000)
        .expect("mmio");
    let io = vcpu_io(mmio);
    let mut g = c.benchmark_group("exit_dispatch");
    g.bench_function("port_out_io_delay", |b| {
        b.iter(|| {
            let action = handle_exit(VcpuExit::IoOut(black_box(0x80), &[0]), 0, &io);
            assert_eq!(action, ExitAction::Continue);
        })
    });
    g.bench_function("port_in_serial_line_status", |b| {
        let mut data = [0u8];
        b.iter(|| handle_exit(VcpuExit::IoIn(black_box(0x3fd), &mut data), 0, &io))
    });
    g.bench_function("port_in_unassigned_counted_and_reported", |b| {
        let mut data = [0u8];
        b.iter(|| handle_exit(VcpuExit::IoIn(black_box(0x1234), &mut data), 0, &io))
    });
    g.bench_function("mmio_read_virtio_magic", |b| {
        let mut data = [0u8; 4];
        b.iter(|| {
            handle_exit(VcpuExit::MmioRead(black_box(MMIO_BASE), &mut data), 0, &io);
            assert_eq!(&data, b"virt");
        })
    });
    g.finish();
    let _ = std::fs::remove_file(path);
}

fn write_desc(mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(QUEUE.desc_table + u64::from(i) * 16))
        .expect("descriptor");
}

/// A block read of `len` bytes as Linux sends it: header, data, status, from descriptor 0.
fn block_read_chain(mem: &GuestMemoryMmap, len: u32) {
    write_desc(mem, 0, HEADER, 16, VIRTQ_DESC_F_NEXT, 1);
    write_desc(mem, 1, DATA, len, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
    write_desc(mem, 2, STATUS, 1, VIRTQ_DESC_F_WRITE, 0);
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    mem.write_slice(&header, GuestAddress(HEADER))
        .expect("header");
}

fn chain_validation(c: &mut Criterion) {
    let mem = memory();
    block_read_chain(&mem, 4096);
    let mut g = c.benchmark_group("chain_validation");
    g.bench_function("three_descriptor_block_request", |b| {
        b.iter(|| read_chain(&mem, &QUEUE, black_box(0), true, 1 << 20).expect("valid chain"))
    });
    // The longest chain a 256-entry queue allows: every rule checked 256 times.
    for i in 0..256u16 {
        let flags = if i < 255 { VIRTQ_DESC_F_NEXT } else { 0 };
        write_desc(&mem, i, DATA + u64::from(i) * 64, 64, flags, i + 1);
    }
    g.bench_function("256_descriptor_chain", |b| {
        b.iter(|| read_chain(&mem, &QUEUE, black_box(0), true, 1 << 20).expect("valid chain"))
    });
    g.finish();
}

fn virtio_blk_request(c: &mut Criterion) {
    let mem = memory();
    let (disk, path) = disk(16 << 20);
    let shared = shared("blk");
    let queue = GuestQueue::new(&mem, QUEUE, 1 << 32).expect("queue");
    shared.activate(vec![Some(queue)]);
    let notify = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let worker = VirtioWorker::new(
        shared.clone(),
        mem.clone(),
        vec![notify.try_clone().expect("eventfd")],
        Box::new(BlockQueue::new(disk)),
    )
    .expect("worker");
    let mut events =
        EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().expect("event manager");
    events.add_subscriber(Arc::new(Mutex::new(worker)));
    // The activation wake-up.
    events.run_with_timeout(0).expect("event loop");
    block_read_chain(&mem, 4096);
    let mut avail: u16 = 0;
    let mut g = c.benchmark_group("virtio_blk");
    g.bench_function("4k_read_notify_to_used", |b| {
        b.iter(|| {
            avail = avail.wrapping_add(1);
            // avail ring: flags, idx, then ring[]; every request reuses descriptor 0.
            let slot = QUEUE.avail_ring + 4 + u64::from((avail - 1) % QUEUE.size) * 2;
            mem.write_obj(0u16, GuestAddress(slot))
                .expect("avail entry");
            mem.write_obj(avail, GuestAddress(QUEUE.avail_ring + 2))
                .expect("avail idx");
            notify.write(1).expect("notify");
            events.run_with_timeout(0).expect("event loop");
            let used: u16 = mem
                .read_obj(GuestAddress(QUEUE.used_ring + 2))
                .expect("used idx");
            assert_eq!(used, avail, "the request was not served");
            let status: u8 = mem.read_obj(GuestAddress(STATUS)).expect("status");
            assert_eq!(status, 0, "the request failed");
        })
    });
    g.finish();
    let _ = std::fs::remove_file(path);
}

fn telemetry(c: &mut Criterion) {
    let reporter = Reporter::detached().expect("reporter");
    let device = DeviceTelemetry::new(reporter.clone(), 0);
    let mut g = c.benchmark_group("telemetry");
    g.bench_function("vcpu_exit_counter", |b| {
        let row = reporter.region().vcpu(0).expect("vcpu row");
        b.iter(|| row.count(black_box(ExitKind::IoOut)))
    });
    g.bench_function("vm_counter", |b| {
        b.iter(|| {
            reporter
                .region()
                .count(black_box(VmCounter::PioUnassignedReads))
        })
    });
    g.bench_function("device_counter", |b| {
        b.iter(|| device.add(black_box(DeviceCounter::BytesToGuest), 4096))
    });
    g.bench_function("event_posted_to_the_ring", |b| {
        b.iter(|| {
            reporter.post(Event::UnassignedPio {
                vcpu: 0,
                port: black_box(0x1234),
                size: 1,
                write: false,
            })
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    exit_dispatch,
    chain_validation,
    virtio_blk_request,
    telemetry
);
criterion_main!(benches);
