//! virtio-net's transmit and receive paths over fuzzer-made rings: frames the guest sends go
//! to a datagram socket standing in for the tap; frames from the input arrive on it.
//! Beyond the harness's invariants: no frame with another source MAC leaves the VM.
#![no_main]

use bulkhead::devices::virtio::net::{NetQueues, Tap};
use bulkhead_fuzz::{queue_to_notify, QueueHarness};
use libfuzzer_sys::fuzz_target;
use std::os::fd::FromRawFd;

const MAC: [u8; 6] = [0x06, 0, 0, 0, 0, 1];

fn socket_pair() -> (std::fs::File, std::fs::File) {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair returns.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair");
    // SAFETY: both descriptors are new and owned by nothing else.
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctrl, rest)) = data.split_first() else {
        return;
    };
    let (ours, wire) = socket_pair();
    // Up to three frames from the "network", cut from the end of the input.
    use std::io::Write;
    let mut w = &wire;
    let frames = usize::from(ctrl & 3);
    let cut = rest.len().saturating_sub(frames * 64);
    let (rings, incoming) = rest.split_at(cut);
    for frame in incoming.chunks(64) {
        let _ = w.write(frame);
    }
    let queues = NetQueues::new(Tap::from_file(ours, "fuzz0"), MAC);
    let mut h = QueueHarness::new(Box::new(queues), 2, ctrl, rings);
    h.notify(queue_to_notify(ctrl, 2));
    h.notify(1);
    h.notify(0);
    // Every frame that reached the wire carries the VM's own MAC.
    let mut buf = [0u8; 70000];
    use std::io::Read;
    let mut r = &wire;
    while let Ok(n) = r.read(&mut buf) {
        assert!(n >= 14, "a runt frame of {n} bytes left the VM");
        assert_eq!(
            buf[6..12],
            MAC,
            "a frame with a foreign source MAC left the VM"
        );
    }
});
