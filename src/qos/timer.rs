//! The wake-up timer a worker arms when QoS holds its work back: a timerfd in the worker's
//! epoll set, shared by block queues (held requests) and net queue pairs (held frames).
//!
//! Waits are clamped to [`TIMER_MIN`, 1 s]: tokens accumulate meanwhile (buckets hold 100 ms
//! of rate), so each wake-up releases a batch rather than one request per token, which keeps
//! the limiter cheap while saturated; the upper bound makes the worker re-check at least every
//! second whatever the limiter said.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use vmm_sys_util::timerfd::TimerFd;

/// Shortest wait: the granularity at which held-back work is released.
pub const TIMER_MIN: Duration = Duration::from_millis(1);
/// Longest wait before the worker looks again.
const TIMER_MAX: Duration = Duration::from_secs(1);

/// The timer could not be created.
#[derive(Debug, thiserror::Error)]
#[error("cannot create the QoS timer")]
pub struct TimerError(#[source] pub vmm_sys_util::errno::Error);

/// A one-shot timerfd for QoS waits.
pub struct QosTimer {
    timer: TimerFd,
}

impl QosTimer {
    /// An unarmed timer.
    pub fn new() -> Result<Self, TimerError> {
        Ok(Self {
            timer: TimerFd::new().map_err(TimerError)?,
        })
    }

    /// The fd to watch for readability.
    pub fn fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Whether the timer is armed (waiting to expire).
    pub fn is_armed(&self) -> bool {
        self.timer.is_armed().unwrap_or(false)
    }

    /// Disarms the timer and consumes any expiry (`timerfd_settime` to zero resets the
    /// expiration count): the fd is no longer readable.
    pub fn clear(&mut self) {
        if let Err(e) = self.timer.clear() {
            log::warn!("QoS timer: {e}");
        }
    }

    /// Arms the timer for `wait`, clamped to [`TIMER_MIN`, 1 s]; returns the armed wait.
    pub fn arm(&mut self, wait: Duration) -> Duration {
        let wait = wait.clamp(TIMER_MIN, TIMER_MAX);
        if let Err(e) = self.timer.reset(wait, None) {
            log::error!("cannot arm the QoS timer: {e}");
        }
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the timer's fd becomes readable within `timeout_ms`.
    fn fires_within(timer: &QosTimer, timeout_ms: i32) -> bool {
        let mut pollfd = libc::pollfd {
            fd: timer.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the timer's fd, which stays open during the call.
        unsafe { libc::poll(&mut pollfd, 1, timeout_ms) == 1 }
    }

    #[test]
    fn waits_are_clamped_and_an_expiry_wakes_the_fd_once() {
        let mut timer = QosTimer::new().unwrap();
        assert_eq!(timer.arm(Duration::from_secs(60)), TIMER_MAX);
        assert_eq!(timer.arm(Duration::ZERO), TIMER_MIN);
        assert!(fires_within(&timer, 5000));
        timer.clear();
        assert!(!fires_within(&timer, 0), "cleared expiry still readable");
    }
}
