//! Tokens taken ahead for a pass of disk requests, so that a device whose limits do not bind
//! starts each request the moment it is parsed, as a device without limits does.
//!
//! Why: without a credit, a limited device parses a chunk of requests, charges them in one
//! go and only then starts them (`blk::worker_admit`). Holding parsed requests back and
//! moving them through the chunk cost 12% of the request path with a polling client and 8%
//! with an interrupt-driven one on an AMD EPYC host (`scripts/feature-cost.sh`'s paired
//! `blk-qos` rows, null device, QD 32), against a 2% target for limits that never bind; with
//! the credit, 1-2%. With a credit, the first request of a kind (read, write) in a pass takes
//! [`CREDIT_OPS`] operations and [`CREDIT_BYTES`] bytes of that kind from the device's and its
//! group's buckets in one all-or-nothing charge; requests that fit what is left start at
//! once, a spent credit is given back and a new one taken, and what the pass did not use is
//! given back at its end. A bucket that cannot spare a whole credit (the limit binds, or the
//! bucket is smaller than a credit: under 32 operations or 2 MiB, i.e. 100 ms of the rate
//! by default) refuses it, and the pass falls back to charging its requests in chunks:
//! accuracy at the limit is unchanged, and a credit never takes more than a bucket holds.
//!
//! What a credit changes: while a pass holds one, the tokens it has not used yet are not
//! available to the device's group partners. A pass lasts microseconds with io_uring; with
//! `engine=sync` it lasts as long as its blocking I/O, and a partner refused meanwhile waits
//! for its own refill timer: a group near its limit may then run a little under it (never
//! over).

// Guest-controlled sizes flow through here: no arithmetic that can wrap silently.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use super::handle::QosHandle;
use super::limiter::{Cost, CostKind};

/// Operations of a kind one credit holds (a pass's chunk: `blk::worker::ADMIT_CHUNK`).
pub const CREDIT_OPS: u64 = 32;
/// Bytes of a kind one credit holds (32 requests of 64 KiB).
pub const CREDIT_BYTES: u64 = 2 << 20;

/// What is left of one kind's credit (nothing before one is taken).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Left {
    ops: u64,
    bytes: u64,
}

/// The tokens a pass took ahead, per kind: spent by the requests it starts, the rest given
/// back with [`Credit::give_back`] (a credit dropped without it keeps its tokens spent).
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a credit's unused tokens must be given back"]
pub struct Credit {
    reads: Left,
    writes: Left,
    now_ns: u64,
}

impl Credit {
    /// A pass's credit, nothing taken yet; `now_ns` is the pass's clock.
    pub fn new(now_ns: u64) -> Self {
        Self {
            reads: Left::default(),
            writes: Left::default(),
            now_ns,
        }
    }

    /// Pays `cost` (one operation) from the credit, taking one (again) from `qos` when
    /// there is none or too little left. False (the limits cannot spare a whole credit, or
    /// the request is larger than one): the request must be charged the usual way, and so
    /// must everything behind it in the pass; the caller ends the credit first
    /// ([`Credit::give_back`]), or the tokens it holds could refuse that charge.
    pub fn spend(&mut self, qos: &QosHandle, cost: Cost) -> bool {
        let now_ns = self.now_ns;
        let left = match cost.kind {
            CostKind::Read => &mut self.reads,
            CostKind::Write => &mut self.writes,
            CostKind::Tx | CostKind::Rx => return false,
        };
        if let Some(after) = pay(*left, cost) {
            *left = after;
            return true;
        }
        if cost.bytes > CREDIT_BYTES {
            return false;
        }
        // Spent, or none yet: what is left goes back and a whole credit is asked for.
        give_back_one(qos, cost.kind, std::mem::take(left));
        if qos
            .try_start_many_at(whole(cost.kind), CREDIT_OPS, now_ns)
            .is_err()
        {
            return false;
        }
        // A whole credit pays any request of at most CREDIT_BYTES (checked above).
        *left = Left {
            ops: CREDIT_OPS.saturating_sub(1),
            bytes: CREDIT_BYTES.saturating_sub(cost.bytes),
        };
        true
    }

    /// Gives what was not spent back to `qos`.
    pub fn give_back(self, qos: &QosHandle) {
        give_back_one(qos, CostKind::Read, self.reads);
        give_back_one(qos, CostKind::Write, self.writes);
    }
}

