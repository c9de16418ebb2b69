//! The daemon's monotonic clock in nanoseconds, one time base for QoS buckets, switch MAC aging
//! and tiering heat (so their times compare).

use std::sync::OnceLock;
use std::time::Instant;

/// Nanoseconds since the first call in this process (monotonic; saturates after ~584 years).
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
