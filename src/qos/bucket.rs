//! A token bucket with exact integer arithmetic, debt, and an injectable clock.
//!
//! Tokens are kept in nano-units (1 token = 10^9) so refilling at any rate over any elapsed
//! nanoseconds is exact: no rounding drift, however often the bucket is refilled. The bucket
//! holds at most `capacity` tokens. A request of `n` tokens may start once the bucket holds
//! `min(n, capacity)`: a request larger than the whole bucket still proceeds when the bucket is
//! full and leaves it in debt (negative), which later refills repay, so nothing deadlocks and
//! the long-run rate still holds. A clock that goes backwards refills nothing (and re-bases).
//! All arithmetic saturates at the `u64`/`i128` edges.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::time::Duration;

/// Nano-units per token.
const SCALE: i128 = 1_000_000_000;

/// A token bucket. Times are nanoseconds on any monotonic clock the caller chooses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    /// Tokens added per second.
    rate: u64,
    /// Most tokens held (in nano-units).
    capacity: i128,
    /// Current tokens in nano-units; negative when in debt.
    level: i128,
    /// Clock reading of the last refill.
    last_ns: u64,
}

impl TokenBucket {
    /// A full bucket refilling `rate` tokens per second, holding at most `capacity` tokens.
    /// `rate` 0 means the bucket never refills (only its initial contents are ever given).
    pub fn new(rate: u64, capacity: u64, now_ns: u64) -> Self {
        let capacity = i128::from(capacity).saturating_mul(SCALE);
        Self {
            rate,
            capacity,
            level: capacity,
            last_ns: now_ns,
        }
    }

    /// Current whole tokens (negative in debt) after refilling to `now_ns`.
    pub fn tokens(&mut self, now_ns: u64) -> i64 {
        self.refill(now_ns);
        i64::try_from(self.level / SCALE).unwrap_or(if self.level < 0 {
            i64::MIN
        } else {
            i64::MAX
        })
    }

    /// Changes rate and capacity, keeping the current level (clamped to the new capacity).
    pub fn reconfigure(&mut self, rate: u64, capacity: u64, now_ns: u64) {
        self.refill(now_ns);
        self.rate = rate;
        self.capacity = i128::from(capacity).saturating_mul(SCALE);
        self.level = self.level.min(self.capacity);
    }

    fn refill(&mut self, now_ns: u64) {
        let Some(elapsed) = now_ns.checked_sub(self.last_ns) else {
            // An older time than the last one seen (threads sharing the bucket read the clock
            // once per pass, outside its lock): nothing to add, and the bucket stays at the
            // newer time. (Going back to it would credit the same interval again on the next
            // newer reading: tokens out of nothing.)
            return;
        };
        self.last_ns = now_ns;
        // rate (tokens/s) * elapsed (ns) = nano-units; saturates at the i128 edge.
        let added = i128::from(self.rate).saturating_mul(i128::from(elapsed));
        self.level = self.level.saturating_add(added).min(self.capacity);
    }

    /// Takes `n` tokens if the request may start now; otherwise returns how long until it may.
    pub fn try_take(&mut self, n: u64, now_ns: u64) -> Result<(), Duration> {
        self.refill(now_ns);
        let needed = i128::from(n).saturating_mul(SCALE).min(self.capacity);
        if self.level >= needed {
            self.level = self
                .level
                .saturating_sub(i128::from(n).saturating_mul(SCALE));
            return Ok(());
        }
        Err(self.wait_for(needed))
    }

    /// Whether `n` tokens fit the bucket at all (a take of more is capped at the capacity:
    /// right for one request, too generous for a batch of them).
    pub fn holds(&self, n: u64) -> bool {
        i128::from(n).saturating_mul(SCALE) <= self.capacity
    }

    /// Takes `n` tokens whatever the level, going into debt if needed (for a cost known only
    /// after the work was done, e.g. the size of a frame already received).
    pub fn take_anyway(&mut self, n: u64, now_ns: u64) {
        self.refill(now_ns);
        self.level = self
            .level
            .saturating_sub(i128::from(n).saturating_mul(SCALE));
    }

    /// Gives back `n` tokens taken earlier (a request that could not start after all).
    pub fn give_back(&mut self, n: u64) {
        self.level = self
            .level
            .saturating_add(i128::from(n).saturating_mul(SCALE))
            .min(self.capacity);
    }

