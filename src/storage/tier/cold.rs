//! Where a tiered disk's cold records live: a local file (records appended, freed by punching
//! holes, `flock`ed while owned) or RADOS objects (one per record, removed when freed, a RADOS
//! lock while owned: `storage::rbd::objects`). The store sees one interface: records written
//! durably at an offset it allocates, read back, freed, and the start-up sweep of records no
//! journal entry names.

// Offsets and lengths come from the journal and the cluster: no indexing or arithmetic that
// can panic or wrap silently.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::storage::rbd::objects::ObjectStore;
use crate::storage::sync::{fallocate, PUNCH_HOLE};

/// A cold tier.
pub enum ColdTier {
    /// Records in a local file, at their offsets.
    File(File),
    /// Records as RADOS objects named by their offsets.
    Rados(ObjectStore),
}

impl From<File> for ColdTier {
    fn from(file: File) -> Self {
        ColdTier::File(file)
    }
}

fn punch(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    fallocate(file.as_raw_fd(), PUNCH_HOLE, offset, len).map_err(std::io::Error::from_raw_os_error)
}

impl ColdTier {
    /// Reads a record; `UnexpectedEof` when it is truncated or missing.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match self {
            ColdTier::File(file) => file.read_exact_at(buf, offset),
            ColdTier::Rados(objects) => objects.read(offset, buf),
        }
    }

    /// Writes a record and makes it durable before returning.
    pub fn write_record(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        match self {
            ColdTier::File(file) => file
                .write_all_at(data, offset)
                .and_then(|()| file.sync_data()),
            ColdTier::Rados(objects) => objects.write(offset, data),
        }
    }

    /// Frees the record at `offset` (`len` bytes long).
    pub fn free(&self, offset: u64, len: u64) -> std::io::Result<()> {
        match self {
            ColdTier::File(file) => punch(file, offset, len),
            ColdTier::Rados(objects) => objects.remove(offset),
        }
    }

    /// Where the next record may go: past everything the tier holds.
    pub fn end(&self) -> std::io::Result<u64> {
        match self {
            ColdTier::File(file) => Ok(file.metadata()?.len()),
            ColdTier::Rados(objects) => objects.end(),
        }
    }

    /// Frees everything but the records at `used` (sorted (start, end) pairs), below `end`:
    /// the space of records a crash left unreferenced.
    pub fn free_unused(&self, used: &[(u64, u64)], end: u64) -> std::io::Result<()> {
        match self {
            ColdTier::File(file) => {
                let mut at = 0u64;
                for &(start, stop) in used.iter().chain(std::iter::once(&(end, end))) {
                    if start > at {
                        punch(file, at, start.saturating_sub(at))?;
                    }
                    at = at.max(stop);
                }
                Ok(())
            }
            ColdTier::Rados(objects) => {
                // Only below `end` (what the start-up saw): a record written later is not
                // ours to judge.
                for offset in objects.record_offsets()? {
                    let named = used
                        .binary_search_by_key(&offset, |&(start, _)| start)
                        .is_ok();
                    if offset < end && !named {
                        objects.remove(offset)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Takes the tier for this process; `false` when another holds it.
    pub fn lock(&self) -> std::io::Result<bool> {
        match self {
            ColdTier::File(file) => {
                // SAFETY: flock only reads the fd number, which `file` keeps open.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                    Ok(true)
                } else {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                        Ok(false)
                    } else {
                        Err(e)
                    }
                }
            }
            ColdTier::Rados(objects) => {
                if objects.lock()? {
                    return Ok(true);
                }
                // A daemon of this host that died serving this disk (the caller holds the
                // hot file, so none lives) may have left the lock: break it and try again.
                Ok(objects.break_stale()? && objects.lock()?)
            }
        }
    }

    /// Takes the tier, waiting up to `wait` for another holder to let go (a RADOS lock
    /// left by a daemon that died lasts until it expires).
    pub fn lock_within(&self, wait: std::time::Duration) -> std::io::Result<bool> {
        let started = std::time::Instant::now();
        loop {
            if self.lock()? {
                return Ok(true);
            }
            if started.elapsed() >= wait || matches!(self, ColdTier::File(_)) {
                return Ok(false);
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }

    /// Whether ownership was lost: a RADOS lock whose renewal failed (another daemon may
    /// own the tier now). A file's lock cannot be lost while the file is open.
    pub fn lost(&self) -> bool {
        match self {
            ColdTier::File(_) => false,
            ColdTier::Rados(objects) => objects.lost(),
        }
    }

    /// Lets the tier go (a migration's switchover).
    pub fn unlock(&self) {
        match self {
            ColdTier::File(file) => {
                // SAFETY: flock only reads the fd number, which `file` keeps open.
                unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
            }
            ColdTier::Rados(objects) => objects.unlock(),
        }
    }
}
