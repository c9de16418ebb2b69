//! Handing a tiered disk between the two sides of a live migration: the destination opens it
//! without touching it ([`TierStore::open_inactive`]), the source stops journalling and moving
//! at the switchover ([`TierStore::deactivate`]), and whichever side then owns the image
//! replays the journal as at start-up ([`TierStore::activate`]). The image lock
//! (`storage::image_lock`) decides when.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use super::cold::ColdTier;
use super::journal::Journal;
use super::policy::TierPolicy;
use super::store::{io, ExtentFlags, Progress, State, TierError, TierStats, TierStore};
use crate::lock::lock;

impl TierStore {
    /// A tiered disk that another process serves now (the destination of a live migration,
    /// `incoming=on`): nothing is read, replayed, checked or punched until
    /// [`TierStore::activate`] (the source may be writing all of it meanwhile).
    pub fn open_inactive(
        hot: Arc<File>,
        journal: &Path,
        cold: impl Into<ColdTier>,
        capacity: u64,
        extent_size: u64,
        level: i32,
    ) -> Self {
        let extents = capacity.div_ceil(extent_size.max(1));
        let count = usize::try_from(extents).unwrap_or(0);
        Self {
            hot,
            cold: cold.into(),
            extent_size,
            extents,
            capacity,
            level,
            flags: (0..count).map(|_| ExtentFlags::default()).collect(),
            state: Mutex::new(State {
                cold: BTreeMap::new(),
                journal: None,
                cold_end: 0,
                cache: VecDeque::new(),
                heat: vec![0.0; count],
                heat_at: 0,
            }),
            stats: TierStats::default(),
            hot_sync_failed: AtomicBool::new(false),
            progress: Mutex::new(Progress::default()),
            policy: Mutex::new(TierPolicy::default()),
            journal_path: journal.to_path_buf(),
            active: RwLock::new(false),
        }
    }

    /// Hands the tier over (a live migration's switchover): waits for a move in progress,
    /// then journals nothing more and moves nothing until [`TierStore::activate`]. Every
    /// journal entry so far is already durable (each append is synced).
    pub fn deactivate(&self) {
        let mut active = self.active.write().unwrap_or_else(PoisonError::into_inner);
        *active = false;
        let mut state = lock(&self.state);
        state.journal = None;
        state.cache.clear();
        // The cold tier's lock goes with the image's.
        self.cold.unlock();
    }

    /// Takes the tier at a migration's switchover: replays the journal the other side left,
    /// runs the start-up check, locks the cold tier and moves extents again. It runs on a
    /// queue's path, so it never waits for a lock: a tier still held elsewhere is an error
    /// now, and the next request tries again.
    pub fn activate(&self) -> Result<(), TierError> {
        self.activate_within(std::time::Duration::ZERO)
    }

    /// Like [`TierStore::activate`], waiting up to `wait` for another holder of the cold
    /// tier's lock to let go (at start-up: a RADOS lock a crashed predecessor on another
    /// machine left expires within its duration).
    pub(super) fn activate_within(&self, wait: std::time::Duration) -> Result<(), TierError> {
        let mut active = self.active.write().unwrap_or_else(PoisonError::into_inner);
        match self.cold.lock_within(wait) {
            Ok(true) => {}
            Ok(false) => {
                return Err(io("the cold tier is in use elsewhere")(
                    std::io::Error::from_raw_os_error(libc::EWOULDBLOCK),
                ))
            }
            Err(e) => return Err(io("cannot lock the cold tier")(e)),
        }
        let replayed = self.replay_for_activation();
        if let Err(e) = replayed {
            self.cold.unlock();
            return Err(e);
        }
        *active = true;
        Ok(())
    }

    /// Stops an active tier whose cold tier's lock was lost (its renewal failed: another
    /// daemon may own the tier): no more moves, journal entries or sweeps here. Reads of
    /// cold extents go on; writes into them fail (they need a promotion). Called each second
    /// by the tier's policy thread.
    pub fn fence_if_lost(&self) {
        if self.cold.lost() && self.is_active() {
            log::error!(
                "{}: the cold tier is no longer ours: moves stop",
                self.journal_path.display()
            );
            self.deactivate();
        }
    }

    /// Whether this process owns the tier now.
    pub fn is_active(&self) -> bool {
        *self.active.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replays the journal into the map and runs the start-up check (`activate`'s work).
    fn replay_for_activation(&self) -> Result<(), TierError> {
        let (journal, replayed) =
            Journal::open(&self.journal_path, self.extent_size, self.extents)?;
        if !replayed.clean && replayed.entries > 1 {
            log::warn!(
                "{}: tier metadata not closed cleanly ({} torn bytes dropped): checking",
                self.journal_path.display(),
                replayed.torn_bytes
            );
        }
        // Past every record the tier holds and every record the journal names (one that is
        // missing must not have its place reused: the journal still points there).
        let named_end = replayed
            .cold
            .values()
            .map(|l| l.offset.saturating_add(u64::from(l.len)))
            .max()
            .unwrap_or(0);
        let cold_end = self
            .cold
            .end()
            .map_err(io("cannot stat the cold tier"))?
            .max(named_end);
        {
            let mut state = lock(&self.state);
            for (extent, flags) in self.flags.iter().enumerate() {
                flags.cold.store(
                    replayed.cold.contains_key(&(extent as u64)),
                    Ordering::SeqCst,
                );
            }
            state.cold = replayed.cold;
            state.journal = Some(journal);
            state.cold_end = cold_end;
            state.cache.clear();
        }
        self.check()?;
        self.find_holes();
        Ok(())
    }
}
