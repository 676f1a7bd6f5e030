//! virtio-blk's request parser and I/O over fuzzer-made rings and buffers, on a 16 KiB disk in
//! memory. Beyond the harness's invariants: a read-only disk never changes.
#![no_main]

use bulkhead::devices::virtio::block::{BlockQueue, Disk};
use bulkhead_fuzz::{memfd, queue_to_notify, QueueHarness};
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

const DISK: usize = 16 << 10;

fn contents(f: &mut std::fs::File) -> Vec<u8> {
    let mut v = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut v).unwrap();
    v
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctrl, rest)) = data.split_first() else {
        return;
    };
    let read_only = ctrl & 4 != 0;
    let mut file = memfd(DISK);
    let before = contents(&mut file);
    let disk = Disk::from_file(
        file.try_clone().unwrap(),
        Path::new("fuzz.img"),
        read_only,
        "fuzz",
    )
    .expect("disk");
    let mut h = QueueHarness::new(Box::new(BlockQueue::new(disk)), 1, ctrl, rest);
    h.notify(queue_to_notify(ctrl, 1));
    h.notify(0);
    if read_only {
        assert!(
            contents(&mut file) == before,
            "a read-only disk was written"
        );
    }
});
