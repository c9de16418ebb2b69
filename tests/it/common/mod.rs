//! Shared test harness: run the real `novacrond` binary and drive it as a vhost-user
//! front-end would (memfd guest memory, split virtqueues, the `vhost` crate's `Frontend`).
#![allow(clippy::panic)] // test helpers fail loudly by design

pub mod blk;
pub mod ceph;
pub mod control;
pub mod daemon;
pub mod ffi;
pub mod guest;
pub mod loopdev;
pub mod memory;
pub mod net;
pub mod netns;
pub mod qemu;
pub mod virtq;
pub mod writers;

/// Asserts a throttled run took its ideal time `ideal` (what the token bucket allows) within
/// ±10%. The upper bound also allows `baseline`, the same work measured without a limit in
/// the same test: what the client and a busy CI machine cost on their own, which is not the
/// limiter's doing. The lower bound needs no allowance: a limiter can only be too fast.
pub fn assert_rate(
    what: &str,
    elapsed: std::time::Duration,
    ideal: std::time::Duration,
    baseline: std::time::Duration,
) {
    let low = ideal.mul_f64(0.9);
    let high = ideal.mul_f64(1.1) + baseline;
    assert!(
        elapsed >= low && elapsed <= high,
        "{what}: took {elapsed:?}, ideal {ideal:?} (allowed {low:?}..{high:?}, unthrottled run {baseline:?})"
    );
}
