//! A tiered disk's storage: extents live in the hot file (at their own offset, so hot I/O is
//! a plain disk's zero-copy I/O) or as zstd records in the cold file, with the extent map kept
//! in the journal ([`super::journal`]). Moves and the start-up check live here; the I/O path
//! uses [`TierStore::plan_read`], [`TierStore::begin_write`] and friends through
//! [`super::engine::TierEngine`].
//!
//! Rules (each a crash-safety argument):
//! - **Demote** (hot → cold): with no write in flight, note the extent's generation; read and
//!   compress the extent *outside* the lock (never on a guest's I/O path); append the record to
//!   the cold file and `fdatasync` it; then, under the lock, and only if the generation is
//!   unchanged (no guest write raced the move) journal `cold` (`fdatasync`), update the map and
//!   punch the hot copy. A crash before the journal entry leaves the hot copy authoritative
//!   (the record is unreferenced space, reclaimed at start); after it, the record is.
//! - **Promote** (cold → hot), under the lock: decode the record, write it to the hot file,
//!   `fdatasync`, journal `hot`, update the map, then free the record's space. A crash before
//!   the journal entry leaves the record authoritative.
//! - Every guest **read or write** counts as in flight on its extents until it completes, and a
//!   write also bumps their generation, both with lock-free atomics (the hot path takes no
//!   lock). A demotion commits by setting the extent's `cold` flag and *then* checking that
//!   nothing is in flight and the generation is unchanged (sequentially consistent on both
//!   sides): either the I/O sees `cold` and takes the slow path (which waits for the commit
//!   under the lock), or the demotion sees the I/O and aborts. A write to a cold extent
//!   promotes it first; a read of one decompresses it.
//! - **Start-up**: replay the journal; punch the hot copy of every cold extent (a crash between
//!   journal and punch); punch every byte range of the cold file no record references (space a
//!   crash leaked). A dirty shutdown is logged; the check runs either way.

// Data read from disk is as untrusted as a guest's: no indexing or arithmetic that can panic.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use super::cold::ColdTier;
use super::journal::{ColdLocation, Entry, Journal, JournalError};
use super::policy::TierPolicy;
use super::record::{self, RecordError};
use crate::lock::lock;
use crate::storage::sync::{fallocate, PUNCH_HOLE};

/// Decompressed cold extents kept for reads (per disk).
const CACHE_EXTENTS: usize = 8;
/// Journal entries after which the journal is compacted.
const COMPACT_AFTER: u64 = 4096;

/// Errors of the tier store.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// The metadata journal failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A file operation failed.
    #[error("{action}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The store is handed over to the other side of a live migration (no journal here).
    #[error("the tiered disk is not active here (a live migration's other side owns it)")]
    Inactive,
    /// A cold record is corrupt: that read fails, nothing else.
    #[error("extent {extent}: {source}")]
    Record {
        /// The extent.
        extent: u64,
        /// What is wrong.
        #[source]
        source: RecordError,
    },
}

/// Test-only crash injection: in a build with the `test-hooks` feature, when the environment
/// variable `NOVACRON_FAILPOINT` names this point, the process aborts here (as a kill -9
/// would stop it); when it says `NAME@PATH`, the point instead waits here until it can read
/// `PATH` to its end (a FIFO the test opens and closes: a gate). Release builds without the
/// feature never read the variable.
pub(super) fn failpoint(name: &str) {
    static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let point = POINT.get_or_init(|| {
        cfg!(feature = "test-hooks")
            .then(|| std::env::var("NOVACRON_FAILPOINT").ok())
            .flatten()
    });
    if let Some((point, gate)) = point.as_deref().and_then(|p| p.split_once('@')) {
        if point == name {
            log::info!("failpoint {name}: waiting at {gate}");
            let _ = std::fs::read(gate);
        }
        return;
    }
    if point.as_deref() == Some(name) {
        log::error!("failpoint {name}: aborting");
        std::process::abort();
    }
}

pub(super) fn io(action: &'static str) -> impl FnOnce(std::io::Error) -> TierError {
    move |source| TierError::Io { action, source }
}

