//! Counter increments that no event has explained yet: how a refusal or a probe whose event
//! the full channel dropped still raises its rule.
//!
//! The VM process bumps a counter before it posts the matching event, and the supervisor
//! drains events before it reads the counters, so an increment read at one tick has its event
//! by the next unless the event was lost. Events first explain increments left over from the
//! last tick, then new ones; whatever is still unexplained a tick later was lost. A tick whose
//! drain left events in the ring (a producer between claiming a cell and filling it, or more
//! than one drain takes) waits instead of judging: their events may be among them.

/// One counter's account.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ledger {
    /// The counter's value at the last tick.
    last: u64,
    /// Increments read at the last tick that no event has explained yet.
    owed: u64,
    /// Events seen since the last tick.
    matched: u64,
}

impl Ledger {
    /// An event for this counter arrived.
    pub fn matched(&mut self) {
        self.matched = self.matched.saturating_add(1);
    }

    /// Reads the counter (`current`) at a tick; returns the increments whose events were
    /// lost, or nothing if the tick must `wait` (everything unexplained stays owed). A counter
    /// that went backwards is a lie: the account starts again from it.
    pub fn tick(&mut self, current: u64, wait: bool) -> u64 {
        let delta = current.saturating_sub(self.last);
        self.last = current;
        let matched = std::mem::take(&mut self.matched);
        if wait {
            self.owed = self.owed.saturating_add(delta).saturating_sub(matched);
            return 0;
        }
        let lost = self.owed.saturating_sub(matched);
        let spare = matched.saturating_sub(self.owed);
        self.owed = delta.saturating_sub(spare);
        lost
    }

    /// The last word, once the VM process is gone and the channel drained: every increment
    /// still unexplained was lost.
    pub fn close(&mut self, current: u64) -> u64 {
        let lost = self.tick(current, false);
        lost.saturating_add(std::mem::take(&mut self.owed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_explains_an_increment_whichever_comes_first() {
        let mut l = Ledger::default();
        l.matched();
        assert_eq!(l.tick(1, false), 0);
        assert_eq!(l.tick(1, false), 0);
        let mut l = Ledger::default();
        assert_eq!(l.tick(1, false), 0);
        l.matched();
        assert_eq!(l.tick(1, false), 0);
    }

    #[test]
    fn increments_without_events_are_lost_a_tick_later_or_at_the_close() {
        let mut l = Ledger::default();
        assert_eq!(l.tick(3, false), 0);
        assert_eq!(l.tick(3, false), 3);
        let mut l = Ledger::default();
        assert_eq!(l.tick(2, false), 0);
        assert_eq!(l.close(5), 5);
    }

    #[test]
    fn a_tick_that_waits_judges_nothing_and_the_next_one_judges_all() {
        let mut l = Ledger::default();
        assert_eq!(l.tick(3, false), 0);
        // The drain left events behind: maybe these three's.
        assert_eq!(l.tick(5, true), 0);
        l.matched();
        l.matched();
        // Two events came; the other three increments were all read a tick ago or more.
        assert_eq!(l.tick(5, false), 3);
        assert_eq!(l.tick(5, false), 0);
    }

    #[test]
    fn a_counter_that_goes_backwards_reports_nothing_lost() {
        let mut l = Ledger::default();
        assert_eq!(l.tick(10, false), 0);
        for _ in 0..10 {
            l.matched();
        }
        assert_eq!(l.tick(2, false), 0);
        assert_eq!(l.tick(2, false), 0);
    }
}
