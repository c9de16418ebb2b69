//! The I/O engine of a tiered disk: ranges entirely on the hot tier go to the inner engine
//! (io_uring or sync on the hot file, zero-copy, as for a plain disk); a read touching a cold
//! extent is assembled from both tiers and copied into the guest's buffers; a write or discard
//! touching a cold extent promotes it first. Completions of the slow path are ready at once.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::sync::Arc;

use super::store::TierStore;
use crate::storage::iov::IovCursor;
use crate::storage::{Completion, Engine, EngineError, IoOp, OpKind};

/// Wraps the hot file's engine for one queue worker.
pub struct TierEngine {
    inner: Box<dyn Engine>,
    store: Arc<TierStore>,
    /// Slow-path completions, ready now.
    ready: VecDeque<Completion>,
    /// Writes in the inner engine: tag → extents to release on completion.
    writes: HashMap<u64, std::ops::Range<u64>>,
}

impl TierEngine {
    /// An engine over `store`, passing hot I/O to `inner`.
    pub fn new(inner: Box<dyn Engine>, store: Arc<TierStore>) -> Self {
        Self {
            inner,
            store,
            ready: VecDeque::new(),
            writes: HashMap::new(),
        }
    }

    fn finish(&mut self, out: &mut Vec<Completion>) {
        for completion in out.iter() {
            if let Some(extents) = self.writes.remove(&completion.tag) {
                self.store.end_write(extents);
            }
        }
        out.extend(self.ready.drain(..));
    }

    fn fail(&mut self, tag: u64, error: &super::store::TierError) {
        log::warn!("tier: {error}");
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
        let (offset, span_len, zeroing, write) = match op.kind {
            OpKind::Read { offset } => {
                if self.store.is_hot(offset, len) {
                    // SAFETY: forwarded unchanged; the caller's guarantee carries over.
                    unsafe { self.inner.push(op) };
                    return;
                }
                let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
                let tag = op.tag;
                match self.store.read(offset, &mut buf) {
                    Ok(()) => {
                        // SAFETY: read iovecs are writable and exclusive until reaped (the
                        // caller's guarantee), and `buf` is our own memory.
                        let copied = unsafe { IovCursor::new(op.iovecs).copy_in(&buf) };
                        let result = if copied == buf.len() {
                            Ok(())
                        } else {
                            Err(libc::EIO)
                        };
                        self.ready.push_back(Completion { tag, result });
                    }
                    Err(e) => self.fail(tag, &e),
                }
                return;
            }
            OpKind::Write { offset } => (offset, len, false, true),
            OpKind::Discard { offset, len } => (offset, len, true, true),
            OpKind::WriteZeroes { offset, len, .. } => (offset, len, true, true),
            OpKind::Flush => (0, 0, false, false),
        };
        if write {
            match self.store.begin_write(offset, span_len, zeroing) {
                Ok(extents) => {
                    self.writes.insert(op.tag, extents);
                }
                Err(e) => {
                    self.fail(op.tag, &e);
                    return;
                }
            }
        }
        // SAFETY: forwarded unchanged; the caller's guarantee carries over.
        unsafe { self.inner.push(op) };
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
        let mut tail = out.split_off(start);
        self.finish(&mut tail);
        out.extend(tail);
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight().saturating_add(self.ready.len())
    }

    fn drain(&mut self, out: &mut Vec<Completion>) {
        let start = out.len();
        self.inner.drain(out);
        let mut tail = out.split_off(start);
        self.finish(&mut tail);
        out.extend(tail);
    }
}
