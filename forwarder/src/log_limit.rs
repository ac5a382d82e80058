//! A log line per kind of event at most every few seconds: a flood of hostile clients
//! must not flood the log. The counters count every event; the log says how many lines
//! it left out.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::sys;

/// Seconds between two lines of one kind.
const INTERVAL_NS: u64 = 10_000_000_000;

#[derive(Debug, Default)]
pub struct LogLimit {
    /// When the last line went out (monotonic ns; 0: never).
    last_ns: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimit {
    pub const fn new() -> Self {
        Self {
            last_ns: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines left out since the last one)` when a line may go out now.
    pub fn allow(&self) -> Option<u64> {
        let now = sys::monotonic_ns();
        let last = self.last_ns.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= INTERVAL_NS;
        if due
            && self
                .last_ns
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// `tracing::info!` at most every few seconds from this call site, with the number of
/// lines left out (`suppressed`): for events a hostile client can cause at will.
macro_rules! info_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::LogLimit = $crate::log_limit::LogLimit::new();
        if let Some(suppressed) = LIMIT.allow() {
            tracing::info!(suppressed, $($arg)+);
        }
    }};
}
pub(crate) use info_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_then_silence_that_is_counted() {
        let limit = LogLimit::default();
        assert_eq!(limit.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(limit.allow(), None);
        }
        // Pretend the interval has passed.
        limit.last_ns.store(1, Ordering::Relaxed);
        assert_eq!(limit.allow(), Some(5));
    }
}
