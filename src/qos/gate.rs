//! The one QoS gate every worker uses: admission (charge the device's limits now, or learn
//! how long to wait), the work held back in arrival order, and the timerfd that wakes the
//! worker when tokens return.
//!
//! ```text
//!  work ─▶ admit ─ ok ─▶ run
//!            └─ wait ─▶ timer armed ─▶ hold(work) ... timer fires ─▶ release (in order,
//!                                                     re-admitted) ─▶ run
//! ```
//!
//! Block queues hold parsed requests (the worker stops taking requests off the ring while
//! anything is held: the guest sees a full queue, never an error). Net pairs hold a
//! direction (the frame went back into the ring, or stayed in the tap). Switch ports admit
//! on the sender's thread with [`admit`] and drop instead of holding, so one slow receiver
//! never stalls a sender.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::handle::QosHandle;
use super::limiter::Cost;
use super::timer::{QosTimer, TimerError};

/// Charges `cost` against `qos` now, or says how long to wait (charging nothing). Work that
/// costs nothing (`None`) and devices without limits pass with one atomic load. `now` is the
/// caller's pass clock (`sys::clock::now_ns` base): read here on first use, then reused for
/// the rest of the pass (a clock read per frame was a seventh of a 64-byte frame's cost).
pub fn admit(qos: &QosHandle, cost: Option<Cost>, now: &mut Option<u64>) -> Result<(), Duration> {
    match cost {
        Some(cost) if qos.is_enabled() => {
            let at = *now.get_or_insert_with(crate::sys::clock::now_ns);
            qos.try_start_at(cost, at)
        }
        _ => Ok(()),
    }
}

/// Charges a batch of `ops` items costing `cost` in all (`cost.bytes` summed) against `qos`
/// at once; true if it did. False charges nothing and arms nothing: the caller then admits
/// the items one by one (with [`admit`] or [`Gate::admit`]), exactly as if it had not tried.
/// Devices without limits pass with one atomic load.
pub fn admit_batch(qos: &QosHandle, cost: Cost, ops: u64, now: &mut Option<u64>) -> bool {
    if ops == 0 || !qos.is_enabled() {
        return true;
    }
    let at = *now.get_or_insert_with(crate::sys::clock::now_ns);
    qos.try_start_many_at(cost, ops, at).is_ok()
}

/// Work held back, and since when.
#[derive(Debug)]
pub struct Held<T> {
    /// The work.
    pub item: T,
    /// When it was first refused.
    pub since: Instant,
}

/// A worker's gate: held work and the timer that wakes the worker for it.
pub struct Gate<T> {
    held: VecDeque<Held<T>>,
    timer: QosTimer,
}

impl<T> Gate<T> {
    /// An empty gate with an unarmed timer.
    pub fn new() -> Result<Self, TimerError> {
        Ok(Self {
            held: VecDeque::new(),
            timer: QosTimer::new()?,
        })
    }

    /// The timerfd to watch for readability.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.fd()
    }

    /// Whether anything is held.
    pub fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Whether held work matches `pred`.
    pub fn holds(&self, pred: impl Fn(&T) -> bool) -> bool {
        self.held.iter().any(|h| pred(&h.item))
    }

    /// Admits work costing `cost` now, or arms the timer and returns how long it was armed
    /// for; the caller then holds the work ([`Gate::hold`]) or puts it back where it came from.
    /// `now`: the pass clock, as in [`admit`].
    pub fn admit(
        &mut self,
        qos: &QosHandle,
        cost: Option<Cost>,
        now: &mut Option<u64>,
    ) -> Result<(), Duration> {
        admit(qos, cost, now).map_err(|wait| self.timer.arm(wait))
    }

    /// Holds `item` until the timer.
    pub fn hold(&mut self, item: T) {
        self.held.push_back(Held {
            item,
            since: Instant::now(),
        });
    }

    /// The timer fired: releases held work in arrival order while `qos` admits it (cost
    /// from `cost_of`), re-arming the timer for the rest.
    pub fn release(
        &mut self,
        qos: &QosHandle,
        cost_of: impl Fn(&T) -> Option<Cost>,
    ) -> Vec<Held<T>> {
        self.timer.clear();
        let mut ready = Vec::new();
        let mut now = None;
        while let Some(front) = self.held.front() {
            match admit(qos, cost_of(&front.item), &mut now) {
                Ok(()) => ready.extend(self.held.pop_front()),
                Err(wait) => {
                    self.timer.arm(wait);
                    break;
                }
            }
        }
        ready
    }

    /// Everything held, limits or not (a queue stop: nothing may stay unanswered). The timer
    /// is disarmed: with nothing held, a later expiry would wake the worker for nothing, and
    /// a level-triggered fd that nobody clears would wake it forever.
    pub fn release_all(&mut self) -> Vec<Held<T>> {
        self.timer.clear();
        self.held.drain(..).collect()
    }

    /// Disarms the timer and consumes its expiry (after it woke the worker).
    pub fn clear_timer(&mut self) {
        self.timer.clear();
    }

    /// Whether the timer is armed.
    #[cfg(test)]
    pub fn timer_armed(&self) -> bool {
        self.timer.is_armed()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::config::options::OptionList;
    use crate::qos::config::QosConfig;
    use crate::qos::limiter::CostKind;

    fn limited(spec: &str) -> QosHandle {
        let handle = QosHandle::default();
        let mut options = OptionList::parse(spec).unwrap();
        handle
            .set_limits(&QosConfig::from_options(&mut options).unwrap())
            .unwrap();
        handle
    }

    const READ: Option<Cost> = Some(Cost {
        kind: CostKind::Read,
        bytes: 512,
    });

    #[test]
    fn unlimited_devices_and_free_work_always_pass() {
        let mut gate: Gate<u32> = Gate::new().unwrap();
        let free = QosHandle::default();
        for _ in 0..1000 {
            assert!(gate.admit(&free, READ, &mut None).is_ok());
        }
        let tight = limited("iops=1,iops-burst=1");
        assert!(gate.admit(&tight, None, &mut None).is_ok());
    }

    #[test]
    fn refused_work_is_held_and_released_in_order_as_tokens_return() {
        let qos = limited("iops=1000");
        let mut gate: Gate<u32> = Gate::new().unwrap();
        // Spend the burst; the first refusal says to wait about one token's time (1 ms).
        let wait = (0..100_000)
            .find_map(|_| gate.admit(&qos, READ, &mut None).err())
            .unwrap();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(2),
            "{wait:?}"
        );
        gate.hold(1);
        gate.hold(2);
        assert!(gate.holds(|i| *i == 2));
        // Released one at a time, in order, as the bucket refills (1 ms per token).
        let mut seen = Vec::new();
        while seen.len() < 2 {
            seen.extend(gate.release(&qos, |_| READ).into_iter().map(|h| h.item));
        }
        assert_eq!(seen, vec![1, 2]);
        assert!(!gate.is_holding());
    }

    #[test]
    fn release_all_ignores_limits() {
        let qos = limited("iops=1,iops-burst=1");
        let mut gate: Gate<u32> = Gate::new().unwrap();
        assert!(gate.admit(&qos, READ, &mut None).is_ok());
        gate.hold(7);
        gate.hold(8);
        assert!(gate.admit(&qos, READ, &mut None).is_err());
        assert!(gate.timer_armed());
        let all: Vec<u32> = gate.release_all().into_iter().map(|h| h.item).collect();
        assert_eq!(all, vec![7, 8]);
        assert!(!gate.is_holding());
        assert!(
            !gate.timer_armed(),
            "nothing held: the timer must not wake the worker"
        );
    }
}
