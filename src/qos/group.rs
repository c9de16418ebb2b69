//! A limiter shared by several devices (a QoS group), fair among its members.
//!
//! Members' requests draw from the group's buckets on top of their own limits. When the group
//! is short of tokens, members that had to wait form a queue and are served in turn: the
//! member at the head gets the next tokens, then goes to the back if it must wait again. So
//! when every member is saturated they get equal shares of requests, and no member starves
//! while another takes the whole budget. A member that stops asking (device removed, front-end
//! gone) is dropped from the queue after [`STALE`], so it can never block the others.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use super::config::QosConfig;
use super::limiter::{Cost, LimitError, Limiter};

/// A waiting member that has not asked again for this long loses its turn.
const STALE: Duration = Duration::from_secs(1);
/// How soon a member queued behind another retries.
const BEHIND_RETRY: Duration = Duration::from_micros(50);

struct State {
    limiter: Limiter,
    config: QosConfig,
    /// Members waiting for tokens, in turn order, with when they last asked (ns).
    waiting: VecDeque<(u64, u64)>,
}

/// A group's shared limiter.
pub struct SharedLimiter {
    state: Mutex<State>,
    /// Times a member had to wait for the group (each retry counts).
    refusals: std::sync::atomic::AtomicU64,
}

impl SharedLimiter {
    /// A group with `config`'s limits, buckets full at `now_ns`.
    pub fn new(config: &QosConfig, now_ns: u64) -> Result<Self, LimitError> {
        Ok(Self {
            state: Mutex::new(State {
                limiter: config.limiter(now_ns)?,
                config: config.clone(),
                waiting: VecDeque::new(),
            }),
            refusals: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::lock::lock(&self.state)
    }

    /// The group's settings.
    pub fn config(&self) -> QosConfig {
        self.lock().config.clone()
    }

    /// Replaces the limits (buckets start full).
    pub fn reconfigure(&self, config: &QosConfig, now_ns: u64) -> Result<(), LimitError> {
        let limiter = config.limiter(now_ns)?;
        let mut state = self.lock();
        state.limiter = limiter;
        state.config = config.clone();
        Ok(())
    }

    /// Charges `cost` for `member` if the group allows it now and it is this member's turn;
    /// otherwise queues the member and returns how long to wait.
    pub fn try_start(&self, member: u64, cost: Cost, now_ns: u64) -> Result<(), Duration> {
        self.try_start_n(member, cost, 1, now_ns, false)
    }

    /// [`SharedLimiter::try_start`] for a batch of `ops` operations (`cost.bytes` in all),
    /// or, with `probe`, an attempt to charge a whole burst at once. A probe is taken only
    /// while no member waits for its turn (else turns go item by item: a batch would take a
    /// whole burst in one turn), and a refused probe changes nothing: the member is not
    /// queued and no refusal is counted (the caller then admits the items one by one, which
    /// does both).
    pub fn try_start_n(
        &self,
        member: u64,
        cost: Cost,
        ops: u64,
        now_ns: u64,
        probe: bool,
    ) -> Result<(), Duration> {
        let mut state = self.lock();
        state
            .waiting
            .retain(|&(_, asked)| now_ns.saturating_sub(asked) < STALE.as_nanos() as u64);
        let head = state.waiting.front().map(|&(m, _)| m);
        if probe && head.is_some() {
            return Err(Duration::ZERO);
        }
        if head.is_some_and(|head| head != member) {
            let wait = match state.limiter.try_start(cost, now_ns) {
                // Tokens are there, but they belong to the member whose turn it is.
                Ok(()) => {
                    state.limiter.refund(cost);
                    BEHIND_RETRY
                }
                Err(wait) => wait,
            };
            enqueue(&mut state.waiting, member, now_ns);
            self.count_refusal();
            return Err(wait);
        }
        match state.limiter.try_start_n(cost, ops, now_ns) {
            Ok(()) => {
                if head == Some(member) {
                    state.waiting.pop_front();
                }
                Ok(())
            }
            Err(wait) => {
                if !probe {
                    enqueue(&mut state.waiting, member, now_ns);
                    self.count_refusal();
                }
                Err(wait)
            }
        }
    }

    fn count_refusal(&self) {
        self.refusals
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Times members had to wait for the group.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The group's current tokens by limit name.
    pub fn tokens(&self, now_ns: u64) -> Vec<(String, i64)> {
        self.lock().limiter.tokens(now_ns)
    }

    /// Charges one operation whatever the level (see [`Limiter::charge_anyway`]).
    pub fn charge_anyway(&self, cost: Cost, now_ns: u64) {
        self.lock().limiter.charge_anyway(cost, 1, now_ns);
    }

    /// Charges bytes known only afterwards (see [`Limiter::charge_bytes`]).
    pub fn charge_bytes(&self, cost: Cost, now_ns: u64) {
        self.lock().limiter.charge_bytes(cost, now_ns);
    }

    /// Gives back what a started request was charged (its own limits refused it after all).
    pub fn refund(&self, cost: Cost) {
        self.lock().limiter.refund(cost);
    }

    /// [`SharedLimiter::refund`] of a batch of `ops` operations.
    pub fn refund_n(&self, cost: Cost, ops: u64) {
        self.lock().limiter.refund_n(cost, ops);
    }

    /// Forgets `member` (device removed or left the group).
    pub fn leave(&self, member: u64) {
        self.lock().waiting.retain(|&(m, _)| m != member);
    }
}

fn enqueue(waiting: &mut VecDeque<(u64, u64)>, member: u64, now_ns: u64) {
    match waiting.iter_mut().find(|(m, _)| *m == member) {
        Some(entry) => entry.1 = now_ns,
        None => waiting.push_back((member, now_ns)),
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;
    use crate::config::options::OptionList;
    use crate::qos::limiter::CostKind;

    fn group(spec: &str) -> SharedLimiter {
        let mut options = OptionList::parse(spec).unwrap();
        let config = QosConfig::from_options(&mut options).unwrap();
        SharedLimiter::new(&config, 0).unwrap()
    }

    /// Simulates `members` saturating members (each retrying at its returned wait) on one
    /// clock for `seconds`; `weights[i]` requests per attempt for member i. Returns starts.
    fn simulate(group: &SharedLimiter, weights: &[u64], seconds: u64) -> Vec<u64> {
        let cost = Cost {
            kind: CostKind::Read,
            bytes: 4096,
        };
        let mut next = vec![0u64; weights.len()];
        let mut started = vec![0u64; weights.len()];
        loop {
            let (i, &now) = next.iter().enumerate().min_by_key(|(_, t)| **t).unwrap();
            if now >= seconds * 1_000_000_000 {
                return started;
            }
            let mut wait = None;
            for _ in 0..weights[i] {
                match group.try_start(i as u64, cost, now) {
                    Ok(()) => started[i] += 1,
                    Err(w) => {
                        wait = Some(w);
                        break;
                    }
                }
            }
            next[i] = now + wait.map_or(1_000, |w| w.as_nanos() as u64).max(1);
        }
    }

    #[test]
    fn saturated_members_get_equal_shares_of_the_group_rate() {
        let g = group("iops=3000");
        let started = simulate(&g, &[1, 1, 1], 10);
        let total: u64 = started.iter().sum();
        assert!(
            (29_900..=30_400).contains(&total),
            "group rate not held: {total}"
        );
        let (min, max) = (
            *started.iter().min().unwrap(),
            *started.iter().max().unwrap(),
        );
        assert!(max as f64 <= min as f64 * 1.2, "unfair shares {started:?}");
    }

    #[test]
    fn a_greedy_member_does_not_starve_the_others() {
        let g = group("iops=1000");
        // Member 0 asks 50 at a time, the others 1.
        let started = simulate(&g, &[50, 1, 1], 10);
        assert!(
            started[1] > 2_000 && started[2] > 2_000,
            "starved: {started:?}"
        );
        let (min, max) = (
            *started.iter().min().unwrap(),
            *started.iter().max().unwrap(),
        );
        assert!(max as f64 <= min as f64 * 1.2, "unfair shares {started:?}");
    }

    #[test]
    fn a_member_that_leaves_does_not_block_the_queue() {
        let g = group("iops=10");
        let cost = Cost {
            kind: CostKind::Write,
            bytes: 0,
        };
        assert!(g.try_start(1, cost, 0).is_ok());
        assert!(
            g.try_start(1, cost, 0).is_err(),
            "member 1 now waits at the head"
        );
        assert!(g.try_start(2, cost, 0).is_err());
        g.leave(1);
        // Member 2 is now first in line and gets the next token (due at 100 ms).
        assert!(g.try_start(2, cost, 100_000_000).is_ok());
        // A member that stopped asking is dropped after STALE.
        assert!(g.try_start(3, cost, 150_000_000).is_err());
        assert!(
            g.try_start(4, cost, 2_000_000_000).is_ok(),
            "stale member 3 still blocks"
        );
    }

    #[test]
    fn a_probe_waits_its_turn_and_changes_nothing_when_refused() {
        let g = group("iops=100"); // room: 10
        let cost = Cost {
            kind: CostKind::Read,
            bytes: 0,
        };
        // Nobody waits: a burst of 8 is charged at once.
        assert!(g.try_start_n(1, cost, 8, 0, true).is_ok());
        // 2 left: a probe of 4 is refused, without queueing the member or counting a wait.
        assert!(g.try_start_n(1, cost, 4, 0, true).is_err());
        assert_eq!(g.refusals(), 0);
        assert!(g.try_start(2, cost, 0).is_ok());
        assert!(g.try_start(2, cost, 0).is_ok());
        assert!(
            g.try_start(2, cost, 0).is_err(),
            "member 2 now waits its turn"
        );
        assert_eq!(g.refusals(), 1);
        // Someone waits: probes are refused even with tokens there (turns go item by item).
        let later = 50_000_000; // 5 tokens later, before member 2 counts as gone (STALE)
        assert_eq!(g.try_start_n(1, cost, 2, later, true), Err(Duration::ZERO));
        assert_eq!(g.refusals(), 1);
        assert!(g.try_start(2, cost, later).is_ok(), "member 2's turn");
        assert!(
            g.try_start_n(1, cost, 2, later, true).is_ok(),
            "no one waits"
        );
    }
}
