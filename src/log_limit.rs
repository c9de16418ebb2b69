//! Rate-limited logging for events a tenant can repeat at will (refused requests, failing
//! I/O, tier errors): one line per interval, with a count of what was held back, so a guest
//! cannot flood the host's log.

use std::time::{Duration, Instant};

/// Allows one log line per interval and counts what it held back.
#[derive(Debug, Default)]
pub struct LogLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    const INTERVAL: Duration = Duration::from_secs(1);

    /// `Some(suppressed since the last line)` when a line may be logged now.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < Self::INTERVAL => {
                self.suppressed = self.suppressed.saturating_add(1);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// A limiter shared between threads (a connection's workers, a ring's message handler).
#[derive(Debug, Default)]
pub struct SharedLogLimiter(std::sync::Mutex<LogLimiter>);

impl SharedLogLimiter {
    /// As [`LogLimiter::allow`].
    pub fn allow(&self) -> Option<u64> {
        crate::lock::lock(&self.0).allow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_the_rest_counted() {
        let mut limiter = LogLimiter::default();
        assert_eq!(limiter.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(limiter.allow(), None);
        }
        limiter.last = Instant::now().checked_sub(LogLimiter::INTERVAL);
        assert_eq!(limiter.allow(), Some(5), "the held-back lines are counted");
    }
}
