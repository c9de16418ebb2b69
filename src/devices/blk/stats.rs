//! Per-queue counters for a block device.
//!
//! Each queue worker owns one [`QueueStats`] and is its only writer (the worker's mutex makes
//! the queue-stop drain, which also counts, exclusive with it), so counting is a relaxed load
//! and store with no locked instruction, no shared lock and no shared cache line on the data
//! path. Readers (stats requests, metrics) take a [`QueueSnapshot`], which is not a
//! consistent cut across counters, only each counter's own value at the time it was read.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::request::Reason;

/// Latency buckets: bucket `i` counts requests that took less than `2^i` microseconds; the
/// last bucket takes everything slower.
pub const LATENCY_BUCKETS: usize = 24;

/// Request types counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpClass {
    /// IN.
    Read,
    /// OUT.
    Write,
    /// FLUSH.
    Flush,
    /// DISCARD.
    Discard,
    /// WRITE_ZEROES.
    WriteZeroes,
    /// GET_ID.
    GetId,
}

impl OpClass {
    const COUNT: usize = 6;
    /// Every class, in index order.
    pub const ALL: [OpClass; Self::COUNT] = [
        OpClass::Read,
        OpClass::Write,
        OpClass::Flush,
        OpClass::Discard,
        OpClass::WriteZeroes,
        OpClass::GetId,
    ];

    /// Stable name for stats.
    pub fn name(self) -> &'static str {
        match self {
            OpClass::Read => "read",
            OpClass::Write => "write",
            OpClass::Flush => "flush",
            OpClass::Discard => "discard",
            OpClass::WriteZeroes => "write-zeroes",
            OpClass::GetId => "get-id",
        }
    }
}

/// Live counters of one queue.
#[derive(Debug, Default)]
pub struct QueueStats {
    requests: [AtomicU64; OpClass::COUNT],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    io_errors: AtomicU64,
    flush_errors: AtomicU64,
    rejected: [AtomicU64; Reason::ALL.len()],
    in_flight: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
    latency_ns_total: AtomicU64,
    queue_misconfigured: AtomicU64,
    throttled: AtomicU64,
    throttle_wait_ns: AtomicU64,
    ring_errors: AtomicU64,
    resubmitted: AtomicU64,
}

/// A copy of one queue's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueSnapshot {
    /// Completed requests by type.
    pub requests: Vec<(String, u64)>,
    /// Bytes read by the guest.
    pub bytes_read: u64,
    /// Bytes written by the guest.
    pub bytes_written: u64,
    /// Requests that failed in the backing (the guest got IOERR).
    pub io_errors: u64,
    /// FLUSH requests that failed (writes the guest was told were durable may not be).
    pub flush_errors: u64,
    /// Requests refused by validation, by reason.
    pub rejected: Vec<(String, u64)>,
    /// Requests submitted and not yet completed.
    pub in_flight: u64,
    /// Latency histogram: `(upper bound in µs, count)`; the last bound is `u64::MAX`.
    pub latency_us: Vec<(u64, u64)>,
    /// Sum of all request latencies, in nanoseconds.
    pub latency_ns_total: u64,
    /// Kicks ignored because the front-end configured an invalid queue.
    pub queue_misconfigured: u64,
    /// Requests held back by QoS.
    pub throttled: u64,
    /// Total time requests spent held back by QoS, in nanoseconds.
    pub throttle_wait_ns: u64,
    /// Kicks on a ring whose available index claimed more buffers than it can hold.
    pub ring_errors: u64,
    /// Requests a previous daemon process left in flight, resubmitted from the front-end's
    /// inflight region.
    pub resubmitted: u64,
}

