//! The daemon's monotonic clock in nanoseconds, one time base for QoS buckets and tiering heat
//! (so their times compare); and a coarse one (a few milliseconds of resolution, a fraction
//! of the cost) for what is stamped per frame, the switch's MAC aging.

use std::sync::OnceLock;
use std::time::Instant;

/// Nanoseconds since the first call in this process (monotonic; saturates after ~584 years).
pub fn now_ns() -> u64 {
    ns_at(Instant::now())
}

/// `at` on the [`now_ns`] time base (a clock read once for a whole pass of work).
pub fn ns_at(at: Instant) -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(at.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX)
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the last tick's time, read without a clock
/// source access. Only compared with itself (the switch stamps and ages MACs with it).
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    if rc != 0 {
        return now_ns();
    }
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}
