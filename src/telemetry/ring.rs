//! The event channel from the VM process to its supervisor: a bounded ring in the telemetry
//! region that any VM-process thread may push to without a lock or a system call (the
//! reporter adds one eventfd write when the supervisor has drained since the last), and that
//! the supervisor drains.
//!
//! Each cell has a sequence word: for lap `L` (position / cells) it reads `2L` when free and
//! `2L + 1` when it holds an event. A producer claims a position with a compare-and-swap on
//! `head`, fills the cell, then publishes it by setting the sequence; the consumer takes cells
//! in order and frees each for the next lap. A full ring drops the event (the caller counts
//! it): a flooding guest can never block a vCPU. The last quarter of the cells takes only
//! urgent events, so a flood of probes can not crowd out the event that names an attack.
//!
//! The consumer's position lives in the supervisor, not here, and every cell it reads is
//! decoded and checked by [`super::events::Event::decode`]: a lying VM process can at worst
//! report false events about its own VM.

use std::sync::atomic::{AtomicU64, Ordering};

/// Cells in the ring.
pub const CELLS: usize = 1024;
/// How often a producer retries a contended claim before it drops the event.
const CLAIM_RETRIES: u32 = 64;
/// Cells only [`Ring::push`]'s urgent events may fill: probes a guest can send by the
/// hundred thousand leave them free for the events that name an attack.
pub const RESERVED: usize = CELLS / 4;

/// One event as raw words; [`super::events`] gives them meaning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawEvent {
    pub word: u64,
    pub a: u64,
    pub b: u64,
    pub c: u64,
    /// CLOCK_MONOTONIC nanoseconds.
    pub time_ns: u64,
}

#[repr(C)]
struct Cell {
    seq: AtomicU64,
    word: AtomicU64,
    a: AtomicU64,
    b: AtomicU64,
    c: AtomicU64,
    time_ns: AtomicU64,
    _pad: [AtomicU64; 2],
}

/// The ring as laid out in the telemetry region.
#[repr(C)]
pub struct Ring {
    head: AtomicU64,
    _pad_head: [AtomicU64; 7],
    /// Set by a producer that found it clear (and then wakes the supervisor); cleared by the
    /// supervisor before it drains. At most one wake-up per drain.
    wake: AtomicU64,
    _pad_wake: [AtomicU64; 7],
    cells: [Cell; CELLS],
}

