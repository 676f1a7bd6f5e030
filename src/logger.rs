//! A small stderr logger for the `log` facade, and rate limiting for guest-triggerable sites.
//!
//! Anything a guest can make happen repeatedly must log through [`warn_limited!`] (or the
//! `info`/`error` variants): each call site may print a burst of [`BURST`] lines per second,
//! and the count of lines it suppressed is added to the next line it does print.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Lines one call site may print per second.
pub const BURST: u32 = 10;

static START: OnceLock<(Instant, u64)> = OnceLock::new();

fn start() -> (Instant, u64) {
    *START.get_or_init(|| (Instant::now(), crate::telemetry::monotonic_ns()))
}

/// The instant the process started (first asked for); boot timings count from here.
pub fn process_start() -> Instant {
    start().0
}

/// The same instant as CLOCK_MONOTONIC nanoseconds, a number another process can compare
/// its own clock readings with.
pub fn process_start_ns() -> u64 {
    start().1
}

struct StderrLogger {
    prefix: String,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        // One write per line so lines from different threads do not interleave.
        let line = format!("[{} {level}] {}\n", self.prefix, record.args());
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the logger. `prefix` names the process in every line (e.g. `bulkhead`).
pub fn init(prefix: &str, level: LevelFilter) {
    process_start();
    let logger = Box::new(StderrLogger {
        prefix: prefix.to_string(),
    });
    if log::set_boxed_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

/// A per-call-site limiter: `BURST` events per one-second window, lock-free.
///
/// The state packs the window's second (upper 32 bits) and the events seen in it (lower 32).
#[derive(Debug)]
pub struct RateLimit {
    state: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        RateLimit {
            state: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Returns `Some(suppressed_since_last)` when the caller may log now, `None` when not.
    pub fn check(&self) -> Option<u64> {
        let now = process_start().elapsed().as_secs() + 1;
        self.check_at(now)
    }

    fn check_at(&self, now_sec: u64) -> Option<u64> {
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let (sec, count) = (cur >> 32, cur & 0xffff_ffff);
            let next = if sec == now_sec {
                if count >= u64::from(BURST) {
                    self.suppressed.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                cur + 1
            } else {
                (now_sec << 32) | 1
            };
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(self.suppressed.swap(0, Ordering::Relaxed)),
                Err(actual) => cur = actual,
            }
        }
    }
}

/// Rate-limited logging at the given level; see the module docs.
#[macro_export]
macro_rules! log_limited {
    ($lvl:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::logger::RateLimit = $crate::logger::RateLimit::new();
        if let Some(suppressed) = LIMIT.check() {
            if suppressed > 0 {
                log::log!($lvl, "{} ({} similar lines suppressed)", format_args!($($arg)+), suppressed);
            } else {
                log::log!($lvl, $($arg)+);
            }
        }
    }};
}

/// Rate-limited `warn!`.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => { $crate::log_limited!(log::Level::Warn, $($arg)+) };
}

/// Rate-limited `error!`.
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => { $crate::log_limited!(log::Level::Error, $($arg)+) };
}

/// Rate-limited `debug!`.
#[macro_export]
macro_rules! debug_limited {
    ($($arg:tt)+) => { $crate::log_limited!(log::Level::Debug, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_allows_a_burst_per_second_then_reports_what_it_dropped() {
        let limit = RateLimit::new();
        for _ in 0..BURST {
            assert_eq!(limit.check_at(5), Some(0));
        }
        assert_eq!(limit.check_at(5), None);
        assert_eq!(limit.check_at(5), None);
        assert_eq!(limit.check_at(6), Some(2));
        assert_eq!(limit.check_at(6), Some(0));
    }
}
