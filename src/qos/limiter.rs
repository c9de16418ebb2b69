//! Limits for one device (or one group): a set of token buckets, each counting operations or
//! bytes of reads, writes or both, checked together.
//!
//! A request may start only when every bucket that applies to it allows it. Buckets are taken
//! in order and, if a later one refuses, the ones already taken are given back, so a refused
//! request costs nothing and the caller just waits the returned time. Each configured
//! [`Rate`] becomes two buckets, as in QEMU's throttling: an average bucket (refill at the
//! rate; room for 100 ms of it plus the burst allowance) and, when a burst is configured, a
//! peak bucket that holds the instantaneous rate to the burst rate.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::time::Duration;

use smallvec::SmallVec;

use super::bucket::TokenBucket;

/// One limit: a steady rate and an optional burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Units (operations or bytes) per second, sustained.
    pub per_second: u64,
    /// Peak units per second allowed during a burst (QEMU's `*-max`); at least `per_second`.
    #[serde(default)]
    pub burst: Option<u64>,
    /// How long the peak may be sustained (QEMU's `*-max-length`), in seconds; default 1.
    #[serde(default)]
    pub burst_seconds: Option<u64>,
}

/// Errors in a limit specification.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    /// A zero rate would stop all I/O.
    #[error("{0}: a rate must be at least 1 per second")]
    ZeroRate(&'static str),
    /// The burst rate is below the steady rate.
    #[error("{0}: burst must be at least the rate")]
    BurstBelowRate(&'static str),
    /// A burst length without a burst, or of zero seconds.
    #[error("{0}: burst-seconds needs a burst and must be at least 1")]
    BadBurstSeconds(&'static str),
}

impl Rate {
    fn validate(&self, name: &'static str) -> Result<(), LimitError> {
        if self.per_second == 0 {
            return Err(LimitError::ZeroRate(name));
        }
        if self.burst.is_some_and(|b| b < self.per_second) {
            return Err(LimitError::BurstBelowRate(name));
        }
        match (self.burst, self.burst_seconds) {
            (None, Some(_)) | (_, Some(0)) => Err(LimitError::BadBurstSeconds(name)),
            _ => Ok(()),
        }
    }

    /// The buckets implementing this rate, full at `now_ns`.
    fn buckets(&self, now_ns: u64) -> Vec<TokenBucket> {
        let steady_room = (self.per_second / 10).max(1);
        match self.burst {
            None => vec![TokenBucket::new(self.per_second, steady_room, now_ns)],
            Some(burst) => {
                let seconds = self.burst_seconds.unwrap_or(1);
                let extra = burst
                    .saturating_sub(self.per_second)
                    .saturating_mul(seconds);
                vec![
                    TokenBucket::new(self.per_second, steady_room.saturating_add(extra), now_ns),
                    TokenBucket::new(burst, (burst / 10).max(1), now_ns),
                ]
            }
        }
    }
}

/// What a bucket counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// One token per request.
    Operations,
    /// One token per byte.
    Bytes,
}

/// Which requests a bucket applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Block reads and writes.
    Any,
    /// Block reads only.
    Read,
    /// Block writes only.
    Write,
    /// Frames the guest sends.
    Tx,
    /// Frames delivered to the guest.
    Rx,
}

/// What kind of I/O a cost is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CostKind {
    /// A block read.
    Read,
    /// A block write (or discard / write-zeroes).
    Write,
    /// A frame from the guest.
    Tx,
    /// A frame to the guest.
    Rx,
}

/// A request or frame as the limiter sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// What it is.
    pub kind: CostKind,
    /// Bytes it moves.
    pub bytes: u64,
}

/// A set of limits applied together.
#[derive(Debug, Clone, Default)]
pub struct Limiter {
    buckets: Vec<(Unit, Direction, TokenBucket)>,
    /// Per bucket: the limit's name, with `-peak` for a burst's peak bucket.
    names: Vec<String>,
}

impl Limiter {
    /// No limits at all (every request starts at once).
    pub fn unlimited() -> Self {
        Self::default()
    }