impl Ring {
    /// Publishes `event`. False when the ring is full (the event is dropped). An event that is
    /// not `urgent` is also dropped once only the [`RESERVED`] cells are left.
    pub fn push(&self, event: RawEvent, urgent: bool) -> bool {
        for _ in 0..CLAIM_RETRIES {
            let pos = self.head.load(Ordering::Relaxed);
            if !urgent && !self.free_at(pos + RESERVED as u64) {
                return false;
            }
            let Some(cell) = self.cells.get(pos as usize % CELLS) else {
                return false;
            };
            let lap = pos / CELLS as u64;
            let seq = cell.seq.load(Ordering::Acquire);
            if seq == 2 * lap {
                if self
                    .head
                    .compare_exchange_weak(pos, pos + 1, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
                {
                    continue;
                }
                cell.word.store(event.word, Ordering::Relaxed);
                cell.a.store(event.a, Ordering::Relaxed);
                cell.b.store(event.b, Ordering::Relaxed);
                cell.c.store(event.c, Ordering::Relaxed);
                cell.time_ns.store(event.time_ns, Ordering::Relaxed);
                cell.seq.store(2 * lap + 1, Ordering::Release);
                return true;
            }
            if seq < 2 * lap {
                // The consumer has not freed this cell since the last lap: full.
                return false;
            }
            // Another producer filled this position already; look again.
        }
        false
    }

    /// True when the cell for position `pos` is free for its lap (the consumer has taken what
    /// the last lap left there).
    fn free_at(&self, pos: u64) -> bool {
        let lap = pos / CELLS as u64;
        self.cells
            .get(pos as usize % CELLS)
            .is_some_and(|c| c.seq.load(Ordering::Acquire) >= 2 * lap)
    }

    /// True when the caller should wake the consumer (nobody has since it last drained).
    pub fn needs_wake(&self) -> bool {
        self.wake.swap(1, Ordering::AcqRel) == 0
    }

    /// The consumer's side: clears the wake flag before a drain, so an event pushed during
    /// the drain wakes it again. A read-modify-write, like the producer's: the two are
    /// totally ordered, so either the producer sees the flag clear (and wakes the consumer),
    /// or the consumer's swap reads the producer's and sees its event.
    pub fn clear_wake(&self) {
        self.wake.swap(0, Ordering::AcqRel);
    }

    /// True when positions past the consumer's `tail` have been claimed: events it has not
    /// taken yet, or one a producer is still filling.
    pub fn backlog(&self, tail: u64) -> bool {
        self.head.load(Ordering::Acquire) > tail
    }

    /// Takes the next event at the consumer's position `tail`, if one is there, and frees its
    /// cell. `tail` advances only when an event was taken.
    pub fn pop(&self, tail: &mut u64) -> Option<RawEvent> {
        let cell = self.cells.get(*tail as usize % CELLS)?;
        let lap = *tail / CELLS as u64;
        if cell.seq.load(Ordering::Acquire) != 2 * lap + 1 {
            return None;
        }
        let event = RawEvent {
            word: cell.word.load(Ordering::Relaxed),
            a: cell.a.load(Ordering::Relaxed),
            b: cell.b.load(Ordering::Relaxed),
            c: cell.c.load(Ordering::Relaxed),
            time_ns: cell.time_ns.load(Ordering::Relaxed),
        };
        cell.seq.store(2 * lap + 2, Ordering::Release);
        *tail += 1;
        Some(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::region::Region;

    fn ev(n: u64) -> RawEvent {
        RawEvent {
            word: n,
            a: n * 2,
            ..Default::default()
        }
    }

    #[test]
    fn events_come_out_in_order_and_a_full_ring_drops() {
        let region = Region::anonymous().unwrap();
        let ring = &region.ring;
        for n in 0..CELLS as u64 {
            assert!(ring.push(ev(n), true), "push {n}");
        }
        assert!(!ring.push(ev(9999), true), "a full ring must refuse");
        let mut tail = 0;
        for n in 0..CELLS as u64 {
            assert_eq!(ring.pop(&mut tail), Some(ev(n)));
        }
        assert_eq!(ring.pop(&mut tail), None);
        // The next lap reuses the freed cells.
        assert!(ring.push(ev(7), true));
        assert_eq!(ring.pop(&mut tail), Some(ev(7)));
        assert_eq!(tail, CELLS as u64 + 1);
    }

    #[test]
    fn many_producers_lose_nothing_that_fits() {
        let region = std::sync::Arc::new(Region::anonymous().unwrap());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let r = region.clone();
                std::thread::spawn(move || {
                    (0..200u64)
                        .filter(|i| r.ring.push(ev(t * 1000 + i), true))
                        .count()
                })
            })
            .collect();
        let pushed: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(pushed, 800);
        let mut tail = 0;
        let mut seen = Vec::new();
        while let Some(e) = region.ring.pop(&mut tail) {
            seen.push(e.word);
        }
        seen.sort_unstable();
        let mut want: Vec<u64> = (0..4u64)
            .flat_map(|t| (0..200u64).map(move |i| t * 1000 + i))
            .collect();
        want.sort_unstable();
        assert_eq!(seen, want);
    }

    #[test]
    fn probes_can_not_fill_the_cells_kept_for_urgent_events() {
        let region = Region::anonymous().unwrap();
        let ring = &region.ring;
        let mut probes = 0;
        while ring.push(ev(probes), false) {
            probes += 1;
        }
        assert_eq!(probes as usize, CELLS - RESERVED);
        for n in 0..RESERVED as u64 {
            assert!(ring.push(ev(n), true), "urgent push {n}");
        }
        assert!(!ring.push(ev(0), true));
        // Once the consumer frees cells, probes get room again.
        let mut tail = 0;
        for _ in 0..RESERVED + 1 {
            ring.pop(&mut tail).unwrap();
        }
        assert!(ring.push(ev(1), false));
    }

    #[test]
    fn a_backlog_is_seen_while_events_or_an_unfinished_claim_remain() {
        let region = Region::anonymous().unwrap();
        let ring = &region.ring;
        let mut tail = 0;
        assert!(!ring.backlog(tail));
        assert!(ring.push(ev(1), true) && ring.push(ev(2), true));
        ring.pop(&mut tail).unwrap();
        assert!(ring.backlog(tail), "one event left");
        ring.pop(&mut tail).unwrap();
        assert!(!ring.backlog(tail));
        // A producer claimed the next position and has not published it yet.
        ring.head.fetch_add(1, Ordering::Relaxed);
        assert_eq!(ring.pop(&mut tail), None);
        assert!(ring.backlog(tail), "a claim in progress");
    }

    #[test]
    fn wake_is_asked_for_once_until_the_consumer_clears_it() {
        let region = Region::anonymous().unwrap();
        assert!(region.ring.needs_wake());
        assert!(!region.ring.needs_wake());
        region.ring.clear_wake();
        assert!(region.ring.needs_wake());
    }
}
