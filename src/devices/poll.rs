//! When a queue worker polls instead of sleeping: adaptive by default (QEMU's AioContext
//! polling is the model), busy for hosts that dedicate cores, or off; always within a CPU
//! budget.
//!
//! ```text
//!  ring runs dry ─▶ poll for `window` ─ work ─▶ serve (window kept)
//!                        └─ nothing ─▶ sleep on the kick eventfd ... kick after `waited`
//!  waited <= window          polling would have caught it: keep
//!  window < waited <= idle   grow the window (x2, from 4 µs, at most `poll-us`)
//!  waited > idle             idle: shrink the window (/2, to 0): an idle queue costs nothing
//! ```
//!
//! `idle` is 16 x `poll-us`, at least 512 µs. It is not `poll-us` itself (QEMU's rule): a
//! gap measured after sleeping includes our own wake-up, tens of microseconds on a busy or
//! virtualised host, so with that rule a queue whose requests come every 40 µs would never
//! poll again once it had slept; measured here, an interrupt-driven QD1 client then got a third
//! of the IOPS of a fixed 32 µs window.
//!
//! Busy mode keeps polling until work arrives, in spells of at most [`MAX_SPELL`] (the worker
//! then yields to its event loop, so a queue stop is never starved, and is woken at once again
//! through its `Repoll` event). The budget caps the time spent polling without finding work
//! at a share of each second; past it the worker sleeps on kicks until the next second.
//! Nothing here reads a queue or a clock by itself: the worker passes `now` in.

use std::time::{Duration, Instant};

/// Longest one call of a worker may poll before going back to its event loop.
pub const MAX_SPELL: Duration = Duration::from_millis(2);
/// Smallest window the adaptive mode grows from (QEMU's `poll-grow` start).
const MIN_WINDOW: Duration = Duration::from_micros(4);
/// Gaps shorter than this never close the window (see the module doc).
const MIN_IDLE: Duration = Duration::from_micros(512);
/// The period the budget is counted over.
const PERIOD: Duration = Duration::from_secs(1);

/// How a worker polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PollMode {
    /// Poll while work keeps arriving, window adapted to the gaps (the default).
    Adaptive,
    /// Poll until work arrives (hosts that dedicate a core to the queue).
    Busy,
    /// Never poll: sleep on kicks and completions.
    Off,
}

/// A device's polling settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollConfig {
    /// The mode.
    pub mode: PollMode,
    /// Largest adaptive window (`poll-us`).
    pub max: Duration,
    /// Most of each second spent polling without finding work, in percent (`poll-budget`).
    pub budget_percent: u8,
}

impl Default for PollConfig {
    fn default() -> Self {
        Self {
            mode: PollMode::Adaptive,
            max: Duration::from_micros(32),
            budget_percent: 100,
        }
    }
}

/// One worker's polling state.
#[derive(Debug)]
pub struct Poller {
    config: PollConfig,
    window: Duration,
    /// When the worker last went to sleep on its kick fd, and how long it had polled first.
    idle_since: Option<(Instant, Duration)>,
    period_start: Option<Instant>,
    /// Fruitless polling in the current period.
    wasted: Duration,
}

impl Poller {
    /// A poller that starts with the largest window.
    pub fn new(config: PollConfig) -> Self {
        Self {
            config,
            window: config.max,
            idle_since: None,
            period_start: None,
            wasted: Duration::ZERO,
        }
    }

    /// The mode.
    pub fn mode(&self) -> PollMode {
        self.config.mode
    }

    /// How long to poll now that the ring ran dry (zero: sleep instead).
    pub fn window(&mut self, now: Instant) -> Duration {
        let period = *self.period_start.get_or_insert(now);
        if now.saturating_duration_since(period) >= PERIOD {
            self.period_start = Some(now);
            self.wasted = Duration::ZERO;
        }
        let budget = PERIOD.mul_f64(f64::from(self.config.budget_percent.min(100)) / 100.0);
        if self.wasted >= budget {
            return Duration::ZERO;
        }
        match self.config.mode {
            PollMode::Off => Duration::ZERO,
            PollMode::Busy => MAX_SPELL,
            PollMode::Adaptive => self.window,
        }
    }

    /// A poll of `polled` found nothing.
    pub fn missed(&mut self, polled: Duration) {
        self.wasted = self.wasted.saturating_add(polled);
    }

    /// The worker goes to sleep on its kick fd after polling `polled` in vain.
    pub fn sleeping(&mut self, now: Instant, polled: Duration) {
        self.idle_since = Some((now, polled));
    }

