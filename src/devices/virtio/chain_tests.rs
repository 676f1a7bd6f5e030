//! Unit and property tests of chain validation, against rings built by hand in guest memory.

use crate::vstate::dirty::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::*;

/// Two adjacent RAM regions, a hole, then a third: enough to test "wholly inside one region".
fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x1_0000),
        (GuestAddress(0x1_0000), 0x1_0000),
        (GuestAddress(0x3_0000), 0x1_0000),
    ])
    .unwrap()
}

const QUEUE: QueueConfig = QueueConfig {
    size: 8,
    desc_table: 0x1000,
    avail_ring: 0x2000,
    used_ring: 0x3000,
};
const BIG: u64 = 1 << 20;

fn desc(mem: &GuestMemoryMmap, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = GuestAddress(table + u64::from(i) * 16);
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&raw, at).unwrap();
}

fn chain(mem: &GuestMemoryMmap, head: u16) -> Result<Chain, ChainViolation> {
    read_chain(mem, &QUEUE, head, true, BIG).map_err(|e| e.reason)
}

#[test]
fn a_readable_then_writable_chain_is_accepted_as_written() {
    let mem = memory();
    desc(&mem, 0x1000, 0, 0x8000, 16, VIRTQ_DESC_F_NEXT, 3);
    desc(
        &mem,
        0x1000,
        3,
        0x9000,
        512,
        VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
        5,
    );
    desc(&mem, 0x1000, 5, 0x1_2000, 1, VIRTQ_DESC_F_WRITE, 0);
    let c = chain(&mem, 0).unwrap();
    assert_eq!(c.head, 0);
    assert_eq!(
        c.buffers,
        vec![
            Buffer {
                addr: 0x8000,
                len: 16,
                writable: false
            },
            Buffer {
                addr: 0x9000,
                len: 512,
                writable: true
            },
            Buffer {
                addr: 0x1_2000,
                len: 1,
                writable: true
            },
        ]
    );
    assert_eq!((c.readable_len(), c.writable_len()), (16, 513));
}

#[test]
fn indices_beyond_the_table_are_refused() {
    let mem = memory();
    assert_eq!(chain(&mem, 8), Err(ChainViolation::IndexOutOfRange));
    desc(&mem, 0x1000, 0, 0x8000, 16, VIRTQ_DESC_F_NEXT, 9);
    assert_eq!(chain(&mem, 0), Err(ChainViolation::IndexOutOfRange));
}

#[test]
fn a_chain_that_loops_is_refused() {
    let mem = memory();
    desc(&mem, 0x1000, 0, 0x8000, 16, VIRTQ_DESC_F_NEXT, 1);
    desc(&mem, 0x1000, 1, 0x8100, 16, VIRTQ_DESC_F_NEXT, 0);
    assert_eq!(chain(&mem, 0), Err(ChainViolation::Loop));
    desc(&mem, 0x1000, 2, 0x8000, 16, VIRTQ_DESC_F_NEXT, 2);
    assert_eq!(chain(&mem, 2), Err(ChainViolation::Loop));
}

#[test]
fn more_descriptors_than_the_queue_size_are_refused() {
    let mem = memory();
    // Three direct descriptors, then an indirect table of eight: eleven in an 8-entry queue.
    desc(&mem, 0x1000, 0, 0x8000, 16, VIRTQ_DESC_F_NEXT, 1);
    desc(&mem, 0x1000, 1, 0x8100, 16, VIRTQ_DESC_F_NEXT, 2);
    desc(&mem, 0x1000, 2, 0x8200, 16, VIRTQ_DESC_F_NEXT, 3);
    desc(&mem, 0x1000, 3, 0x5000, 8 * 16, VIRTQ_DESC_F_INDIRECT, 0);
    for i in 0..8 {
        desc(
            &mem,
            0x5000,
            i,
            0x9000 + u64::from(i) * 0x100,
            16,
            VIRTQ_DESC_F_NEXT,
            i + 1,
        );
    }
    assert_eq!(chain(&mem, 0), Err(ChainViolation::TooManyDescriptors));
}

#[test]
fn zero_length_and_over_long_chains_are_refused() {
    let mem = memory();
    desc(&mem, 0x1000, 0, 0x8000, 0, 0, 0);
    assert_eq!(chain(&mem, 0), Err(ChainViolation::ZeroLength));
    desc(&mem, 0x1000, 0, 0x8000, 600, VIRTQ_DESC_F_NEXT, 1);
    desc(&mem, 0x1000, 1, 0x9000, 600, VIRTQ_DESC_F_WRITE, 0);
    assert_eq!(
        read_chain(&mem, &QUEUE, 0, true, 1000).map_err(|e| e.reason),
        Err(ChainViolation::TooLong)
    );
    assert!(read_chain(&mem, &QUEUE, 0, true, 1200).is_ok());
}