fn errno(action: &'static str) -> impl FnOnce(i32) -> TierError {
    move |e| TierError::Io {
        action,
        source: std::io::Error::from_raw_os_error(e),
    }
}

/// Outcome of one move attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// Done.
    Done,
    /// Nothing to do (already there, or an unwritten extent).
    Skipped,
    /// A guest write raced it (or one was in flight): nothing changed, try again later.
    Raced,
}

/// The latest requested move batch, for `tier.status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Progress {
    /// `demote` or `promote`.
    pub operation: String,
    /// Extents in the batch.
    pub total: u64,
    /// Extents handled so far (moved, skipped, raced or failed).
    pub handled: u64,
    /// Moved.
    pub moved: u64,
    /// Nothing to do.
    pub skipped: u64,
    /// A guest write raced the move (left where it was).
    pub raced: u64,
    /// Failed (I/O error, cold tier full, corrupt record).
    pub failed: u64,
    /// Whether the batch is still running.
    pub running: bool,
}

/// Counters of a tiered disk.
#[derive(Debug, Default)]
pub struct TierStats {
    /// Demotions done.
    pub demoted: AtomicU64,
    /// Promotions done (manual, policy or by a write).
    pub promoted: AtomicU64,
    /// Moves that failed (I/O error, cold tier full) or raced a write.
    pub failed: AtomicU64,
    /// Reads served from the cold tier.
    pub cold_reads: AtomicU64,
    /// Cold records found corrupt.
    pub corrupt: AtomicU64,
    /// Uncompressed bytes demoted.
    pub raw_bytes: AtomicU64,
    /// Compressed bytes written to the cold tier.
    pub compressed_bytes: AtomicU64,
}

/// Guest I/O started by [`TierStore::begin_io`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begun {
    /// The extents it touches (for [`TierStore::end_io`]).
    pub extents: std::ops::Range<u64>,
    /// Whether the hot file can serve it as it is.
    pub hot: bool,
    /// Bytes of tier work it caused (extents promoted before a write), which the queue
    /// worker charges to the device's QoS byte limits: a 512-byte write into a cold extent
    /// costs what it makes the host do.
    pub work: u64,
}

/// What the I/O path reads and writes per extent without the lock.
#[derive(Debug, Default)]
pub(super) struct ExtentFlags {
    /// On the cold tier (the map, under the lock, says where).
    pub(super) cold: AtomicBool,
    /// Guest reads and writes started and not completed.
    pub(super) in_flight: AtomicU32,
    /// Bumped by every guest write.
    pub(super) generation: AtomicU64,
    /// Last access, in the store's clock (nanoseconds).
    pub(super) last_access: AtomicU64,
    /// Accesses since the policy last looked.
    pub(super) accesses: AtomicU32,
    /// Reads since the extent was demoted.
    pub(super) cold_reads: AtomicU32,
    /// Whether it may hold data (unwritten extents cost nothing and never move).
    pub(super) holds_data: AtomicBool,
}

/// How a range is accessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A read.
    Read,
    /// A write.
    Write,
    /// A discard or write-zeroes (a cold extent it covers entirely needs no promotion).
    Zero,
}

pub(super) struct State {
    pub(super) cold: BTreeMap<u64, ColdLocation>,
    /// `None` while the store is inactive (`TierStore::deactivate`): nothing can be journalled.
    pub(super) journal: Option<Journal>,
    pub(super) cold_end: u64,
    pub(super) cache: VecDeque<(u64, u64, Arc<Vec<u8>>)>,
    /// Access heat (decays, see `policy`), as of `heat_at`.
    pub(super) heat: Vec<f64>,
    pub(super) heat_at: u64,
}

