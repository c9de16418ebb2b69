//! A test-only engine that models a disk with a volatile write cache, so crash tests can tell
//! a flush that works from one that does nothing.
//!
//! Only in a build with the `test-hooks` cargo feature (the test suite's), and only when the
//! environment variable `NOVACRON_TEST_VOLATILE_CACHE=1` is set; a build without the feature
//! never reads the variable. Not for direct (O_DIRECT) or tiered disks (refused). Writes completed to the guest land in an
//! in-memory cache shared by the device's queues, not in the backing file; reads see them; a
//! FLUSH writes the cache to the file and `fdatasync`s it. A `kill -9` of the daemon then
//! loses exactly what a power cut loses on a disk with a write cache: every write not covered
//! by a completed flush. A daemon that completed a FLUSH without running it would lose the
//! flushed data too, and the crash test would see it.
//!
//! Simple on purpose: operations run inline on the worker thread (like the sync engine),
//! the cache is per 512-byte sector, and discard/write-zeroes drop the cached sectors of
//! their range and go to the file at once.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use super::iov::IovCursor;
use super::sync::{fallocate, transfer, write_zeroes_mode, Direction, PUNCH_HOLE};
use super::{GuestIovecs, Inline, IoOp, OpKind, RunInline};
use crate::lock::lock;

const SECTOR: u64 = 512;

/// The environment variable that turns the model on (tests only).
pub const ENV: &str = "NOVACRON_TEST_VOLATILE_CACHE";

/// Most sectors the cache holds (256 MiB); a write beyond that fails with `ENOSPC` rather
/// than growing the daemon without bound.
const MAX_SECTORS: usize = 512 * 1024;

/// Whether this process models a volatile write cache.
pub fn enabled() -> bool {
    cfg!(feature = "test-hooks") && std::env::var(ENV).is_ok_and(|v| v == "1")
}

/// A device's write cache: sector number → contents, not yet in the file.
pub type Cache = Arc<Mutex<BTreeMap<u64, [u8; SECTOR as usize]>>>;

/// One queue's view of the device's shared cache and file.
pub struct VolatileCache {
    file: Arc<File>,
    cache: Cache,
}

/// The engine of one queue over the device's shared cache.
pub type VolatileCacheEngine = Inline<VolatileCache>;

impl VolatileCacheEngine {
    /// An engine over `file` sharing `cache` with the device's other queues.
    pub fn new(file: Arc<File>, cache: Cache) -> Self {
        Inline::wrap(VolatileCache { file, cache })
    }
}

impl RunInline for VolatileCache {
    fn name(&self) -> &'static str {
        "volatile-cache"
    }

    unsafe fn run(&mut self, op: IoOp) -> Result<(), i32> {
        match op.kind {
            OpKind::Write { offset } => {
                let sector0 = offset.checked_div(SECTOR).ok_or(libc::EINVAL)?;
                if offset.checked_rem(SECTOR) != Some(0) {
                    return Err(libc::EINVAL);
                }
                let mut cache = lock(&self.cache);
                let mut sector = sector0;
                let mut buf = [0u8; SECTOR as usize];
                let mut filled = 0usize;
                for iov in op.iovecs.iter() {
                    // SAFETY: the caller guarantees write buffers are readable for iov_len
                    // bytes until completion; we copy them out now.
                    let bytes = unsafe {
                        std::slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len)
                    };
                    for &b in bytes {
                        if let Some(slot) = buf.get_mut(filled) {
                            *slot = b;
                        }
                        filled = filled.saturating_add(1);
                        if filled == buf.len() {
                            if cache.len() >= MAX_SECTORS && !cache.contains_key(&sector) {
                                return Err(libc::ENOSPC);
                            }
                            cache.insert(sector, buf);
                            sector = sector.saturating_add(1);
                            filled = 0;
                        }
                    }
                }
                if filled != 0 {
                    return Err(libc::EINVAL);
                }
                Ok(())
            }
            OpKind::Read { offset } => {
                let overlay = op.iovecs.0.clone();
                // SAFETY: forwarded from the caller of `run`.
                unsafe { transfer(self.file.as_raw_fd(), offset, op.iovecs, Direction::Read) }?;
                let len: u64 = overlay.iter().map(|iov| iov.iov_len as u64).sum();
                let first = offset.checked_div(SECTOR).unwrap_or(0);
                let end = offset.saturating_add(len).div_ceil(SECTOR);
                let cache = lock(&self.cache);
                for (&sector, data) in cache.range(first..end) {
                    let at = sector.saturating_mul(SECTOR);
                    let mut cursor = IovCursor::new(GuestIovecs(overlay.clone()));
                    let skip = at.saturating_sub(offset);
                    cursor.advance(usize::try_from(skip).unwrap_or(usize::MAX));
                    let from = usize::try_from(offset.saturating_sub(at)).unwrap_or(0);
                    // SAFETY: the read buffers are writable by the caller's contract and the
                    // cursor stays within them.
                    unsafe { cursor.copy_in(data.get(from..).unwrap_or_default()) };
                }
                Ok(())
            }
            OpKind::Flush => {
                let mut cache = lock(&self.cache);
                for (&sector, data) in cache.iter() {
                    self.file
                        .write_all_at(data, sector.saturating_mul(SECTOR))
                        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                }
                self.file
                    .sync_data()
                    .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                cache.clear();
                Ok(())
            }
            OpKind::Discard { offset, len } | OpKind::WriteZeroes { offset, len, .. } => {
                let first = offset.checked_div(SECTOR).unwrap_or(0);
                let end = offset.saturating_add(len).div_ceil(SECTOR);
                lock(&self.cache).retain(|s, _| !(first..end).contains(s));
                let mode = match op.kind {
                    OpKind::WriteZeroes { unmap, .. } => write_zeroes_mode(unmap),
                    _ => PUNCH_HOLE,
                };
                fallocate(self.file.as_raw_fd(), mode, offset, len)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::storage::sync::tests::iov;
    use crate::storage::Engine;

    fn op(engine: &mut VolatileCacheEngine, kind: OpKind, buf: Option<&mut [u8]>) {
        let iovecs = buf.map(|b| vec![iov(b)].into()).unwrap_or_default();
        // SAFETY: `buf` outlives the op, which completes inline.
        unsafe {
            engine.push(IoOp {
                kind,
                iovecs,
                tag: 0,
            })
        };
        let mut out = Vec::new();
        engine.reap(&mut out);
        assert_eq!(out[0].result, Ok(()));
    }

    #[test]
    fn writes_stay_in_the_cache_until_a_flush_and_reads_see_them() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        file.set_len(8192).unwrap();
        let mut engine = VolatileCacheEngine::new(Arc::clone(&file), Cache::default());
        let mut data = [7u8; 1024];
        op(&mut engine, OpKind::Write { offset: 512 }, Some(&mut data));
        let mut on_disk = [1u8; 1024];
        file.read_exact_at(&mut on_disk, 512).unwrap();
        assert!(
            on_disk.iter().all(|&b| b == 0),
            "not in the file before a flush"
        );
        let mut back = [0u8; 2048];
        op(&mut engine, OpKind::Read { offset: 0 }, Some(&mut back));
        assert!(back[..512].iter().all(|&b| b == 0));
        assert!(
            back[512..1536].iter().all(|&b| b == 7),
            "reads see cached writes"
        );
        op(&mut engine, OpKind::Flush, None);
        file.read_exact_at(&mut on_disk, 512).unwrap();
        assert!(
            on_disk.iter().all(|&b| b == 7),
            "in the file after the flush"
        );
    }
}