    /// Adds a limit; refuses invalid rates without changing the limiter.
    pub fn add(
        &mut self,
        name: &'static str,
        unit: Unit,
        direction: Direction,
        rate: Rate,
        now_ns: u64,
    ) -> Result<(), LimitError> {
        rate.validate(name)?;
        for (i, bucket) in rate.buckets(now_ns).into_iter().enumerate() {
            self.buckets.push((unit, direction, bucket));
            self.names.push(if i == 0 {
                name.to_string()
            } else {
                format!("{name}-peak")
            });
        }
        Ok(())
    }

    /// Current tokens of every bucket (negative in debt), by limit name.
    pub fn tokens(&mut self, now_ns: u64) -> Vec<(String, i64)> {
        self.names
            .iter()
            .cloned()
            .zip(self.buckets.iter_mut().map(|(_, _, b)| b.tokens(now_ns)))
            .collect()
    }

    /// Gives back what a started request was charged (used when a second limiter refuses it).
    pub fn refund(&mut self, cost: Cost) {
        self.refund_n(cost, 1);
    }

    /// [`Limiter::refund`] of a batch: `ops` operations of `cost.bytes` bytes in all.
    pub fn refund_n(&mut self, cost: Cost, ops: u64) {
        for (unit, direction, bucket) in &mut self.buckets {
            if applies(*direction, cost) {
                bucket.give_back(units(*unit, cost, ops));
            }
        }
    }

    /// Charges `ops` operations and the bytes of `cost` to every applicable bucket whatever
    /// its level (into debt if need be): for work that had to run without waiting (requests
    /// answered on a queue stop).
    pub fn charge_anyway(&mut self, cost: Cost, ops: u64, now_ns: u64) {
        for (unit, direction, bucket) in &mut self.buckets {
            if applies(*direction, cost) {
                bucket.take_anyway(units(*unit, cost, ops), now_ns);
            }
        }
    }

    /// Charges the bytes of `cost` to the applicable byte buckets whatever their level (into
    /// debt if need be): for costs known only afterwards. Operation buckets are untouched.
    pub fn charge_bytes(&mut self, cost: Cost, now_ns: u64) {
        for (unit, direction, bucket) in &mut self.buckets {
            if *unit == Unit::Bytes && applies(*direction, cost) {
                bucket.take_anyway(cost.bytes, now_ns);
            }
        }
    }

    /// Charges `cost` if every applicable bucket allows it now; otherwise charges nothing and
    /// returns how long to wait before trying again.
    pub fn try_start(&mut self, cost: Cost, now_ns: u64) -> Result<(), Duration> {
        self.try_start_n(cost, 1, now_ns)
    }

    /// [`Limiter::try_start`] for a batch: `ops` operations of `cost.bytes` bytes in all,
    /// charged together or not at all. A batch larger than some bucket's capacity is refused
    /// (wait zero): the caller admits its items one by one instead.
    pub fn try_start_n(&mut self, cost: Cost, ops: u64, now_ns: u64) -> Result<(), Duration> {
        let mut taken: SmallVec<[(usize, u64); 12]> = SmallVec::new();
        for (index, (unit, direction, bucket)) in self.buckets.iter_mut().enumerate() {
            if !applies(*direction, cost) {
                continue;
            }
            let n = units(*unit, cost, ops);
            if n == 0 {
                // Nothing to take (a flush against a byte limit): a bucket in debt must not
                // hold back what costs it nothing.
                continue;
            }
            let fits = ops <= 1 || bucket.holds(n);
            let took = if fits {
                bucket.try_take(n, now_ns)
            } else {
                Err(Duration::ZERO)
            };
            match took {
                Ok(()) => taken.push((index, n)),
                Err(wait) => {
                    for (index, n) in taken {
                        if let Some((_, _, bucket)) = self.buckets.get_mut(index) {
                            bucket.give_back(n);
                        }
                    }
                    return Err(wait);
                }
            }
        }
        Ok(())
    }
}

fn applies(direction: Direction, cost: Cost) -> bool {
    match direction {
        Direction::Any => matches!(cost.kind, CostKind::Read | CostKind::Write),
        Direction::Read => cost.kind == CostKind::Read,
        Direction::Write => cost.kind == CostKind::Write,
        Direction::Tx => cost.kind == CostKind::Tx,
        Direction::Rx => cost.kind == CostKind::Rx,
    }
}