/// A tiered disk's hot and cold files and extent map.
pub struct TierStore {
    pub(super) hot: Arc<File>,
    pub(super) cold: ColdTier,
    pub(super) extent_size: u64,
    pub(super) extents: u64,
    pub(super) capacity: u64,
    pub(super) level: i32,
    pub(super) state: Mutex<State>,
    pub(super) flags: Vec<ExtentFlags>,
    /// Counters.
    pub stats: TierStats,
    pub(super) progress: Mutex<Progress>,
    pub(super) policy: Mutex<TierPolicy>,
    /// The journal's path, to replay it again when a live migration hands the disk back.
    pub(super) journal_path: PathBuf,
    /// Whether this process owns the tier (false between a migration's switchover and the
    /// image coming back). Moves hold it shared for their whole run; handing over takes it
    /// exclusively, so no move is half done on either side.
    pub(super) active: RwLock<bool>,
    /// Set when an `fdatasync` of the hot file failed here (a promotion's): the kernel
    /// reports a writeback error once per open file, and the guest's writes share this file,
    /// so the guest's next FLUSH must fail in its place (see [`TierStore::hot_sync_failed`]).
    pub(super) hot_sync_failed: AtomicBool,
}

/// The journal of an active store.
fn journal(state: &mut State) -> Result<&mut Journal, TierError> {
    state.journal.as_mut().ok_or(TierError::Inactive)
}

/// Where the journal of a tiered disk lives: next to its hot file, or next to its cold file
/// when the hot tier is a block device (a file beside `/dev/sdb` would land on devtmpfs and be
/// gone after a reboot, and with it the map of every cold extent).
pub fn journal_path(hot: &Path, cold: &Path) -> PathBuf {
    let hot_is_file = std::fs::metadata(hot).map_or(true, |m| m.is_file());
    let mut name = if hot_is_file { hot } else { cold }
        .as_os_str()
        .to_os_string();
    name.push(".tiermap");
    PathBuf::from(name)
}

impl TierStore {
    /// Opens a tiered disk over `hot` (sized to `capacity`) and `cold`, replaying the journal
    /// at `journal` (see [`journal_path`]) and running the start-up check.
    pub fn open(
        hot: Arc<File>,
        journal: &Path,
        cold: impl Into<ColdTier>,
        capacity: u64,
        extent_size: u64,
        level: i32,
    ) -> Result<Self, TierError> {
        let store = Self::open_inactive(hot, journal, cold, capacity, extent_size, level);
        // At start-up only: wait out a RADOS lock a crashed daemon elsewhere left.
        let wait = std::time::Duration::from_secs(
            crate::storage::rbd::objects::LOCK_SECONDS
                .unsigned_abs()
                .saturating_add(5),
        );
        store.activate_within(wait)?;
        Ok(store)
    }

    /// The start-up check: hot copies of cold extents released, unreferenced cold space freed.
    pub(super) fn check(&self) -> Result<(), TierError> {
        let state = lock(&self.state);
        for &extent in state.cold.keys() {
            self.punch_hot(extent)?;
        }
        let mut used: Vec<(u64, u64)> = state
            .cold
            .values()
            .map(|l| (l.offset, l.offset.saturating_add(u64::from(l.len))))
            .collect();
        used.sort_unstable();
        self.cold
            .free_unused(&used, state.cold_end)
            .map_err(io("cannot free cold space"))?;
        Ok(())
    }

    /// Notes which hot extents are holes (never written): one `SEEK_DATA` per extent, once.
    pub(super) fn find_holes(&self) {
        let state = lock(&self.state);
        for extent in 0..self.extents {
            let start = extent.saturating_mul(self.extent_size);
            let Ok(start_off) = i64::try_from(start) else {
                continue;
            };
            // SAFETY: lseek only reads the fd number and plain integers.
            let data = unsafe { libc::lseek(self.hot.as_raw_fd(), start_off, libc::SEEK_DATA) };
            let next_data = u64::try_from(data).unwrap_or(u64::MAX);
            let has_data = next_data < start.saturating_add(self.extent_len(extent))
                || state.cold.contains_key(&extent);
            if let Some(flags) = self.flag(extent) {
                flags.holds_data.store(has_data, Ordering::Relaxed);
            }
        }
    }

    fn flag(&self, extent: u64) -> Option<&ExtentFlags> {
        self.flags.get(usize::try_from(extent).ok()?)
    }

