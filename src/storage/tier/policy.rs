//! Automatic tiering: which extents to move, decided from per-extent heat.
//!
//! Heat is an access count that halves every [`HALF_LIFE`]: `heat = heat·2^(−Δt/half-life) + 1`
//! on each access, so a burst long ago counts less than steady recent use. The policy, checked
//! once a second by the disk's policy thread:
//! - `tier-hot-budget=BYTES`: while the hot extents holding data exceed the budget, demote the
//!   coldest of them (lowest heat, then longest idle);
//! - `tier-idle-for=DURATION`: demote hot extents not accessed for that long;
//! - `tier-promote-after=N`: promote a cold extent once it has been read N times since it
//!   was demoted.
//!
//! Pure logic here (unit-tested on made-up extents); the moves themselves are the store's.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::time::Duration;

use crate::config::options::{OptionError, OptionList};

/// Heat halves this often without accesses.
pub const HALF_LIFE: Duration = Duration::from_secs(60);

/// The automatic policy of a tiered disk (all optional; none set means manual moves only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TierPolicy {
    /// Most bytes of hot extents holding data.
    pub hot_budget: Option<u64>,
    /// Demote extents idle this long.
    pub idle_for: Option<Duration>,
    /// Promote a cold extent after this many reads.
    pub promote_after: Option<u32>,
}

impl TierPolicy {
    /// Takes `tier-hot-budget`, `tier-idle-for`, `tier-promote-after` out of `options`.
    pub fn from_options(options: &mut OptionList) -> Result<Self, OptionError> {
        let hot_budget = options.take_size("tier-hot-budget")?;
        let idle_for = options.take_duration("tier-idle-for")?;
        let promote_after = options.take::<u32>("tier-promote-after")?;
        if promote_after == Some(0) {
            return Err(OptionError::Invalid {
                key: "tier-promote-after".into(),
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        Ok(Self {
            hot_budget,
            idle_for,
            promote_after,
        })
    }

    /// Whether any automatic move is configured.
    pub fn is_active(&self) -> bool {
        self.hot_budget.is_some() || self.idle_for.is_some() || self.promote_after.is_some()
    }
}

/// What the policy sees of one extent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExtentView {
    /// Extent number.
    pub extent: u64,
    /// Whether it is on the cold tier.
    pub cold: bool,
    /// Whether it holds data (unwritten hot extents cost nothing).
    pub holds_data: bool,
    /// Heat now.
    pub heat: f64,
    /// Time since the last access.
    pub idle: Duration,
    /// Reads since demotion (cold extents).
    pub cold_reads: u32,
}

/// Heat after `elapsed` without accesses.
pub fn decay(heat: f64, elapsed: Duration) -> f64 {
    heat * 0.5f64.powf(elapsed.as_secs_f64() / HALF_LIFE.as_secs_f64())
}

/// The moves the policy wants now: `(demote, promote)`.
pub fn choose(
    policy: &TierPolicy,
    extents: &[ExtentView],
    extent_size: u64,
) -> (Vec<u64>, Vec<u64>) {
    let mut demote: Vec<u64> = Vec::new();
    let mut hot: Vec<&ExtentView> = extents.iter().filter(|e| !e.cold && e.holds_data).collect();
    if let Some(idle_for) = policy.idle_for {
        demote.extend(hot.iter().filter(|e| e.idle >= idle_for).map(|e| e.extent));
    }
    if let Some(budget) = policy.hot_budget {
        hot.retain(|e| !demote.contains(&e.extent));
        let mut used = (hot.len() as u64).saturating_mul(extent_size);
        hot.sort_by(|a, b| {
            a.heat
                .partial_cmp(&b.heat)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(b.idle.cmp(&a.idle))
        });
        for e in hot {
            if used <= budget {
                break;
            }
            demote.push(e.extent);
            used = used.saturating_sub(extent_size);
        }
    }
    let promote = match policy.promote_after {
        Some(n) => extents
            .iter()
            .filter(|e| e.cold && e.cold_reads >= n)
            .map(|e| e.extent)
            .collect(),
        None => Vec::new(),
    };
    (demote, promote)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;

    fn view(extent: u64, heat: f64, idle_s: u64) -> ExtentView {
        ExtentView {
            extent,
            cold: false,
            holds_data: true,
            heat,
            idle: Duration::from_secs(idle_s),
            cold_reads: 0,
        }
    }

    #[test]
    fn heat_halves_every_half_life() {
        assert!((decay(8.0, HALF_LIFE) - 4.0).abs() < 1e-9);
        assert!((decay(8.0, HALF_LIFE * 3) - 1.0).abs() < 1e-9);
        assert_eq!(decay(5.0, Duration::ZERO), 5.0);
    }

    #[test]
    fn the_budget_demotes_the_coldest_first() {
        let policy = TierPolicy {
            hot_budget: Some(2 * 100),
            ..TierPolicy::default()
        };
        let extents = [
            view(0, 9.0, 1),
            view(1, 0.5, 50),
            view(2, 3.0, 5),
            view(3, 0.5, 90),
        ];
        let (demote, promote) = choose(&policy, &extents, 100);
        // Two must go: the two with heat 0.5, the longer idle first.
        assert_eq!(demote, vec![3, 1]);
        assert!(promote.is_empty());
    }

    #[test]
    fn idle_extents_go_and_hot_reads_come_back() {
        let policy = TierPolicy {
            idle_for: Some(Duration::from_secs(60)),
            promote_after: Some(3),
            ..TierPolicy::default()
        };
        let mut cold = view(7, 0.0, 0);
        cold.cold = true;
        cold.cold_reads = 3;
        let mut empty = view(8, 0.0, 1000);
        empty.holds_data = false;
        let extents = [view(0, 1.0, 61), view(1, 1.0, 59), cold, empty];
        let (demote, promote) = choose(&policy, &extents, 100);
        assert_eq!(demote, vec![0], "unwritten extents are never moved");
        assert_eq!(promote, vec![7]);
    }

    #[test]
    fn options_parse_and_refuse_nonsense() {
        let mut options =
            OptionList::parse("tier-hot-budget=1G,tier-idle-for=10m,tier-promote-after=4").unwrap();
        let policy = TierPolicy::from_options(&mut options).unwrap();
        assert_eq!(policy.hot_budget, Some(1 << 30));
        assert_eq!(policy.idle_for, Some(Duration::from_secs(600)));
        assert_eq!(policy.promote_after, Some(4));
        assert!(policy.is_active());
        for bad in [
            "tier-idle-for=soon",
            "tier-promote-after=0",
            "tier-hot-budget=lots",
        ] {
            let mut options = OptionList::parse(bad).unwrap();
            assert!(TierPolicy::from_options(&mut options).is_err(), "{bad}");
        }
    }
}
