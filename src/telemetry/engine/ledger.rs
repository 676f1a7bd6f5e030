//! Counter increments that no event has explained yet: how a refusal or a probe whose event
//! the full channel dropped still raises its rule.
//!
//! The VM process bumps a counter before it posts the matching event, and the supervisor
//! drains events before it reads the counters, so an increment read at one tick has its event
//! by the next unless the event was lost. Events first explain increments left over from the
//! last tick, then new ones; whatever is still unexplained a tick later was lost.

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
    /// lost. A counter that went backwards is a lie: the account starts again from it.
    pub fn tick(&mut self, current: u64) -> u64 {
        let delta = current.saturating_sub(self.last);
        self.last = current;
        let lost = self.owed.saturating_sub(self.matched);
        let spare = self.matched.saturating_sub(self.owed);
        self.owed = delta.saturating_sub(spare);
        self.matched = 0;
        lost
    }

    /// The last word, once the VM process is gone and the channel drained: every increment
    /// still unexplained was lost.
    pub fn close(&mut self, current: u64) -> u64 {
        let lost = self.tick(current);
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
        assert_eq!(l.tick(1), 0);
        assert_eq!(l.tick(1), 0);
        let mut l = Ledger::default();
        assert_eq!(l.tick(1), 0);
        l.matched();
        assert_eq!(l.tick(1), 0);
    }

    #[test]
    fn increments_without_events_are_lost_a_tick_later_or_at_the_close() {
        let mut l = Ledger::default();
        assert_eq!(l.tick(3), 0);
        assert_eq!(l.tick(3), 3);
        let mut l = Ledger::default();
        assert_eq!(l.tick(2), 0);
        assert_eq!(l.close(5), 5);
    }

    #[test]
    fn a_counter_that_goes_backwards_reports_nothing_lost() {
        let mut l = Ledger::default();
        assert_eq!(l.tick(10), 0);
        for _ in 0..10 {
            l.matched();
        }
        assert_eq!(l.tick(2), 0);
        assert_eq!(l.tick(2), 0);
    }
}
