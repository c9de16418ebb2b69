//! Per-queue side of QoS for a block device: requests the device's limiter refuses wait here,
//! in arrival order, and a timerfd in the worker's epoll set wakes the worker when tokens
//! return. While anything waits, the worker stops taking new requests off the ring, so the
//! guest sees back-pressure (a full queue), never an error or a drop.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::request::{Request, RequestKind};
use super::shared::DeviceShared;
use crate::qos::limiter::{Cost, CostKind};
use crate::qos::timer::QosTimer;
pub use crate::qos::timer::TimerError;
use crate::vring::GuestMemory;

pub use crate::sys::clock::now_ns;

/// What a request costs against the limits; `None` for requests QoS never holds back
/// (flush and GET_ID: holding a flush would only delay durability, not save bandwidth).
pub fn cost(request: &Request) -> Option<Cost> {
    match request.kind {
        RequestKind::Read { .. } => Some(Cost {
            kind: CostKind::Read,
            bytes: u64::from(request.data_len),
        }),
        RequestKind::Write { .. } => Some(Cost {
            kind: CostKind::Write,
            bytes: u64::from(request.data_len),
        }),
        RequestKind::Discard(_) | RequestKind::WriteZeroes(_) => Some(Cost {
            kind: CostKind::Write,
            bytes: 0,
        }),
        RequestKind::Flush | RequestKind::GetId { .. } => None,
    }
}

/// A parsed request waiting for tokens.
pub struct Deferred {
    /// Descriptor chain head.
    pub head: u16,
    /// The validated request.
    pub request: Request,
    /// Keeps the request's guest mappings alive.
    pub memory: Arc<GuestMemory>,
    /// When it was first refused.
    pub since: Instant,
}

/// Waiting requests and the timer that wakes the worker for them.
pub struct Throttle {
    waiting: VecDeque<Deferred>,
    timer: QosTimer,
}

impl Throttle {
    /// An empty throttle with an unarmed timer.
    pub fn new() -> Result<Self, TimerError> {
        Ok(Self {
            waiting: VecDeque::new(),
            timer: QosTimer::new()?,
        })
    }

    /// The timerfd to watch for readability.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.fd()
    }

    /// Whether requests are waiting (then no new ones are taken off the ring).
    pub fn is_holding(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Consumes the timer's expiry (after an epoll wake-up).
    pub fn clear_timer(&mut self) {
        self.timer.clear();
    }

    /// Whether `request` may start now: charges the limiter if so; if not (or if others are
    /// already waiting, to keep arrival order), arms the timer and the caller must [`defer`] it.
    ///
    /// [`defer`]: Throttle::defer
    pub fn may_start(&mut self, device: &DeviceShared, request: &Request) -> bool {
        if self.is_holding() {
            return false;
        }
        match try_start(device, request) {
            Ok(()) => true,
            Err(wait) => {
                self.timer.arm(wait);
                false
            }
        }
    }

    /// Queues a request that may not start yet.
    pub fn defer(&mut self, deferred: Deferred) {
        self.waiting.push_back(deferred);
    }

    /// Releases waiting requests in order while the limiter allows; re-arms for the rest.
    pub fn release(&mut self, device: &DeviceShared) -> Vec<Deferred> {
        let mut ready = Vec::new();
        while let Some(front) = self.waiting.front() {
            match try_start(device, &front.request) {
                Ok(()) => ready.extend(self.waiting.pop_front()),
                Err(wait) => {
                    self.timer.arm(wait);
                    break;
                }
            }
        }
        ready
    }

    /// Everything waiting, regardless of limits (queue stop: nothing may stay unanswered).
    pub fn release_all(&mut self) -> Vec<Deferred> {
        self.waiting.drain(..).collect()
    }
}

/// Charges the device's limits (its own, then its group's) for `request`.
fn try_start(device: &DeviceShared, request: &Request) -> Result<(), Duration> {
    match cost(request) {
        None => Ok(()),
        Some(cost) => device.qos.try_start(cost),
    }
}