#[test]
fn buffers_outside_ram_or_across_regions_are_refused() {
    let mem = memory();
    for (addr, len) in [
        (0x2_0000, 16),
        (0xfff0, 0x20),
        (0x1_fff0, 0x20),
        (u64::MAX - 4, 16),
        (0x3_0000, 0x1_0001),
    ] {
        desc(&mem, 0x1000, 0, addr, len, 0, 0);
        assert_eq!(
            chain(&mem, 0),
            Err(ChainViolation::OutsideRam),
            "{addr:#x}+{len:#x}"
        );
    }
}

#[test]
fn buffers_over_the_queues_own_rings_are_refused() {
    let mem = memory();
    for addr in [0x1000 + 8 * 16 - 1, 0x2000, 0x3000 + 6 + 8 * 8 - 1, 0x0ff8] {
        desc(&mem, 0x1000, 0, addr, 16, VIRTQ_DESC_F_WRITE, 0);
        assert_eq!(
            chain(&mem, 0),
            Err(ChainViolation::OverlapsRings),
            "{addr:#x}"
        );
    }
    desc(&mem, 0x1000, 0, 0x1000 + 8 * 16, 16, VIRTQ_DESC_F_WRITE, 0);
    assert!(chain(&mem, 0).is_ok(), "the byte after the table is free");
}

#[test]
fn a_readable_buffer_after_a_writable_one_is_refused() {
    let mem = memory();
    desc(
        &mem,
        0x1000,
        0,
        0x8000,
        16,
        VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
        1,
    );
    desc(&mem, 0x1000, 1, 0x9000, 16, 0, 0);
    assert_eq!(chain(&mem, 0), Err(ChainViolation::ReadableAfterWritable));
}

#[test]
fn a_valid_indirect_table_is_followed() {
    let mem = memory();
    desc(&mem, 0x1000, 0, 0x5000, 2 * 16, VIRTQ_DESC_F_INDIRECT, 0);
    desc(&mem, 0x5000, 0, 0x8000, 16, VIRTQ_DESC_F_NEXT, 1);
    desc(&mem, 0x5000, 1, 0x9000, 64, VIRTQ_DESC_F_WRITE, 0);
    let c = chain(&mem, 0).unwrap();
    assert_eq!(c.buffers.len(), 2);
    assert_eq!(c.writable_len(), 64);
}

