//! Test-only: an engine wrapper that completes requests late and out of order, to prove that
//! restarts under such completions lose nothing and complete nothing twice (inflight
//! tracking).
//!
//! Every fourth completion is held back for [`HOLD`] while later ones are returned, so at any
//! moment some requests are in flight behind completed ones (a kill then finds a ring whose
//! completions are not a prefix of what was taken). The worker is woken for a held
//! completion through the engine's completion fd: an epoll fd that becomes readable when
//! either the inner engine's fd or our timer fires. Enabled in `test-hooks` builds by
//! `NOVACRON_TEST_REORDER=1`; release builds never read the variable.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::{Completion, Engine, EngineError, IoOp};

/// How long a held completion waits.
const HOLD: Duration = Duration::from_millis(40);
/// One completion in this many is held back.
const HOLD_EVERY: u64 = 4;

/// Whether the environment asks for out-of-order completions.
pub fn requested() -> bool {
    cfg!(feature = "test-hooks") && std::env::var_os("NOVACRON_TEST_REORDER").is_some()
}

/// Wraps an engine; see the module docs.
pub struct ReorderEngine {
    inner: Box<dyn Engine>,
    /// Held completions and when each may go.
    held: VecDeque<(Completion, Instant)>,
    seen: u64,
    fresh: Vec<Completion>,
    timer: TimerFd,
    /// Readable when the inner engine's completion fd or the timer is.
    wake: Epoll,
}

impl ReorderEngine {
    /// Reorders `inner`'s completions.
    pub fn new(inner: Box<dyn Engine>) -> Result<Self, EngineError> {
        let setup = EngineError::Setup;
        let timer =
            TimerFd::new().map_err(|e| setup(std::io::Error::from_raw_os_error(e.errno())))?;
        let wake = Epoll::new().map_err(setup)?;
        let mut fds = vec![timer.as_raw_fd()];
        fds.extend(inner.completion_fd());
        for fd in fds {
            wake.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            )
            .map_err(setup)?;
        }
        Ok(Self {
            inner,
            held: VecDeque::new(),
            seen: 0,
            fresh: Vec::new(),
            timer,
            wake,
        })
    }

    /// Moves held completions whose time has come into `out`, and arms the timer for the
    /// next one.
    fn release_due(&mut self, out: &mut Vec<Completion>) {
        let now = Instant::now();
        while self.held.front().is_some_and(|(_, due)| *due <= now) {
            if let Some((completion, _)) = self.held.pop_front() {
                out.push(completion);
            }
        }
        if let Some((_, due)) = self.held.front() {
            let wait = due
                .saturating_duration_since(now)
                .max(Duration::from_micros(100));
            let _ = self.timer.reset(wait, None);
        }
    }
}

impl Engine for ReorderEngine {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    unsafe fn push(&mut self, op: IoOp) {
        // SAFETY: forwarded unchanged; the caller's guarantee carries over.
        unsafe { self.inner.push(op) }
    }

    fn submit(&mut self) -> Result<(), EngineError> {
        self.inner.submit()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.wake.as_raw_fd())
    }

    fn acknowledge_notification(&mut self) {
        self.inner.acknowledge_notification();
        // Disarming also resets the expiry count (the fd stops being readable); `reap`
        // arms it again for the next held completion.
        let _ = self.timer.clear();
    }

    fn completions_pending(&mut self) -> bool {
        self.inner.completions_pending()
            || self
                .held
                .front()
                .is_some_and(|(_, due)| *due <= Instant::now())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.inner.reap(&mut self.fresh);
        let due = Instant::now()
            .checked_add(HOLD)
            .unwrap_or_else(Instant::now);
        for completion in self.fresh.drain(..) {
            self.seen = self.seen.wrapping_add(1);
            if self.seen % HOLD_EVERY == 0 {
                self.held.push_back((completion, due));
            } else {
                out.push(completion);
            }
        }
        self.release_due(out);
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight().saturating_add(self.held.len())
    }

    fn drain(&mut self, out: &mut Vec<Completion>) {
        self.inner.drain(out);
        out.extend(self.held.drain(..).map(|(c, _)| c));
    }

    fn take_extra_work(&mut self) -> super::ExtraWork {
        self.inner.take_extra_work()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests may panic
mod tests {
    use super::*;
    use crate::storage::{GuestIovecs, OpKind};

    /// Completes one op per reap, oldest first.
    #[derive(Default)]
    struct Trickle(VecDeque<u64>);

    impl Engine for Trickle {
        fn name(&self) -> &'static str {
            "trickle"
        }
        unsafe fn push(&mut self, op: IoOp) {
            self.0.push_back(op.tag);
        }
        fn reap(&mut self, out: &mut Vec<Completion>) {
            if let Some(tag) = self.0.pop_front() {
                out.push(Completion {
                    tag,
                    result: Ok(()),
                });
            }
        }
        fn in_flight(&self) -> usize {
            self.0.len()
        }
        fn drain(&mut self, out: &mut Vec<Completion>) {
            while !self.0.is_empty() {
                self.reap(out);
            }
        }
    }

    #[test]
    fn completions_come_back_out_of_order_and_none_is_lost() {
        let mut engine = ReorderEngine::new(Box::new(Trickle::default())).unwrap();
        for tag in 0..40u64 {
            let op = IoOp {
                kind: OpKind::Flush,
                iovecs: GuestIovecs(Vec::new()),
                tag,
            };
            // SAFETY: a flush has no buffers.
            unsafe { engine.push(op) };
        }
        let mut out = Vec::new();
        while engine.in_flight() > 0 {
            if engine.inner.in_flight() == 0 {
                // Only held ones left: the engine's fd wakes us when they are due.
                let mut pollfd = libc::pollfd {
                    fd: engine.completion_fd().unwrap(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for an fd the engine keeps open.
                assert_eq!(unsafe { libc::poll(&mut pollfd, 1, 5000) }, 1, "woken");
                engine.acknowledge_notification();
            }
            engine.reap(&mut out);
        }
        let tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
        let mut sorted = tags.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..40).collect::<Vec<_>>(), "each exactly once");
        assert_ne!(tags, sorted, "some overtaken");
        // Tag 3 (the fourth) came back after every later one that was not held.
        let at = tags.iter().position(|&t| t == 3).unwrap();
        assert!(at >= 30, "{tags:?}");
    }
}