    /// Time until the level reaches `needed` nano-units (`Duration::MAX` if it never will).
    fn wait_for(&self, needed: i128) -> Duration {
        if self.rate == 0 {
            return Duration::MAX;
        }
        let missing = needed.saturating_sub(self.level);
        // ceil(missing / rate) nanoseconds.
        let rate = i128::from(self.rate);
        let ns = missing
            .saturating_add(rate.saturating_sub(1))
            .checked_div(rate)
            .unwrap_or(i128::MAX);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    #[test]
    fn take_anyway_goes_into_debt_and_later_takes_wait_for_repayment() {
        let mut b = TokenBucket::new(1000, 1000, 0);
        b.take_anyway(2500, 0);
        assert_eq!(b.tokens(0), -1500);
        // Even a zero-cost take waits until the debt is repaid: 1.5 s at 1000/s.
        assert_eq!(b.try_take(0, 0), Err(Duration::from_millis(1500)));
        assert_eq!(b.try_take(0, 1_500_000_000), Ok(()));
    }

    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn refills_exactly_at_the_rate() {
        let mut b = TokenBucket::new(1000, 1000, 0);
        assert!(b.try_take(1000, 0).is_ok());
        assert_eq!(b.try_take(1, 0), Err(Duration::from_millis(1)));
        // 1 ns at a time for a whole millisecond still adds exactly one token.
        for t in 1..=1_000_000 {
            b.refill(t);
        }
        assert_eq!(b.tokens(1_000_000), 1);
        assert!(b.try_take(1, 1_000_000).is_ok());
        assert_eq!(b.tokens(SEC + 1_000_000), 1000, "capped at capacity");
    }

    #[test]
    fn burst_capacity_then_steady_rate() {
        // 100/s steady, 500 may be taken at once after idling.
        let mut b = TokenBucket::new(100, 500, 0);
        let mut t = 10 * SEC;
        let mut taken = 0;
        while b.try_take(1, t).is_ok() {
            taken += 1;
        }
        assert_eq!(taken, 500, "burst delivers the capacity and no more");
        // Over the next 10 s exactly 1000 more.
        let mut granted = 0;
        while t < 20 * SEC {
            t += SEC / 1000;
            while b.try_take(1, t).is_ok() {
                granted += 1;
            }
        }
        assert_eq!(granted, 1000);
    }

    #[test]
    fn oversized_requests_run_in_debt_and_are_repaid() {
        let mut b = TokenBucket::new(1000, 100, 0);
        // 1 MiB when the bucket holds 100: proceeds (full bucket), leaves debt.
        assert!(b.try_take(1_000_000, 0).is_ok());
        assert_eq!(b.tokens(0), -999_900);
        // The next request waits for the debt to be repaid plus its own tokens.
        let wait = b.try_take(10, 0).unwrap_err();
        assert_eq!(wait, Duration::from_nanos(999_910 * SEC / 1000));
        assert!(b.try_take(10, wait.as_nanos() as u64).is_ok());
    }

    #[test]
    fn clock_going_backwards_adds_nothing() {
        let mut b = TokenBucket::new(1000, 1000, 5 * SEC);
        assert!(b.try_take(1000, 5 * SEC).is_ok());
        assert_eq!(b.tokens(4 * SEC), 0, "backwards: no refill");
        // Not re-based at the earlier reading: the half second from 4 s to 4.5 s lies before
        // the newest time seen (5 s) and is not credited again.
        assert_eq!(
            b.tokens(4 * SEC + SEC / 2),
            0,
            "nothing out of an older reading"
        );
        assert_eq!(
            b.tokens(5 * SEC + SEC / 2),
            500,
            "time after the newest reading"
        );
    }

    #[test]
    fn u64_edges_saturate() {
        let mut b = TokenBucket::new(u64::MAX, u64::MAX, 0);
        assert!(b.try_take(u64::MAX, 0).is_ok());
        assert_eq!(
            b.tokens(u64::MAX),
            i64::MAX,
            "full again, reported saturated"
        );
        assert!(b.try_take(u64::MAX, u64::MAX).is_ok());
        let mut zero = TokenBucket::new(0, 10, 0);
        assert!(zero.try_take(10, 0).is_ok());
        assert_eq!(zero.try_take(1, u64::MAX), Err(Duration::MAX));
    }

    #[test]
    fn give_back_and_reconfigure() {
        let mut b = TokenBucket::new(10, 10, 0);
        assert!(b.try_take(10, 0).is_ok());
        b.give_back(4);
        assert_eq!(b.tokens(0), 4);
        b.reconfigure(1000, 2, 0);
        assert_eq!(b.tokens(0), 2, "clamped to the new capacity");
        assert_eq!(b.tokens(SEC / 1000), 2);
        assert_eq!(
            b.tokens(SEC),
            2,
            "refilled at the new rate, capped at the new size"
        );
    }
}