fn units(unit: Unit, cost: Cost, ops: u64) -> u64 {
    match unit {
        Unit::Operations => ops,
        Unit::Bytes => cost.bytes,
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn rate(per_second: u64) -> Rate {
        Rate {
            per_second,
            burst: None,
            burst_seconds: None,
        }
    }

    /// Runs a saturating load on a simulated clock; returns requests started in `seconds`.
    fn saturate(limiter: &mut Limiter, cost: Cost, seconds: u64) -> u64 {
        let mut now = 0u64;
        let mut started = 0;
        while now < seconds * SEC {
            match limiter.try_start(cost, now) {
                Ok(()) => started += 1,
                Err(wait) => now += u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX).max(1),
            }
        }
        started
    }

    #[test]
    fn a_batch_is_charged_whole_or_not_at_all_and_never_beyond_a_bucket() {
        let mut l = Limiter::unlimited();
        // 100 ms of room at 1000/s: 100 operations, 1 MiB/s: 104,857 bytes.
        l.add("iops", Unit::Operations, Direction::Any, rate(1000), 0)
            .unwrap();
        l.add("bps", Unit::Bytes, Direction::Any, rate(1 << 20), 0)
            .unwrap();
        let read = |bytes| Cost {
            kind: CostKind::Read,
            bytes,
        };
        assert!(l.try_start_n(read(64 * 512), 64, 0).is_ok());
        // 36 operations left: 40 more are refused and nothing is charged...
        assert!(l.try_start_n(read(40 * 512), 40, 0).is_err());
        assert!(
            l.try_start_n(read(36 * 512), 36, 0).is_ok(),
            "the 36 are still there"
        );
        assert!(l.try_start(read(512), 0).is_err());
        // A batch larger than a bucket is refused outright (its items go one by one), where
        // one request larger than the bucket waits for a full bucket.
        let mut fresh = Limiter::unlimited();
        fresh
            .add("iops", Unit::Operations, Direction::Any, rate(1000), 0)
            .unwrap();
        assert_eq!(
            fresh.try_start_n(read(0), 101, 0),
            Err(Duration::ZERO),
            "101 > 100 tokens: never one charge"
        );
        assert!(fresh.try_start_n(read(0), 100, 0).is_ok());
        fresh.refund_n(read(0), 100);
        assert!(fresh.try_start_n(read(0), 100, 0).is_ok(), "refunded whole");
    }

    #[test]
    fn iops_limit_is_exact_over_ten_seconds() {
        for iops in [100u64, 5_000, 200_000] {
            let mut l = Limiter::unlimited();
            l.add("iops", Unit::Operations, Direction::Any, rate(iops), 0)
                .unwrap();
            let started = saturate(
                &mut l,
                Cost {
                    kind: CostKind::Read,
                    bytes: 4096,
                },
                10,
            );
            // The initial 100 ms of room at t=0, then one token every 1/iops s strictly before
            // the 10 s mark: exact, with no drift.
            assert_eq!(started, (iops / 10).max(1) + iops * 10 - 1, "iops={iops}");
        }
    }

    #[test]
    fn bytes_limit_with_large_requests() {
        let mut l = Limiter::unlimited();
        l.add("bps", Unit::Bytes, Direction::Any, rate(1 << 20), 0)
            .unwrap();
        // 256 KiB requests against 1 MiB/s: ~4/s, never stuck although each exceeds the room.
        let started = saturate(
            &mut l,
            Cost {
                kind: CostKind::Write,
                bytes: 256 << 10,
            },
            10,
        );
        assert!((40..=41).contains(&started), "{started}");
    }

    #[test]
    fn burst_gives_the_extra_and_no_more() {
        let mut l = Limiter::unlimited();
        let burst = Rate {
            per_second: 1000,
            burst: Some(5000),
            burst_seconds: Some(2),
        };
        l.add("iops", Unit::Operations, Direction::Any, burst, 0)
            .unwrap();
        // Peak rate for the first second: capped by the peak bucket at ~5000/s.
        let first = saturate(
            &mut l,
            Cost {
                kind: CostKind::Read,
                bytes: 512,
            },
            1,
        );
        assert!((5000..=5600).contains(&first), "{first}");
        // Over 20 s: steady 20000 + the burst extra (4000/s * 2 s) + 100 ms room, minus the
        // token due exactly at the 20 s mark.
        let mut l = Limiter::unlimited();
        l.add("iops", Unit::Operations, Direction::Any, burst, 0)
            .unwrap();
        let total = saturate(
            &mut l,
            Cost {
                kind: CostKind::Read,
                bytes: 512,
            },
            20,
        );
        assert_eq!(total, 20_000 + 8_000 + 100 - 1);
    }

    #[test]
    fn refused_requests_cost_nothing_and_directions_apply() {
        // Room: 2 operations, 10 bytes of writes.
        let mut l = Limiter::unlimited();
        l.add("iops", Unit::Operations, Direction::Any, rate(20), 0)
            .unwrap();
        l.add("write-bps", Unit::Bytes, Direction::Write, rate(100), 0)
            .unwrap();
        // A write larger than the byte room proceeds (full bucket) and leaves byte debt.
        assert!(l
            .try_start(
                Cost {
                    kind: CostKind::Write,
                    bytes: 50
                },
                0
            )
            .is_ok());
        // The next write takes the last op token, is refused by bytes, and gives it back...
        assert!(l
            .try_start(
                Cost {
                    kind: CostKind::Write,
                    bytes: 50
                },
                0
            )
            .is_err());
        // ...so a read (not limited by write-bps) still finds it.
        assert!(
            l.try_start(
                Cost {
                    kind: CostKind::Read,
                    bytes: 50
                },
                0
            )
            .is_ok(),
            "op token was given back"
        );
        assert!(
            l.try_start(
                Cost {
                    kind: CostKind::Read,
                    bytes: 50
                },
                0
            )
            .is_err(),
            "and only one"
        );
    }

    #[test]
    fn a_zero_byte_write_counts_as_an_operation_and_ignores_byte_debt() {
        // A flush: one operation, no bytes.
        let flush = Cost {
            kind: CostKind::Write,
            bytes: 0,
        };
        let mut l = Limiter::unlimited();
        l.add("write-bps", Unit::Bytes, Direction::Write, rate(100), 0)
            .unwrap();
        l.charge_bytes(
            Cost {
                kind: CostKind::Write,
                bytes: 1000,
            },
            0,
        );
        assert!(l.try_start(flush, 0).is_ok(), "byte debt holds no flush");
        let mut l = Limiter::unlimited();
        l.add("iops", Unit::Operations, Direction::Any, rate(10), 0)
            .unwrap();
        assert!(l.try_start(flush, 0).is_ok());
        assert!(l.try_start(flush, 0).is_err(), "one operation each");
    }

    #[test]
    fn invalid_rates_are_refused_and_change_nothing() {
        let mut l = Limiter::unlimited();
        assert_eq!(
            l.add("iops", Unit::Operations, Direction::Any, rate(0), 0),
            Err(LimitError::ZeroRate("iops"))
        );
        let bad = Rate {
            per_second: 10,
            burst: Some(5),
            burst_seconds: None,
        };
        assert!(l
            .add("iops", Unit::Operations, Direction::Any, bad, 0)
            .is_err());
        let bad = Rate {
            per_second: 10,
            burst: None,
            burst_seconds: Some(3),
        };
        assert!(l
            .add("iops", Unit::Operations, Direction::Any, bad, 0)
            .is_err());
        let bad = Rate {
            per_second: 10,
            burst: Some(20),
            burst_seconds: Some(0),
        };
        assert!(l
            .add("iops", Unit::Operations, Direction::Any, bad, 0)
            .is_err());
        assert!(l.tokens(0).is_empty(), "nothing was added");
        assert!(l
            .try_start(
                Cost {
                    kind: CostKind::Write,
                    bytes: u64::MAX
                },
                0
            )
            .is_ok());
    }
}
