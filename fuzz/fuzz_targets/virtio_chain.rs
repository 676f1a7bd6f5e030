//! The descriptor-chain walker over an arbitrary guest memory image. An accepted chain lies
//! wholly in RAM, outside the rings, within the size asked for and the queue's length; the
//! walk itself never writes guest memory.
#![no_main]

use bulkhead::devices::virtio::chain::{read_chain, ring_ranges};
use bulkhead_fuzz::{memory, queue_config, QSIZE};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

fuzz_target!(|data: &[u8]| {
    let Some((&ctrl, rest)) = data.split_first() else {
        return;
    };
    let mem = memory(rest, 1);
    let config = queue_config(0);
    let indirect = ctrl & 1 != 0;
    let max_bytes = [64u64, 4096, 1 << 20, u64::MAX][usize::from(ctrl >> 1) & 3];
    let mut before = vec![0u8; 0x1_0000];
    mem.read_slice(&mut before, GuestAddress(0)).unwrap();
    for head in 0..QSIZE + 2 {
        let Ok(chain) = read_chain(&mem, &config, head, indirect, max_bytes) else {
            continue;
        };
        assert_eq!(chain.head, head);
        assert!(!chain.buffers.is_empty());
        assert!(
            chain.buffers.len() <= usize::from(QSIZE),
            "more buffers than the queue holds"
        );
        let total: u64 = chain.buffers.iter().map(|b| u64::from(b.len)).sum();
        assert!(
            total <= max_bytes,
            "{total} bytes accepted, {max_bytes} allowed"
        );
        let mut writable_seen = false;
        for b in &chain.buffers {
            // Readable buffers come first, then writable ones.
            assert!(
                !(writable_seen && !b.writable),
                "a readable buffer after a writable one"
            );
            writable_seen |= b.writable;
            let len = u64::from(b.len);
            assert!(len > 0, "an empty buffer was accepted");
            let end = b.addr.checked_add(len - 1).expect("buffer wraps");
            // Wholly inside one region of RAM.
            let region = mem
                .find_region(GuestAddress(b.addr))
                .expect("buffer outside RAM");
            let region_end = region.start_addr().0 + region.len() - 1;
            assert!(end <= region_end, "buffer crosses a region");
            for (ring, ring_len) in ring_ranges(&config) {
                let overlaps = b.addr < ring + ring_len && ring < b.addr + len;
                assert!(
                    !overlaps,
                    "buffer {:#x}+{len} overlaps a ring at {ring:#x}",
                    b.addr
                );
            }
        }
    }
    let mut after = vec![0u8; 0x1_0000];
    mem.read_slice(&mut after, GuestAddress(0)).unwrap();
    assert!(before == after, "walking chains wrote guest memory");
});
