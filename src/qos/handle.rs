//! A device's QoS as its data path and the registry use it: [`DeviceQos`] under one mutex,
//! plus a lock-free "is anything limited?" flag so an unlimited device never takes the lock,
//! and the device's identity inside groups. Shared by disks and NICs.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::config::QosConfig;
use super::device::DeviceQos;
use super::group::SharedLimiter;
use super::limiter::{Cost, LimitError};
use crate::lock::lock;

pub use crate::sys::clock::now_ns;

/// One device's limits, own and group.
pub struct QosHandle {
    state: Mutex<DeviceQos>,
    enabled: AtomicBool,
    member: u64,
}

impl Default for QosHandle {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self {
            state: Mutex::new(DeviceQos::default()),
            enabled: AtomicBool::new(false),
            member: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl QosHandle {
    /// Replaces the device's own limits; takes effect for the next request or frame.
    pub fn set_limits(&self, config: &QosConfig) -> Result<(), LimitError> {
        let mut state = lock(&self.state);
        state.set_limits(config, now_ns())?;
        self.enabled.store(state.is_limited(), Ordering::Release);
        Ok(())
    }

    /// Joins `group` (or leaves the current one with `None`).
    pub fn set_group(&self, group: Option<Arc<SharedLimiter>>) {
        let mut state = lock(&self.state);
        state.set_group(group, self.member);
        self.enabled.store(state.is_limited(), Ordering::Release);
    }

    /// Whether anything limits the device (fast path: no lock).
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Charges `cost` at time `now_ns` ([`now_ns`]'s base), or says how long to wait
    /// (charging nothing). A pass of work reads the clock once for all its requests or
    /// frames (the buckets refill by the time passed; a pass lasts microseconds).
    pub fn try_start_at(&self, cost: Cost, now_ns: u64) -> Result<(), Duration> {
        lock(&self.state).try_start(self.member, cost, now_ns)
    }

    /// A batch of `ops` requests or frames (`cost.bytes` in all) charged at once, or nothing
    /// (then the caller admits them one by one): one lock per pass instead of one per item.
    pub fn try_start_many_at(&self, cost: Cost, ops: u64, now_ns: u64) -> Result<(), Duration> {
        lock(&self.state).try_start_n(self.member, cost, ops, now_ns, true)
    }

    /// Gives back a charge for work that did not happen after all.
    pub fn refund(&self, cost: Cost) {
        lock(&self.state).refund(cost);
    }

    /// Charges work that ran without waiting (answered on a queue stop) into debt: the
    /// requests behind it wait for it, so a guest cannot get work past its limits by
    /// stopping its queues.
    pub fn charge_anyway(&self, cost: Cost) {
        lock(&self.state).charge_anyway(cost, now_ns());
    }

    /// Gives back a batch charged by [`QosHandle::try_start_many_at`].
    pub fn refund_many(&self, cost: Cost, ops: u64) {
        lock(&self.state).refund_n(cost, ops);
    }

    /// Charges bytes known only after the fact (a received frame's size), into debt if need
    /// be; the next [`QosHandle::try_start_at`] waits until the debt is repaid.
    pub fn charge_bytes(&self, cost: Cost) {
        lock(&self.state).charge_bytes(cost, now_ns());
    }

    /// The device's own current tokens, by limit name.
    pub fn tokens(&self) -> Vec<(String, i64)> {
        lock(&self.state).tokens(now_ns())
    }

    /// The device's own settings.
    pub fn config(&self) -> QosConfig {
        lock(&self.state).config().clone()
    }
}
