//! Token buckets, as Firecracker describes them: `size` tokens refilled evenly over
//! `refill_time`, plus `one_time_burst` tokens that are used first and never come back. A
//! device holds one bucket for bytes and one for operations; a request takes from both or
//! waits (on the worker's timer, never spinning) until both have enough.
//!
//! A request larger than a bucket can ever hold is let through once the bucket is full and
//! leaves it in debt: the rate over time stays the limit, and no request waits for ever.

use std::time::{Duration, Instant};

/// The most a restored bucket may owe: above what the largest request any device takes (a
/// block request of 254 segments of 1 MiB) can leave behind a full bucket, so a saved state
/// keeps its debt, but a crafted one can not stall a device for ever.
const MAX_DEBT: u64 = 1 << 30;

/// One bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    refill: Duration,
    /// Tokens in the bucket; below zero after an over-sized request.
    tokens: i128,
    burst: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket; None when `size` or `refill` is zero (Firecracker's "no limit").
    pub fn new(size: u64, one_time_burst: u64, refill: Duration, now: Instant) -> Option<Self> {
        if size == 0 || refill.is_zero() {
            return None;
        }
        Some(TokenBucket {
            size,
            refill,
            tokens: i128::from(size),
            burst: one_time_burst,
            last: now,
        })
    }

    fn refill_ns(&self) -> i128 {
        // At least 1: `refill` is not zero, but may be below a nanosecond's resolution.
        (self.refill.as_nanos() as i128).max(1)
    }

    /// Adds what the time since the last call earned, up to `size`.
    fn top_up(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos() as i128;
        // Tokens come in whole units; the remainder of the time is kept for the next call.
        let earned = elapsed.saturating_mul(i128::from(self.size)) / self.refill_ns();
        if earned == 0 {
            return;
        }
        let used_ns = earned.saturating_mul(self.refill_ns()) / i128::from(self.size);
        self.last += Duration::from_nanos(u64::try_from(used_ns).unwrap_or(u64::MAX));
        self.tokens = (self.tokens + earned).min(i128::from(self.size));
        if self.tokens == i128::from(self.size) {
            // A full bucket earns nothing more: do not bank the time.
            self.last = now;
        }
    }

    /// How long until `n` tokens can be taken, after `top_up`: zero when they can now.
    fn wait_for(&self, n: u64) -> Duration {
        let from_burst = n.min(self.burst);
        // An over-sized request needs a full bucket, no more.
        let need = i128::from((n - from_burst).min(self.size));
        if need <= self.tokens {
            return Duration::ZERO;
        }
        let missing = need - self.tokens;
        // Round up, so the timer never fires a moment too early.
        let size = i128::from(self.size);
        let ns = missing
            .saturating_mul(self.refill_ns())
            .saturating_add(size - 1)
            / size;
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    fn take(&mut self, n: u64) {
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        self.tokens -= i128::from(n - from_burst);
    }

    /// Tokens available now (for tests and metrics), the burst excluded.
    pub fn tokens(&self) -> i128 {
        self.tokens
    }
}

/// A bucket's contents as a snapshot keeps them (its size and refill time come from the
/// settings, which the snapshot also keeps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BucketState {
    pub tokens: i64,
    pub burst: u64,
}

/// A limiter's buckets' contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct LimiterState {
    pub bandwidth: Option<BucketState>,
    pub ops: Option<BucketState>,
}

impl TokenBucket {
    fn save(&self) -> BucketState {
        let tokens = self
            .tokens
            .clamp(i128::from(i64::MIN), i128::from(i64::MAX));
        BucketState {
            tokens: i64::try_from(tokens).unwrap_or(0),
            burst: self.burst,
        }
    }

    /// Takes saved contents, at most a full bucket and the burst it started with, and no more
    /// debt than one over-sized request leaves (a full bucket less the largest request any
    /// device takes); the time the guest was away earns nothing.
    fn restore(&mut self, saved: BucketState, now: Instant) {
        let size = i128::from(self.size);
        self.tokens = i128::from(saved.tokens).clamp(size - i128::from(MAX_DEBT), size);
        self.burst = saved.burst.min(self.burst);
        self.last = now;
    }
}

/// A device's (or one direction's) limits: bytes and operations.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// None when neither bucket limits anything.
    pub fn new(bandwidth: Option<TokenBucket>, ops: Option<TokenBucket>) -> Option<RateLimiter> {
        if bandwidth.is_none() && ops.is_none() {
            return None;
        }
        Some(RateLimiter { bandwidth, ops })
    }

    pub fn save(&self) -> LimiterState {
        LimiterState {
            bandwidth: self.bandwidth.as_ref().map(TokenBucket::save),
            ops: self.ops.as_ref().map(TokenBucket::save),
        }
    }

    /// Sets saved contents on the buckets this limiter has (the settings decide which).
    pub fn restore(&mut self, saved: &LimiterState, now: Instant) {
        for (bucket, state) in [
            (&mut self.bandwidth, saved.bandwidth),
            (&mut self.ops, saved.ops),
        ] {
            if let (Some(b), Some(s)) = (bucket, state) {
                b.restore(s, now);
            }
        }
    }

    /// How long until `bytes` and one operation can be taken: Ok when they can now. Takes
    /// nothing.
    pub fn peek(&mut self, bytes: u64, now: Instant) -> Result<(), Duration> {
        let mut wait = Duration::ZERO;
        for (bucket, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, 1)] {
            if let Some(b) = bucket {
                b.top_up(now);
                wait = wait.max(b.wait_for(n));
            }
        }
        if wait.is_zero() {
            Ok(())
        } else {
            Err(wait)
        }
    }

    /// Takes `bytes` and one operation, or nothing and says how long to wait until both
    /// buckets have enough.
    pub fn take(&mut self, bytes: u64, now: Instant) -> Result<(), Duration> {
        self.peek(bytes, now)?;
        self.consume(bytes);
        Ok(())
    }

    /// Takes `bytes` and one operation that [`peek`](Self::peek) just found there.
    pub fn consume(&mut self, bytes: u64) {
        if let Some(b) = &mut self.bandwidth {
            b.take(bytes);
        }
        if let Some(b) = &mut self.ops {
            b.take(1);
        }
    }
}