#[test]
fn indirect_descriptors_break_no_rule_unnoticed() {
    let mem = memory();
    desc(&mem, 0x1000, 0, 0x5000, 16, VIRTQ_DESC_F_INDIRECT, 0);
    desc(&mem, 0x5000, 0, 0x8000, 16, 0, 0);
    assert_eq!(
        read_chain(&mem, &QUEUE, 0, false, BIG).map_err(|e| e.reason),
        Err(ChainViolation::IndirectNotNegotiated)
    );

    desc(
        &mem,
        0x1000,
        0,
        0x5000,
        16,
        VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT,
        1,
    );
    assert_eq!(chain(&mem, 0), Err(ChainViolation::IndirectWithNext));

    desc(&mem, 0x1000, 0, 0x5000, 16, VIRTQ_DESC_F_INDIRECT, 0);
    desc(&mem, 0x5000, 0, 0x6000, 16, VIRTQ_DESC_F_INDIRECT, 0);
    assert_eq!(chain(&mem, 0), Err(ChainViolation::NestedIndirect));

    for (addr, len) in [(0x5000, 0), (0x5000, 17), (0x5000, 9 * 16)] {
        desc(&mem, 0x1000, 0, addr, len, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(
            chain(&mem, 0),
            Err(ChainViolation::BadIndirectTable),
            "{addr:#x}+{len}"
        );
    }
    // A table the device would read from outside RAM is refused as any such buffer is.
    for (addr, len) in [(0x2_0000, 16), (0xfff0, 32)] {
        desc(&mem, 0x1000, 0, addr, len, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(
            chain(&mem, 0),
            Err(ChainViolation::OutsideRam),
            "{addr:#x}+{len}"
        );
    }
    desc(&mem, 0x1000, 0, 0x1000, 16, VIRTQ_DESC_F_INDIRECT, 0);
    assert_eq!(chain(&mem, 0), Err(ChainViolation::OverlapsRings));
}

#[test]
fn rings_must_lie_in_ram() {
    let mem = memory();
    assert_eq!(check_rings(&mem, &QUEUE).map_err(|e| e.reason), Ok(()));
    let bad = QueueConfig {
        used_ring: 0xfff8,
        ..QUEUE
    };
    assert_eq!(
        check_rings(&mem, &bad).map_err(|e| e.reason),
        Err(ChainViolation::RingOutsideRam)
    );
    let gone = QueueConfig {
        desc_table: 0x2_0000,
        ..QUEUE
    };
    assert_eq!(
        check_rings(&mem, &gone).map_err(|e| e.reason),
        Err(ChainViolation::RingOutsideRam)
    );
}

#[test]
fn available_index_may_not_jump_more_than_the_queue_size() {
    assert_eq!(avail_progress(0, 8, 8), Ok(8));
    // 65530 to 4 is ten new entries across the wrap: more than eight.
    assert_eq!(
        avail_progress(65530, 4, 8).map_err(|e| e.reason),
        Err(ChainViolation::AvailIndexJump)
    );
    assert_eq!(avail_progress(65534, 4, 8), Ok(6));
    assert_eq!(
        avail_progress(3, 2, 8).map_err(|e| e.reason),
        Err(ChainViolation::AvailIndexJump)
    );
    assert_eq!(avail_progress(5, 5, 8), Ok(0));
}

/// xorshift64*: a deterministic source for the property test, without a new dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_descriptor_tables_never_panic_and_accepted_chains_keep_every_rule() {
    let mem = memory();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let interesting_addrs = [
        0x0, 0x1000, 0x2000, 0x3000, 0x5000, 0x8000, 0xfff0, 0x1_0000, 0x2_0000, 0x3_fff0,
    ];
    let mut accepted = 0;
    for _ in 0..5000 {
        for table in [0x1000u64, 0x5000] {
            for i in 0..8 {
                let addr = if rng.below(2) == 0 {
                    interesting_addrs[rng.below(interesting_addrs.len() as u64) as usize]
                        + rng.below(64)
                } else {
                    rng.below(0x5_0000)
                };
                let len = [0, 1, 16, 32, 64, 4096, 0x1_0000][rng.below(7) as usize] as u32;
                let flags = rng.below(8) as u16;
                let next = rng.below(10) as u16;
                desc(&mem, table, i, addr, len, flags, next);
            }
        }
        let head = rng.below(9) as u16;
        let indirect_ok = rng.below(2) == 0;
        let max = [64, 4096, BIG][rng.below(3) as usize];
        let Ok(c) = read_chain(&mem, &QUEUE, head, indirect_ok, max) else {
            continue;
        };
        accepted += 1;
        assert!(!c.buffers.is_empty() && c.buffers.len() <= usize::from(QUEUE.size));
        assert!(c.readable_len() + c.writable_len() <= max);
        let first_writable = c
            .buffers
            .iter()
            .position(|b| b.writable)
            .unwrap_or(c.buffers.len());
        assert!(c.buffers[first_writable..].iter().all(|b| b.writable));
        for b in &c.buffers {
            let range = (b.addr, u64::from(b.len));
            assert!(b.len > 0);
            assert!(
                in_one_region(&mem, b.addr, u64::from(b.len)),
                "{b:?} not in one region"
            );
            assert!(
                ring_ranges(&QUEUE).iter().all(|&r| !overlaps(range, r)),
                "{b:?} overlaps a ring"
            );
        }
    }
    assert!(
        accepted > 100,
        "only {accepted} chains accepted: the generator is too hostile to test much"
    );
}

#[test]
fn parts_are_scattered_across_writable_buffers_and_readable_ones_gathered() {
    let mem = memory();
    let c = Chain {
        head: 0,
        buffers: vec![
            Buffer {
                addr: 0x8000,
                len: 3,
                writable: false,
            },
            Buffer {
                addr: 0x8100,
                len: 2,
                writable: false,
            },
            Buffer {
                addr: 0x9000,
                len: 4,
                writable: true,
            },
            Buffer {
                addr: 0x1_2000,
                len: 8,
                writable: true,
            },
        ],
    };
    mem.write_slice(b"abc", GuestAddress(0x8000)).unwrap();
    mem.write_slice(b"de", GuestAddress(0x8100)).unwrap();
    let mut got = b"x".to_vec();
    assert!(c.read_into(&mem, &mut got));
    assert_eq!(got, b"xabcde");

    assert!(c.write_parts(&mem, &[b"12345", b"", b"67"]));
    let (mut first, mut second) = ([0u8; 4], [0u8; 3]);
    mem.read_slice(&mut first, GuestAddress(0x9000)).unwrap();
    mem.read_slice(&mut second, GuestAddress(0x1_2000)).unwrap();
    assert_eq!((&first, &second), (b"1234", b"567"));
    assert!(
        !c.write_parts(&mem, &[&[0u8; 13]]),
        "13 bytes fit 12 of room"
    );
}