/// Adds to a counter that only its queue's worker writes: a plain load and store (no locked
/// read-modify-write on the data path). Readers still see whole values, never torn ones.
fn add(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

impl QueueStats {
    /// A request started.
    pub fn started(&self) {
        add(&self.in_flight, 1);
    }

    /// A started request completed (successfully or not).
    pub fn completed(&self, class: OpClass, bytes: u64, ok: bool, latency: Duration) {
        self.in_flight.store(
            self.in_flight.load(Ordering::Relaxed).saturating_sub(1),
            Ordering::Relaxed,
        );
        if let Some(counter) = self.requests.get(class as usize) {
            add(counter, 1);
        }
        if !ok {
            add(&self.io_errors, 1);
            if class == OpClass::Flush {
                add(&self.flush_errors, 1);
            }
        } else if class == OpClass::Read {
            add(&self.bytes_read, bytes);
        } else if class == OpClass::Write {
            add(&self.bytes_written, bytes);
        }
        add(
            &self.latency_ns_total,
            u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX),
        );
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let bucket = (u64::BITS.saturating_sub(micros.leading_zeros())) as usize;
        if let Some(counter) = self.latency.get(bucket).or(self.latency.last()) {
            add(counter, 1);
        }
    }

    /// A request was refused by validation.
    pub fn rejected(&self, reason: Reason) {
        if let Some(counter) = self.rejected.get(reason.index()) {
            add(counter, 1);
        }
    }

    /// A request was held back by QoS.
    pub fn throttled(&self) {
        add(&self.throttled, 1);
    }

    /// A held-back request started after `waited`.
    pub fn throttle_waited(&self, waited: Duration) {
        add(
            &self.throttle_wait_ns,
            u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX),
        );
    }

    /// A kick found a corrupt available ring.
    pub fn ring_error(&self) {
        add(&self.ring_errors, 1);
    }

    /// Requests left in flight by a previous process were resubmitted.
    pub fn resubmitted(&self, count: usize) {
        add(&self.resubmitted, count as u64);
    }

    /// A kick arrived for a queue with an invalid configuration.
    pub fn misconfigured(&self) {
        add(&self.queue_misconfigured, 1);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> QueueSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        QueueSnapshot {
            requests: OpClass::ALL
                .iter()
                .zip(&self.requests)
                .map(|(c, n)| (c.name().to_string(), load(n)))
                .collect(),
            bytes_read: load(&self.bytes_read),
            bytes_written: load(&self.bytes_written),
            io_errors: load(&self.io_errors),
            flush_errors: load(&self.flush_errors),
            rejected: Reason::ALL
                .iter()
                .zip(&self.rejected)
                .map(|(r, n)| (r.name().to_string(), load(n)))
                .collect(),
            in_flight: load(&self.in_flight),
            latency_us: self
                .latency
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let bound = if i.saturating_add(1) == LATENCY_BUCKETS {
                        u64::MAX
                    } else {
                        1 << i
                    };
                    (bound, load(c))
                })
                .collect(),
            latency_ns_total: load(&self.latency_ns_total),
            queue_misconfigured: load(&self.queue_misconfigured),
            throttled: load(&self.throttled),
            throttle_wait_ns: load(&self.throttle_wait_ns),
            ring_errors: load(&self.ring_errors),
            resubmitted: load(&self.resubmitted),
        }
    }
}

impl QueueSnapshot {
    /// Completed requests of one class.
    pub fn requests_of(&self, class: OpClass) -> u64 {
        self.requests
            .iter()
            .find(|(name, _)| name == class.name())
            .map_or(0, |(_, n)| *n)
    }

    /// Refusals for one reason.
    pub fn rejected_for(&self, reason: Reason) -> u64 {
        self.rejected
            .iter()
            .find(|(name, _)| name == reason.name())
            .map_or(0, |(_, n)| *n)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn counts_bytes_errors_and_latency_buckets() {
        let stats = QueueStats::default();
        stats.started();
        stats.started();
        assert_eq!(stats.snapshot().in_flight, 2);
        stats.completed(OpClass::Read, 4096, true, Duration::from_micros(3));
        stats.completed(OpClass::Write, 512, false, Duration::from_secs(100_000));
        stats.rejected(Reason::OutOfRange);
        let snap = stats.snapshot();
        assert_eq!(snap.in_flight, 0);
        assert_eq!(snap.bytes_read, 4096);
        assert_eq!(snap.bytes_written, 0);
        assert_eq!(snap.io_errors, 1);
        assert_eq!(snap.requests_of(OpClass::Read), 1);
        assert_eq!(snap.rejected_for(Reason::OutOfRange), 1);
        // 3 µs lands in the "< 4 µs" bucket; a huge latency in the last one.
        assert_eq!(snap.latency_us[2], (4, 1));
        assert_eq!(snap.latency_us[LATENCY_BUCKETS - 1].1, 1);
        assert_eq!(snap.flush_errors, 0, "a failed write is not a failed flush");
        stats.started();
        stats.completed(OpClass::Flush, 0, false, Duration::ZERO);
        let snap = stats.snapshot();
        assert_eq!((snap.io_errors, snap.flush_errors), (2, 1));
    }
}