/// The contents of an optional limiter's buckets (None: no limiter).
pub fn save(limiter: &Option<RateLimiter>) -> Option<LimiterState> {
    limiter.as_ref().map(RateLimiter::save)
}

/// Sets saved contents on an optional limiter.
pub fn restore(limiter: &mut Option<RateLimiter>, saved: Option<&LimiterState>) {
    if let (Some(l), Some(s)) = (limiter.as_mut(), saved) {
        l.restore(s, Instant::now());
    }
}

/// [`RateLimiter::peek`] on an optional limiter: no limiter, no wait.
pub fn peek(limiter: &mut Option<RateLimiter>, bytes: u64) -> Result<(), Duration> {
    match limiter {
        Some(l) => l.peek(bytes, Instant::now()),
        None => Ok(()),
    }
}

/// [`RateLimiter::take`] on an optional limiter: no limiter, no wait.
pub fn take(limiter: &mut Option<RateLimiter>, bytes: u64) -> Result<(), Duration> {
    match limiter {
        Some(l) => l.take(bytes, Instant::now()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn bucket(size: u64, burst: u64, refill_ms: u64, now: Instant) -> TokenBucket {
        TokenBucket::new(size, burst, MS * refill_ms as u32, now).unwrap()
    }

    #[test]
    fn a_bucket_refills_at_size_per_refill_time_and_never_above_size() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(Some(bucket(1000, 0, 100, t0)), None).unwrap();
        assert_eq!(l.take(1000, t0), Ok(()));
        // Empty: 500 tokens need half the refill time.
        assert_eq!(l.take(500, t0), Err(50 * MS));
        assert_eq!(l.take(500, t0 + 50 * MS), Ok(()));
        // A long pause fills the bucket to its size, not beyond.
        let later = t0 + 10_000 * MS;
        assert_eq!(l.take(1000, later), Ok(()));
        assert!(l.take(1, later).is_err());
    }

    #[test]
    fn the_one_time_burst_goes_first_and_does_not_come_back() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(Some(bucket(100, 1000, 1000, t0)), None).unwrap();
        assert_eq!(l.take(1000, t0), Ok(()));
        assert_eq!(l.take(100, t0), Ok(()));
        assert_eq!(l.take(100, t0), Err(1000 * MS));
        assert_eq!(l.take(100, t0 + 5000 * MS), Ok(()));
        assert!(l.take(1, t0 + 5000 * MS).is_err());
    }

    #[test]
    fn an_oversized_request_waits_for_a_full_bucket_and_leaves_it_in_debt() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(Some(bucket(100, 0, 10, t0)), None).unwrap();
        assert_eq!(l.take(50, t0), Ok(()));
        assert_eq!(l.take(1000, t0), Err(5 * MS));
        assert_eq!(l.take(1000, t0 + 5 * MS), Ok(()));
        // 900 in debt: a byte waits 9 refills plus one token's time.
        let wait = l.take(1, t0 + 5 * MS).unwrap_err();
        assert!(wait > 90 * MS && wait <= 91 * MS, "{wait:?}");
    }

    #[test]
    fn operations_and_bytes_both_limit_and_nothing_is_taken_on_a_wait() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(
            Some(bucket(10_000, 0, 1000, t0)),
            Some(bucket(2, 0, 1000, t0)),
        )
        .unwrap();
        assert_eq!(l.take(10, t0), Ok(()));
        assert_eq!(l.take(10, t0), Ok(()));
        assert_eq!(l.take(10, t0), Err(500 * MS));
        // The refused request took no bytes.
        assert_eq!(l.bandwidth.as_ref().unwrap().tokens(), 9_980);
    }

    #[test]
    fn zero_size_or_refill_time_means_no_limit() {
        let t0 = Instant::now();
        assert!(TokenBucket::new(0, 5, MS, t0).is_none());
        assert!(TokenBucket::new(5, 5, Duration::ZERO, t0).is_none());
        assert!(RateLimiter::new(None, None).is_none());
        let mut none = None;
        assert_eq!(take(&mut none, u64::MAX), Ok(()));
    }

    #[test]
    fn extreme_settings_do_not_overflow() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(
            Some(TokenBucket::new(u64::MAX, u64::MAX, Duration::from_nanos(1), t0).unwrap()),
            Some(TokenBucket::new(1, 0, Duration::MAX, t0).unwrap()),
        )
        .unwrap();
        assert_eq!(l.take(u64::MAX, t0), Ok(()));
        assert!(l.take(u64::MAX, t0 + Duration::from_secs(1)).is_err());
    }
}