    /// Folds the access counters the I/O path bumped into heat and last-access times (called
    /// once a second by the policy thread and before any idle-based choice). Returns now.
    pub fn refresh_access(&self) -> u64 {
        let now = crate::sys::clock::now_ns();
        let mut state = lock(&self.state);
        let elapsed = std::time::Duration::from_nanos(now.saturating_sub(state.heat_at));
        state.heat_at = now;
        for (flags, heat) in self.flags.iter().zip(state.heat.iter_mut()) {
            let accesses = flags.accesses.swap(0, Ordering::Relaxed);
            *heat = super::policy::decay(*heat, elapsed) + f64::from(accesses);
            if accesses > 0 {
                flags.last_access.store(now, Ordering::Relaxed);
            }
        }
        now
    }

    /// Extent size in bytes.
    pub fn extent_size(&self) -> u64 {
        self.extent_size
    }

    /// Number of extents.
    pub fn extents(&self) -> u64 {
        self.extents
    }

    /// Extents overlapping `offset..offset+len`.
    fn span(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let first = offset.checked_div(self.extent_size).unwrap_or(0);
        let end = offset
            .saturating_add(len.max(1))
            .saturating_sub(1)
            .checked_div(self.extent_size)
            .unwrap_or(0);
        first..end.saturating_add(1).min(self.extents)
    }

    fn extent_len(&self, extent: u64) -> u64 {
        let start = extent.saturating_mul(self.extent_size);
        self.capacity.saturating_sub(start).min(self.extent_size)
    }

    /// Starts guest I/O on `offset..offset+len`: counts it in flight on every extent it
    /// touches (and, for writes, bumps their generations). Returns the extents (for
    /// [`TierStore::end_io`]), whether the hot file can serve it as it is, and the tier work
    /// it caused. A write or
    /// partial zeroing of a cold extent promotes it first (a whole-extent zeroing drops its
    /// record), so writes are always served by the hot file; a read of a cold extent must go
    /// through [`TierStore::read`]. On error nothing stays counted.
    pub fn begin_io(&self, offset: u64, len: u64, access: Access) -> Result<Begun, TierError> {
        let span = self.span(offset, len);
        let writes = access != Access::Read;
        for extent in span.clone() {
            if let Some(flags) = self.flag(extent) {
                flags.in_flight.fetch_add(1, Ordering::SeqCst);
                if writes {
                    flags.generation.fetch_add(1, Ordering::SeqCst);
                    flags.holds_data.store(true, Ordering::Relaxed);
                }
                // Only a counter here (no clock read on the I/O path): the policy's once-a-second
                // refresh turns counts into heat and last-access times.
                flags.accesses.fetch_add(1, Ordering::Relaxed);
            }
        }
        let cold = |e: u64| self.flag(e).is_some_and(|f| f.cold.load(Ordering::SeqCst));
        if !span.clone().any(cold) {
            return Ok(Begun {
                extents: span,
                hot: true,
                work: 0,
            });
        }
        if access == Access::Read {
            for extent in span.clone().filter(|&e| cold(e)) {
                if let Some(flags) = self.flag(extent) {
                    flags.cold_reads.fetch_add(1, Ordering::Relaxed);
                }
            }
            return Ok(Begun {
                extents: span,
                hot: false,
                work: 0,
            });
        }
        let mut work = 0u64;
        let mut state = lock(&self.state);
        for extent in span.clone() {
            if !state.cold.contains_key(&extent) {
                continue;
            }
            let start = extent.saturating_mul(self.extent_size);
            let covered = access == Access::Zero
                && offset <= start
                && offset.saturating_add(len) >= start.saturating_add(self.extent_len(extent));
            let done = if covered {
                self.drop_cold(&mut state, extent)
            } else {
                self.promote_locked(&mut state, extent).inspect(|()| {
                    work = work.saturating_add(self.extent_len(extent));
                })
            };
            if let Err(e) = done {
                drop(state);
                self.end_io(span);
                return Err(e);
            }
        }
        Ok(Begun {
            extents: span,
            hot: true,
            work,
        })
    }

    /// Whether a sync of the hot file failed inside the tier (the writeback error it consumed
    /// may have been a guest write's): every later guest FLUSH must fail.
    pub fn hot_sync_failed(&self) -> bool {
        self.hot_sync_failed.load(Ordering::Acquire)
    }

