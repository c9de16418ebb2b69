//! The I/O engine of a tiered disk: ranges entirely on the hot tier go to the inner engine
//! (io_uring or sync on the hot file, zero-copy, as for a plain disk; the tier store only
//! counts them in flight with atomics); a read touching a cold extent is assembled from both
//! tiers and copied into the guest's buffers; a write or discard touching a cold extent
//! promotes it first. Completions of the slow path are ready at once.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::sync::Arc;

use super::store::{Access, TierStore};
use crate::storage::iov::IovCursor;
use crate::storage::{Completion, Engine, EngineError, IoOp, OpKind};

/// Wraps the hot file's engine for one queue worker.
pub struct TierEngine {
    inner: Box<dyn Engine>,
    store: Arc<TierStore>,
    /// Slow-path completions, ready now.
    ready: VecDeque<Completion>,
    /// Ops in the inner engine: extents to release on completion, indexed by tag (the
    /// worker's tags are small slab indices; a tag too large to index is tracked in `spill`).
    in_flight: Vec<Option<std::ops::Range<u64>>>,
    spill: HashMap<u64, std::ops::Range<u64>>,
    /// Bounce buffer of the cold read path, reused.
    chunk: Vec<u8>,
    /// Tier work done for guest requests since [`Engine::take_extra_work`] last ran.
    work: crate::storage::ExtraWork,
    /// A guest repeating a failing request must not flood the log.
    failure_log: crate::log_limit::LogLimiter,
}

/// Largest piece of a cold read assembled at once (small in unit tests, to exercise pieces).
const COPY_CHUNK: usize = if cfg!(test) { 4096 } else { 1 << 20 };

impl TierEngine {
    /// An engine over `store`, passing hot I/O to `inner`.
    pub fn new(inner: Box<dyn Engine>, store: Arc<TierStore>) -> Self {
        Self {
            inner,
            store,
            ready: VecDeque::new(),
            in_flight: Vec::new(),
            spill: HashMap::new(),
            chunk: Vec::new(),
            work: crate::storage::ExtraWork::default(),
            failure_log: crate::log_limit::LogLimiter::default(),
        }
    }

    /// Remembers the extents of an op handed to the inner engine.
    fn track(&mut self, tag: u64, extents: std::ops::Range<u64>) {
        match usize::try_from(tag).ok().filter(|&i| i < 1 << 16) {
            Some(i) => {
                if self.in_flight.len() <= i {
                    self.in_flight.resize(i.saturating_add(1), None);
                }
                if let Some(slot) = self.in_flight.get_mut(i) {
                    *slot = Some(extents);
                }
            }
            None => {
                self.spill.insert(tag, extents);
            }
        }
    }

    /// Releases the extents of the inner engine's completions `out[start..]`, then appends
    /// the slow path's completions.
    fn finish(&mut self, out: &mut Vec<Completion>, start: usize) {
        for completion in out.get(start..).unwrap_or_default() {
            let tracked = usize::try_from(completion.tag)
                .ok()
                .and_then(|i| self.in_flight.get_mut(i))
                .and_then(Option::take)
                .or_else(|| self.spill.remove(&completion.tag));
            if let Some(extents) = tracked {
                self.store.end_io(extents);
            }
        }
        out.extend(self.ready.drain(..));
    }

    /// Reads `offset..offset+len` from both tiers into `iovecs`, piece by piece.
    ///
    /// # Safety
    /// `iovecs` must be valid for writes of their lengths and not accessed by anyone else
    /// (the guarantee `push`'s caller gives for a read).
    unsafe fn read_in_pieces(
        &mut self,
        offset: u64,
        len: u64,
        iovecs: crate::storage::GuestIovecs,
    ) -> Result<(), super::store::TierError> {
        let mut cursor = IovCursor::new(iovecs);
        let mut done = 0u64;
        while done < len {
            let piece = (len.saturating_sub(done)).min(COPY_CHUNK as u64) as usize;
            self.chunk.resize(piece, 0);
            let work = self
                .store
                .read(offset.saturating_add(done), &mut self.chunk)?;
            self.work.read = self.work.read.saturating_add(work);
            // SAFETY: per this function's contract; `chunk` is our own memory.
            let copied = unsafe { cursor.copy_in(&self.chunk) };
            if copied != piece {
                return Err(super::store::TierError::Io {
                    action: "copy into guest buffers",
                    source: std::io::Error::from_raw_os_error(libc::EIO),
                });
            }
            done = done.saturating_add(piece as u64);
        }
        Ok(())
    }

    fn fail(&mut self, tag: u64, error: &super::store::TierError) {
        if let Some(suppressed) = self.failure_log.allow() {
            log::warn!("tier: {error} ({suppressed} similar errors not logged)");
        }
        self.ready.push_back(Completion {
            tag,
            result: Err(libc::EIO),
        });
    }
}

impl Engine for TierEngine {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    unsafe fn push(&mut self, op: IoOp) {
        let len: u64 = op.iovecs.iter().map(|i| i.iov_len as u64).sum();
        let (offset, len, access) = match op.kind {
            OpKind::Read { offset } => (offset, len, Access::Read),
            OpKind::Write { offset } => (offset, len, Access::Write),
            OpKind::Discard { offset, len } | OpKind::WriteZeroes { offset, len, .. } => {
                (offset, len, Access::Zero)
            }
            OpKind::Flush => {
                if self.store.hot_sync_failed() {
                    // A writeback error the tier's own sync consumed: it belongs to the guest.
                    self.ready.push_back(Completion {
                        tag: op.tag,
                        result: Err(libc::EIO),
                    });
                    return;
                }
                // SAFETY: forwarded unchanged; the caller's guarantee carries over.
                unsafe { self.inner.push(op) };
                return;
            }
        };
        let (extents, hot) = match self.store.begin_io(offset, len, access) {
            Ok(begun) => {
                self.work.write = self.work.write.saturating_add(begun.work);
                (begun.extents, begun.hot)
            }
            Err(e) => {
                self.fail(op.tag, &e);
                return;
            }
        };
        if hot {
            self.track(op.tag, extents);
            // SAFETY: forwarded unchanged; the caller's guarantee carries over.
            unsafe { self.inner.push(op) };
            return;
        }
        // A read touching the cold tier: assembled here in pieces of at most COPY_CHUNK (one
        // reused buffer, so a guest's large request costs no large allocation), each copied
        // on into the guest's buffers.
        // SAFETY: read iovecs are writable and exclusive until reaped (the caller's guarantee).
        let result = unsafe { self.read_in_pieces(offset, len, op.iovecs) };
        self.store.end_io(extents);
        match result {
            Ok(()) => self.ready.push_back(Completion {
                tag: op.tag,
                result: Ok(()),
            }),
            Err(e) => self.fail(op.tag, &e),
        }
    }

    fn submit(&mut self) -> Result<(), EngineError> {
        self.inner.submit()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.inner.completion_fd()
    }

    fn acknowledge_notification(&mut self) {
        self.inner.acknowledge_notification();
    }

    fn completions_pending(&mut self) -> bool {
        !self.ready.is_empty() || self.inner.completions_pending()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let start = out.len();
        self.inner.reap(out);
        self.finish(out, start);
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight().saturating_add(self.ready.len())
    }

    fn take_extra_work(&mut self) -> crate::storage::ExtraWork {
        std::mem::take(&mut self.work)
    }

    fn drain(&mut self, out: &mut Vec<Completion>) {
        let start = out.len();
        self.inner.drain(out);
        self.finish(out, start);
    }
}