    /// A kick woke the worker: adapt the window to how long the queue was idle.
    pub fn woke(&mut self, now: Instant) {
        let Some((since, polled)) = self.idle_since.take() else {
            return;
        };
        // The gap between the last work and this kick: the window polled, then the sleep.
        let waited = now.saturating_duration_since(since).saturating_add(polled);
        if self.config.mode != PollMode::Adaptive {
            return;
        }
        let idle = self.config.max.saturating_mul(16).max(MIN_IDLE);
        if waited > idle {
            self.window = self.window.checked_div(2).unwrap_or_default();
            if self.window < MIN_WINDOW {
                self.window = Duration::ZERO;
            }
        } else if waited > self.window {
            self.window = self
                .window
                .saturating_mul(2)
                .max(MIN_WINDOW)
                .min(self.config.max);
        }
    }
}

/// What one look at a polled queue found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// New work: stop polling and serve it.
    Work,
    /// Something was done (completions returned): the idle clock starts again.
    Progress,
    /// Nothing.
    Nothing,
}

/// The one spin loop of every worker: looks until `look` finds work (true) or nothing has
/// happened for `window` (false). Guest notifications stay suppressed meanwhile.
pub fn spin<E>(window: Duration, mut look: impl FnMut() -> Result<Look, E>) -> Result<bool, E> {
    let mut idle_since = Instant::now();
    let mut empty = 0u32;
    while idle_since.elapsed() < window {
        match look()? {
            Look::Work => return Ok(true),
            Look::Progress => idle_since = Instant::now(),
            Look::Nothing => {
                // A pause between looks; the CPU to other threads every YIELD_EVERY empty
                // looks (a worker sharing the core must not wait out a whole window), not on
                // every look (a syscall per look delayed noticing new work).
                empty = empty.wrapping_add(1);
                if empty % YIELD_EVERY == 0 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }
    Ok(false)
}

/// Empty looks between two yields of the CPU in [`spin`] (a look and a pause take tens of
/// nanoseconds: a few microseconds between yields).
const YIELD_EVERY: u32 = 64;

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    fn adaptive(max_us: u64) -> Poller {
        Poller::new(PollConfig {
            mode: PollMode::Adaptive,
            max: us(max_us),
            budget_percent: 100,
        })
    }

    /// The ring runs dry at `t` and work arrives `gap` later: caught by the poll if the window
    /// covers it, else after a sleep. Returns the next window.
    fn cycle(p: &mut Poller, t: Instant, gap: Duration) -> Duration {
        let window = p.window(t);
        if gap > window {
            p.missed(window);
            p.sleeping(t + window, window);
            p.woke(t + gap);
        }
        p.window(t + gap)
    }

    #[test]
    fn an_idle_queue_stops_polling() {
        let mut p = adaptive(32);
        let t = Instant::now();
        assert_eq!(p.window(t), us(32));
        // Kicks a millisecond apart: idle (beyond 16 x the largest window).
        let mut window = us(32);
        for i in 0..10 {
            window = cycle(&mut p, t + us(1000) * i, us(1000));
        }
        assert_eq!(window, Duration::ZERO);
    }

    #[test]
    fn kicks_just_beyond_the_window_grow_it_to_catch_them() {
        let mut p = adaptive(64);
        let t = Instant::now();
        // First make it idle (kicks 5 ms apart).
        for i in 0..10 {
            cycle(&mut p, t + us(5000) * i, us(5000));
        }
        assert_eq!(p.window(t + us(50_000)), Duration::ZERO);
        // Then work every 20 µs: the window grows back to cover it, then stays (never past
        // the max). Gaps of 100 µs (beyond the window, not idle) keep it at the max too.
        let mut windows = Vec::new();
        for i in 0..10 {
            windows.push(cycle(&mut p, t + us(60_000) + us(20) * i, us(20)));
        }
        let last = *windows.last().unwrap();
        assert!(last >= us(20) && last <= us(64), "{windows:?}");
        assert!(
            windows[5..].iter().all(|w| *w == last),
            "settles: {windows:?}"
        );
    }

    #[test]
    fn busy_polls_in_spells_and_off_never_polls() {
        let t = Instant::now();
        let mut busy = Poller::new(PollConfig {
            mode: PollMode::Busy,
            ..PollConfig::default()
        });
        assert_eq!(busy.window(t), MAX_SPELL);
        let mut off = Poller::new(PollConfig {
            mode: PollMode::Off,
            ..PollConfig::default()
        });
        assert_eq!(off.window(t), Duration::ZERO);
    }

    #[test]
    fn the_budget_caps_fruitless_polling_per_second() {
        let mut p = Poller::new(PollConfig {
            mode: PollMode::Busy,
            budget_percent: 10,
            ..PollConfig::default()
        });
        let t = Instant::now();
        // 100 ms of fruitless polling uses the whole 10% budget of this second...
        for i in 0..50 {
            assert_eq!(p.window(t + us(2000) * i), MAX_SPELL);
            p.missed(MAX_SPELL);
        }
        assert_eq!(p.window(t + us(100_000)), Duration::ZERO);
        // ...and the next second starts afresh.
        assert_eq!(p.window(t + us(1_000_001)), MAX_SPELL);
    }
}