    /// Guest I/O started with [`TierStore::begin_io`] completed.
    pub fn end_io(&self, extents: std::ops::Range<u64>) {
        for extent in extents {
            if let Some(flags) = self.flag(extent) {
                flags.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Reads `offset..offset+len` into `out` from whichever tier holds each extent (the slow
    /// path for ranges touching cold extents). Returns the bytes of cold records it had to
    /// decompress (cache misses), the tier work charged to the guest.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<u64, TierError> {
        let mut work = 0u64;
        let mut done = 0usize;
        while done < out.len() {
            let at = offset.saturating_add(done as u64);
            let extent = at.checked_div(self.extent_size).unwrap_or(0);
            let within = at.checked_rem(self.extent_size).unwrap_or(0);
            let chunk = (self.extent_size.saturating_sub(within) as usize)
                .min(out.len().saturating_sub(done));
            let dst = out
                .get_mut(done..done.saturating_add(chunk))
                .ok_or_else(|| io("read range")(std::io::ErrorKind::InvalidInput.into()))?;
            match self.cold_extent(extent, &mut work)? {
                Some(data) => {
                    let src = data
                        .get(within as usize..(within as usize).saturating_add(chunk))
                        .ok_or(TierError::Record {
                            extent,
                            source: RecordError::Truncated,
                        })?;
                    dst.copy_from_slice(src);
                    self.stats.cold_reads.fetch_add(1, Ordering::Relaxed);
                }
                None => self
                    .hot
                    .read_exact_at(dst, at)
                    .map_err(io("cannot read the hot tier"))?,
            }
            done = done.saturating_add(chunk);
        }
        Ok(work)
    }

    /// The decompressed contents of `extent` if it is cold (from the cache when possible).
    /// `work` grows by the bytes decompressed on a cache miss.
    fn cold_extent(&self, extent: u64, work: &mut u64) -> Result<Option<Arc<Vec<u8>>>, TierError> {
        let mut state = lock(&self.state);
        let Some(location) = state.cold.get(&extent).copied() else {
            return Ok(None);
        };
        if let Some((_, _, data)) = state
            .cache
            .iter()
            .find(|(e, g, _)| *e == extent && *g == location.generation)
        {
            return Ok(Some(Arc::clone(data)));
        }
        let data = Arc::new(self.load_record(extent, location)?);
        *work = work.saturating_add(data.len() as u64);
        if state.cache.len() >= CACHE_EXTENTS {
            state.cache.pop_front();
        }
        state
            .cache
            .push_back((extent, location.generation, Arc::clone(&data)));
        Ok(Some(data))
    }

    fn load_record(&self, extent: u64, location: ColdLocation) -> Result<Vec<u8>, TierError> {
        let max_raw = u32::try_from(self.extent_len(extent)).unwrap_or(u32::MAX);
        let max_len = (record::HEADER_LEN as u64)
            .saturating_add(u64::from(record::max_compressed_len(max_raw)));
        if u64::from(location.len) > max_len {
            self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
            return Err(TierError::Record {
                extent,
                source: RecordError::BadLength(u64::from(location.len)),
            });
        }
        let mut bytes = vec![0u8; location.len as usize];
        if let Err(e) = self.cold.read_exact_at(&mut bytes, location.offset) {
            if e.kind() != std::io::ErrorKind::UnexpectedEof {
                return Err(io("cannot read the cold tier")(e));
            }
            // The record runs past the end of the cold file: truncated.
            self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
            return Err(TierError::Record {
                extent,
                source: RecordError::Truncated,
            });
        }
        let mut out = Vec::new();
        record::decode_into(&bytes, extent, location.generation, max_raw, &mut out).map_err(
            |source| {
                self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                log::error!("tier: extent {extent}: corrupt cold record: {source}");
                TierError::Record { extent, source }
            },
        )?;
        // A short last extent's record holds exactly its bytes.
        Ok(out)
    }

    /// Moves `extent` to the cold tier.
    pub fn demote(&self, extent: u64) -> Result<Moved, TierError> {
        let active = self.active.read().unwrap_or_else(PoisonError::into_inner);
        if !*active || self.cold.lost() {
            return Err(TierError::Inactive);
        }
        let len = self.extent_len(extent);
        let Some(flags) = self.flag(extent) else {
            return Ok(Moved::Skipped);
        };
        if flags.cold.load(Ordering::SeqCst) || len == 0 {
            return Ok(Moved::Skipped);
        }
        // The generation first, then nothing in flight: any write not finished by now will
        // change the generation before it touches the data.
        let generation = flags.generation.load(Ordering::SeqCst);
        if flags.in_flight.load(Ordering::SeqCst) > 0 {
            return Ok(Moved::Raced);
        }
        let start = extent.saturating_mul(self.extent_size);
        let mut data = vec![0u8; len as usize];
        self.hot
            .read_exact_at(&mut data, start)
            .map_err(io("cannot read the hot tier"))?;
        if data.iter().all(|&b| b == 0) {
            // Nothing written (or all zeros): it already takes no space on the cold tier.
            return Ok(Moved::Skipped);
        }
        let bytes = record::encode(extent, generation, &data, self.level)
            .map_err(|source| TierError::Record { extent, source })?;
        let record_len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        let offset = {
            let mut state = lock(&self.state);
            let offset = state.cold_end;
            state.cold_end = offset.saturating_add(bytes.len() as u64);
            offset
        };
        let written = self.cold.write_record(&bytes, offset);
        if let Err(e) = written {
            // Cold tier full or failing: the hot copy stays, the guest notices nothing.
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            let _ = self.punch_cold(offset, u64::from(record_len));
            return Err(io("cannot write the cold tier")(e));
        }
        failpoint("demote-after-record");
        let mut state = lock(&self.state);
        // Commit point: flag the extent cold, then look for I/O that started meanwhile (it
        // either saw the flag and waits for this lock, or is seen here and wins).
        flags.cold.store(true, Ordering::SeqCst);
        let raced = flags.in_flight.load(Ordering::SeqCst) > 0
            || flags.generation.load(Ordering::SeqCst) != generation;
        if raced {
            flags.cold.store(false, Ordering::SeqCst);
            drop(state);
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            let _ = self.punch_cold(offset, u64::from(record_len));
            return Ok(Moved::Raced);
        }
        let location = ColdLocation {
            offset,
            len: record_len,
            generation,
        };
        if let Err(e) = journal(&mut state)?.append(&[Entry::Cold { extent, location }]) {
            flags.cold.store(false, Ordering::SeqCst);
            drop(state);
            let _ = self.punch_cold(offset, u64::from(record_len));
            return Err(e.into());
        }
        state.cold.insert(extent, location);
        flags.cold_reads.store(0, Ordering::Relaxed);
        failpoint("demote-after-journal");
        self.punch_hot(extent)?;
        self.maybe_compact(&mut state)?;
        self.stats.demoted.fetch_add(1, Ordering::Relaxed);
        self.stats.raw_bytes.fetch_add(len, Ordering::Relaxed);
        self.stats
            .compressed_bytes
            .fetch_add(u64::from(record_len), Ordering::Relaxed);
        Ok(Moved::Done)
    }

    /// Moves `extent` back to the hot tier.
    pub fn promote(&self, extent: u64) -> Result<Moved, TierError> {
        let active = self.active.read().unwrap_or_else(PoisonError::into_inner);
        if !*active || self.cold.lost() {
            return Err(TierError::Inactive);
        }
        let mut state = lock(&self.state);
        if !state.cold.contains_key(&extent) {
            return Ok(Moved::Skipped);
        }
        self.promote_locked(&mut state, extent)?;
        Ok(Moved::Done)
    }

    fn promote_locked(&self, state: &mut State, extent: u64) -> Result<(), TierError> {
        let Some(location) = state.cold.get(&extent).copied() else {
            return Ok(());
        };
        let data = match state
            .cache
            .iter()
            .find(|(e, g, _)| *e == extent && *g == location.generation)
        {
            Some((_, _, data)) => Arc::clone(data),
            None => Arc::new(self.load_record(extent, location)?),
        };
        let start = extent.saturating_mul(self.extent_size);
        self.hot
            .write_all_at(&data, start)
            .map_err(io("cannot write the hot tier"))?;
        if let Err(e) = self.hot.sync_data() {
            // The error may have been the guest's (its writes share the file): keep it.
            self.hot_sync_failed.store(true, Ordering::Release);
            return Err(io("cannot sync the hot tier")(e));
        }
        failpoint("promote-after-hot");
        journal(state)?.append(&[Entry::Hot { extent }])?;
        state.cold.remove(&extent);
        if let Some(flags) = self.flag(extent) {
            flags.cold.store(false, Ordering::SeqCst);
        }
        state.cache.retain(|(e, _, _)| *e != extent);
        failpoint("promote-after-journal");
        // The move is committed (journalled): a record that cannot be freed now is only
        // leaked space, which the next start-up sweep frees; not the guest's failure.
        if let Err(e) = self.punch_cold(location.offset, u64::from(location.len)) {
            log::warn!("tier: extent {extent}: {e} (freed at the next start)");
        }
        self.maybe_compact(state)?;
        self.stats.promoted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A cold extent that is being zeroed or discarded entirely: no promotion needed.
    fn drop_cold(&self, state: &mut State, extent: u64) -> Result<(), TierError> {
        let Some(location) = state.cold.get(&extent).copied() else {
            return Ok(());
        };
        journal(state)?.append(&[Entry::Hot { extent }])?;
        state.cold.remove(&extent);
        if let Some(flags) = self.flag(extent) {
            flags.cold.store(false, Ordering::SeqCst);
        }
        state.cache.retain(|(e, _, _)| *e != extent);
        if let Err(e) = self.punch_cold(location.offset, u64::from(location.len)) {
            log::warn!("tier: extent {extent}: {e} (freed at the next start)");
        }
        Ok(())
    }

    fn maybe_compact(&self, state: &mut State) -> Result<(), TierError> {
        if state
            .journal
            .as_ref()
            .is_some_and(|j| j.len() > COMPACT_AFTER)
        {
            let cold = state.cold.clone();
            journal(state)?.compact(self.extent_size, self.extents, &cold)?;
        }
        Ok(())
    }

    fn punch_hot(&self, extent: u64) -> Result<(), TierError> {
        let start = extent.saturating_mul(self.extent_size);
        fallocate(
            self.hot.as_raw_fd(),
            PUNCH_HOLE,
            start,
            self.extent_len(extent),
        )
        .map_err(errno("cannot release a hot extent"))
    }

    fn punch_cold(&self, offset: u64, len: u64) -> Result<(), TierError> {
        if len == 0 {
            return Ok(());
        }
        self.cold
            .free(offset, len)
            .map_err(io("cannot free cold space"))
    }

    /// Extents idle (not read or written) for at least `idle_ns`, hot and holding data first.
    pub fn idle_extents(&self, idle_ns: u64) -> Vec<u64> {
        let now = self.refresh_access();
        self.flags
            .iter()
            .enumerate()
            .filter(|(_, f)| !f.cold.load(Ordering::SeqCst))
            .filter(|(_, f)| now.saturating_sub(f.last_access.load(Ordering::Relaxed)) >= idle_ns)
            .map(|(e, _)| e as u64)
            .collect()
    }

    /// Bytes the hot file occupies on disk.
    pub fn hot_allocated(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.hot
            .metadata()
            .map(|m| m.blocks().saturating_mul(512))
            .unwrap_or(0)
    }

    /// Cold extents, in order.
    pub fn cold_extents(&self) -> Vec<u64> {
        lock(&self.state).cold.keys().copied().collect()
    }

    /// Marks the metadata clean (orderly shutdown).
    pub fn close(&self) -> Result<(), TierError> {
        // An inactive store's journal belongs to the other side of a migration: not ours to
        // mark clean.
        if let Some(journal) = lock(&self.state).journal.as_mut() {
            journal.append(&[Entry::Clean])?;
            // Ours to let go (a RADOS lock would otherwise outlive us by its duration).
            self.cold.unlock();
        }
        Ok(())
    }

    /// `(cold extents, compressed bytes on the cold tier)`.
    pub fn cold_usage(&self) -> (u64, u64) {
        let state = lock(&self.state);
        (
            state.cold.len() as u64,
            state.cold.values().map(|l| u64::from(l.len)).sum(),
        )
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
#[path = "store_tests.rs"]
mod tests;