/// `left` after paying `cost`, if it holds enough.
fn pay(left: Left, cost: Cost) -> Option<Left> {
    Some(Left {
        ops: left.ops.checked_sub(1)?,
        bytes: left.bytes.checked_sub(cost.bytes)?,
    })
}

fn give_back_one(qos: &QosHandle, kind: CostKind, left: Left) {
    if left.ops > 0 || left.bytes > 0 {
        qos.refund_many(
            Cost {
                kind,
                bytes: left.bytes,
            },
            left.ops,
        );
    }
}

fn whole(kind: CostKind) -> Cost {
    Cost {
        kind,
        bytes: CREDIT_BYTES,
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::config::options::OptionList;
    use crate::qos::config::{Family, QosConfig};
    use crate::qos::handle::now_ns;

    fn limited(spec: &str) -> QosHandle {
        let qos = QosHandle::default();
        let mut options = OptionList::parse(spec).unwrap();
        qos.set_limits(&QosConfig::from_options_for(&mut options, Family::Blk).unwrap())
            .unwrap();
        qos
    }

    /// Tokens of `name` now: `expected`, or a little more where the bucket refilled meanwhile.
    fn assert_tokens(qos: &QosHandle, name: &str, expected: i64, refill_slack: i64) {
        let got = tokens(qos, name);
        assert!(
            (expected..=expected + refill_slack).contains(&got),
            "{name}: {got} tokens, expected {expected} (+ up to {refill_slack} refilled)"
        );
    }

    fn tokens(qos: &QosHandle, name: &str) -> i64 {
        qos.tokens()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .unwrap()
    }

    fn read(bytes: u64) -> Cost {
        Cost {
            kind: CostKind::Read,
            bytes,
        }
    }

    fn write(bytes: u64) -> Cost {
        Cost {
            kind: CostKind::Write,
            bytes,
        }
    }

    #[test]
    fn a_pass_is_charged_what_it_spent_and_no_more() {
        // Buckets of 100 ms of the rate (1000 operations, 40 MiB); slow refills (one
        // operation a microsecond would be 10k/s): a test's milliseconds refill a few tokens.
        let qos = limited("iops=10000,bps=400M");
        let mut credit = Credit::new(now_ns());
        for _ in 0..3 {
            assert!(credit.spend(&qos, read(4096)));
        }
        assert!(credit.spend(&qos, write(0)));
        credit.give_back(&qos);
        assert_tokens(&qos, "iops", 1000 - 4, 50);
        let bps = 400i64 << 20;
        assert_tokens(&qos, "bps", bps / 10 - 3 * 4096, bps / 200);
    }

    #[test]
    fn a_spent_credit_is_renewed_and_a_request_larger_than_one_is_refused() {
        let qos = limited("read-iops=10000");
        let mut credit = Credit::new(now_ns());
        for _ in 0..CREDIT_OPS + 1 {
            assert!(credit.spend(&qos, read(0)));
        }
        assert!(!credit.spend(
            &qos,
            Cost {
                kind: CostKind::Tx,
                bytes: 1
            }
        ));
        assert!(
            !credit.spend(&qos, read(CREDIT_BYTES + 1)),
            "more bytes than a credit"
        );
        // A refusal ends the credit (the caller's part): everything unspent comes back.
        credit.give_back(&qos);
        assert_tokens(
            &qos,
            "read-iops",
            1000 - i64::try_from(CREDIT_OPS).unwrap() - 1,
            50,
        );
    }

    #[test]
    fn a_bucket_that_cannot_spare_a_whole_credit_gives_none_and_loses_nothing() {
        // 100 ms of 200 operations a second: 20, fewer than a credit.
        let qos = limited("iops=200");
        let mut credit = Credit::new(now_ns());
        assert!(!credit.spend(&qos, read(0)));
        credit.give_back(&qos);
        assert_tokens(&qos, "iops", 20, 1);
        // Writes have a credit of their own: a read-only pass never takes one.
        let qos = limited("write-iops=200,read-iops=10000");
        let mut credit = Credit::new(now_ns());
        assert!(credit.spend(&qos, read(0)));
        assert!(!credit.spend(&qos, write(0)));
        credit.give_back(&qos);
        assert_tokens(&qos, "write-iops", 20, 1);
        assert_tokens(&qos, "read-iops", 999, 50);
    }
}
