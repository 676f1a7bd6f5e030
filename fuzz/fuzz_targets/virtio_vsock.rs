//! virtio-vsock's packet parser and connection state machine over fuzzer-made rings (the
//! guest's packets on the TX queue, its receive buffers on RX), with an abstract Unix socket
//! as the host side.
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use bulkhead::devices::virtio::vsock::{VsockBackend, VsockQueues};
use bulkhead_fuzz::{queue_to_notify, QueueHarness};
use libfuzzer_sys::fuzz_target;

static RUN: AtomicU64 = AtomicU64::new(0);

fuzz_target!(|data: &[u8]| {
    let Some((&ctrl, rest)) = data.split_first() else {
        return;
    };
    // An abstract socket: nothing to clean up, nothing shared between runs.
    let name = format!(
        "\0bulkhead-fuzz-vsock-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    );
    let uds = Path::new(OsStr::from_bytes(name.as_bytes()));
    let backend = VsockBackend::open(3, uds, false).expect("vsock backend");
    let mut h = QueueHarness::new(Box::new(VsockQueues::new(backend)), 3, ctrl, rest);
    h.notify(queue_to_notify(ctrl, 3));
    h.notify(1);
    h.notify(0);
});
