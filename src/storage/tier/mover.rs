//! Running moves on a tiered disk: batches requested through the control socket (with
//! progress for `tier.status`) and the automatic policy's once-a-second check.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::policy::{ExtentView, TierPolicy};
use super::store::{Moved, Progress, TierStore};
use crate::lock::lock;

/// Errors starting a background batch.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// Another batch is still running on this disk.
    #[error("a {0} batch is still running")]
    Busy(String),
    /// The batch's thread could not start.
    #[error("cannot start the batch thread")]
    Thread(#[source] std::io::Error),
}

impl TierStore {
    /// Claims the disk's one batch slot: a second batch is refused while one runs.
    fn claim_batch(&self) -> Result<(), BatchError> {
        let mut progress = lock(&self.progress);
        if progress.running {
            return Err(BatchError::Busy(progress.operation.clone()));
        }
        progress.running = true;
        Ok(())
    }

    /// Runs a batch in the background (one thread per disk at most: a second batch is refused
    /// while one runs); progress shows in [`TierStore::progress`], and `done` gets the final
    /// tally on the batch's thread.
    pub fn start_batch(
        self: &Arc<Self>,
        extents: Vec<u64>,
        down: bool,
        done: impl FnOnce(Progress) + Send + 'static,
    ) -> Result<(), BatchError> {
        self.claim_batch()?;
        let store = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("tier-batch".into())
            .spawn(move || done(store.run_batch(&extents, down)));
        if let Err(e) = spawned {
            lock(&self.progress).running = false;
            return Err(BatchError::Thread(e));
        }
        Ok(())
    }

    /// Replaces the automatic policy.
    pub fn set_policy(&self, policy: TierPolicy) {
        *lock(&self.policy) = policy;
    }

    /// The automatic policy.
    pub fn policy(&self) -> TierPolicy {
        *lock(&self.policy)
    }

    /// One policy check: decides and runs the moves the policy wants now. Returns
    /// `(demoted, promoted)`.
    pub fn apply_policy(&self) -> (u64, u64) {
        let policy = self.policy();
        if !policy.is_active() {
            self.refresh_access();
            return (0, 0);
        }
        let now = crate::sys::clock::now_ns();
        let views: Vec<ExtentView> = {
            let mut state = lock(&self.state);
            let elapsed = std::time::Duration::from_nanos(now.saturating_sub(state.heat_at));
            state.heat_at = now;
            let mut views = Vec::with_capacity(self.flags.len());
            for (extent, (flags, heat)) in self.flags.iter().zip(state.heat.iter_mut()).enumerate()
            {
                let accesses = f64::from(flags.accesses.swap(0, Ordering::Relaxed));
                *heat = super::policy::decay(*heat, elapsed) + accesses;
                let last = flags.last_access.load(Ordering::Relaxed);
                views.push(ExtentView {
                    extent: extent as u64,
                    cold: flags.cold.load(Ordering::SeqCst),
                    holds_data: flags.holds_data.load(Ordering::Relaxed),
                    heat: *heat,
                    idle: std::time::Duration::from_nanos(now.saturating_sub(last)),
                    cold_reads: flags.cold_reads.load(Ordering::Relaxed),
                });
            }
            views
        };
        let (demote, promote) = super::policy::choose(&policy, &views, self.extent_size);
        let mut moved = (0u64, 0u64);
        for extent in demote {
            if matches!(self.demote(extent), Ok(Moved::Done)) {
                moved.0 = moved.0.saturating_add(1);
            }
        }
        for extent in promote {
            if matches!(self.promote(extent), Ok(Moved::Done)) {
                moved.1 = moved.1.saturating_add(1);
            }
        }
        moved
    }

    /// Moves `extents` one by one (`demote` when `down`), recording progress; returns the
    /// final tally. Errors end nothing: a failed extent is counted and the batch goes on.
    pub fn run_batch(&self, extents: &[u64], down: bool) -> Progress {
        super::store::failpoint("batch-start");
        *lock(&self.progress) = Progress {
            operation: if down { "demote" } else { "promote" }.into(),
            total: extents.len() as u64,
            running: true,
            ..Progress::default()
        };
        for &extent in extents {
            let result = if down {
                self.demote(extent)
            } else {
                self.promote(extent)
            };
            let mut progress = lock(&self.progress);
            progress.handled = progress.handled.saturating_add(1);
            match result {
                Ok(Moved::Done) => progress.moved = progress.moved.saturating_add(1),
                Ok(Moved::Skipped) => progress.skipped = progress.skipped.saturating_add(1),
                Ok(Moved::Raced) => progress.raced = progress.raced.saturating_add(1),
                Err(e) => {
                    log::warn!("tier: extent {extent}: {e}");
                    progress.failed = progress.failed.saturating_add(1);
                }
            }
        }
        let mut progress = lock(&self.progress);
        progress.running = false;
        log::info!(
            "tier: {} of {} extent(s) done: {} moved, {} skipped, {} raced, {} failed",
            progress.operation,
            progress.total,
            progress.moved,
            progress.skipped,
            progress.raced,
            progress.failed
        );
        progress.clone()
    }

    /// The latest batch's progress.
    pub fn progress(&self) -> Progress {
        lock(&self.progress).clone()
    }

    /// How many extents holding data sit in each heat band (hot and cold), after folding in
    /// the latest accesses: bands `0`, `<1`, `<4`, `<16`, `<64`, `>=64` accesses (decayed).
    pub fn heat_histogram(&self) -> Vec<(&'static str, u64, u64)> {
        const BANDS: [(&str, f64); 6] = [
            ("0", 0.0),
            ("<1", 1.0),
            ("<4", 4.0),
            ("<16", 16.0),
            ("<64", 64.0),
            (">=64", f64::INFINITY),
        ];
        self.refresh_access();
        let state = lock(&self.state);
        let mut counts = [(0u64, 0u64); 6];
        for (flags, heat) in self.flags.iter().zip(state.heat.iter()) {
            if !flags.holds_data.load(Ordering::Relaxed) {
                continue;
            }
            let band = BANDS
                .iter()
                .position(|(_, upper)| {
                    if *upper == 0.0 {
                        *heat <= 0.0
                    } else {
                        *heat < *upper
                    }
                })
                .unwrap_or(BANDS.len().saturating_sub(1));
            if let Some((hot, cold)) = counts.get_mut(band) {
                if flags.cold.load(Ordering::SeqCst) {
                    *cold = cold.saturating_add(1);
                } else {
                    *hot = hot.saturating_add(1);
                }
            }
        }
        BANDS
            .iter()
            .zip(counts)
            .map(|((name, _), (hot, cold))| (*name, hot, cold))
            .collect()
    }
}
