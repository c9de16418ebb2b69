//! Dirty-page logging for live migration (`VHOST_F_LOG_ALL`, `VHOST_USER_PROTOCOL_F_LOG_SHMFD`).
//!
//! While a VM migrates, QEMU copies its memory to the destination again and again, each time
//! only the pages written since the last pass. It tracks the guest's own writes; the pages the
//! device writes (read data, rx frames, status bytes, used rings) it learns from a bitmap it
//! shares with the backend (`SET_LOG_BASE`): one bit per 4 KiB page of guest-physical memory,
//! bit `p % 8` of byte `p / 8` for page `p`. QEMU reads and clears it (atomically) on every
//! pass and a last time after the device is stopped (`GET_VRING_BASE`), before the final pass.
//!
//! So the rule for every write into guest memory: set the page's bit *after* the bytes are
//! there, and before the request or frame is returned. Set before the write, a pass that
//! clears the bit in between would miss the new bytes; set after, the worst case is a page
//! sent twice.
//!
//! vm-memory can keep such a bitmap for writes through its accessors (`vhost-user-backend`'s
//! `BitmapMmapRegion`), but most of our writes bypass them (io_uring, `readv`, our own ring
//! engine) and it never turns logging off again; so we keep the log ourselves: [`DirtyLog`]
//! per connection (the relay maps the front-end's log into it, the acked features switch it
//! on and off) and [`LogMap::mark`] at each write site, by guest-physical address.
//! [`DirtyLog::current`] costs one atomic load while logging is off.

// Front-end-controlled numbers flow through here: no indexing or arithmetic that can panic or
// wrap silently.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{PoisonError, RwLock};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::sys::shared_map::{MapError, SharedMapping};
use crate::vring::GuestMemory;

/// `VHOST_F_LOG_ALL`: the front-end wants every write logged.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// Bytes of guest memory one bit of the log stands for.
pub const LOG_PAGE: u64 = 4096;
/// The largest log we map: one bit per page of 8 TiB of guest memory.
const MAX_LOG_BYTES: u64 = 256 << 20;

/// Why a log could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The `SET_LOG_BASE` payload is not `{u64 size, u64 offset}`.
    #[error("SET_LOG_BASE payload of {0} bytes")]
    Payload(usize),
    /// The log is larger than any guest needs.
    #[error("a dirty log of {0} bytes")]
    TooLarge(u64),
    /// The file could not be mapped.
    #[error("dirty log")]
    Map(#[from] MapError),
}

/// The front-end's log, mapped.
pub struct LogMap {
    mapping: SharedMapping,
    /// Marks that fell outside the log (a log smaller than guest memory: QEMU's bug or a
    /// hostile front-end; the write itself went through).
    beyond: AtomicU64,
}

impl LogMap {
    /// Maps `SET_LOG_BASE`'s payload (`{u64 mmap_size, u64 mmap_offset}`) of `file`.
    pub fn from_message(payload: &[u8], file: std::fs::File) -> Result<Self, DirtyError> {
        let field = |at: usize| {
            payload
                .get(at..at.saturating_add(8))
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_le_bytes)
        };
        let (Some(size), Some(offset)) = (field(0), field(8)) else {
            return Err(DirtyError::Payload(payload.len()));
        };
        if size > MAX_LOG_BYTES {
            return Err(DirtyError::TooLarge(size));
        }
        let len = usize::try_from(size).map_err(|_| DirtyError::TooLarge(size))?;
        Ok(Self {
            mapping: SharedMapping::map(file, offset, len)?,
            beyond: AtomicU64::new(0),
        })
    }

    fn byte(&self, index: u64) -> Option<&AtomicU8> {
        let mapping = &self.mapping;
        let index = usize::try_from(index).ok()?;
        if index >= mapping.len() {
            return None;
        }
        // SAFETY: `index` is inside the mapping (checked), which lives as long as `self`;
        // the memory is shared with the front-end, so it is only ever accessed atomically.
        Some(unsafe { &*mapping.base().as_ptr().add(index).cast::<AtomicU8>() })
    }

    /// Marks every page of guest-physical `gpa..gpa+len` dirty.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len.saturating_sub(1)) / LOG_PAGE;
        let mut page = first;
        while page <= last {
            let bit = page % 8;
            match self.byte(page / 8) {
                Some(byte) => {
                    if bit == 0 && last.saturating_sub(page) >= 7 {
                        // A whole byte's worth of pages at once.
                        byte.store(u8::MAX, Ordering::Release);
                        page = page.saturating_add(8);
                        continue;
                    }
                    byte.fetch_or(1u8 << bit, Ordering::Release);
                }
                None => {
                    self.beyond.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            page = page.saturating_add(1);
        }
    }

    /// Marks the guest pages behind host range `host..host+len` of `memory` (for writes made
    /// through host addresses: io_uring, `readv`). Bytes outside guest memory are ignored.
    pub fn mark_host(&self, memory: &GuestMemory, host: usize, len: usize) {
        let mut host = host;
        let mut left = len;
        while left > 0 {
            let found = memory.iter().find_map(|region| {
                let start = region.as_ptr() as usize;
                let size = usize::try_from(region.len()).ok()?;
                let offset = host.checked_sub(start).filter(|&o| o < size)?;
                Some((region.start_addr().0, offset, size.saturating_sub(offset)))
            });
            let Some((gpa, offset, room)) = found else {
                return;
            };
            let take = left.min(room);
            self.mark(
                gpa.saturating_add(offset as u64),
                u64::try_from(take).unwrap_or(u64::MAX),
            );
            host = host.saturating_add(take);
            left = left.saturating_sub(take);
        }
    }

    /// Marks outside the log so far.
    pub fn beyond(&self) -> u64 {
        self.beyond.load(Ordering::Relaxed)
    }
}

/// One connection's log: the front-end's map and whether logging is on.
///
/// Writers mark through it ([`DirtyLog::mark`] and friends), each mark under a short read
/// guard taken after the bytes landed, so a mark is never made on a snapshot older than its
/// write (logging switched on mid-pass is seen), and never holds a guard across anything else
/// (a switch sender delivering into another port's memory marks that port's log after its
/// own). A new `SET_LOG_BASE` (QEMU grows the log when guest memory grows) waits for marks in
/// progress before it is answered: QEMU syncs and drops the old log right after our reply.
/// While logging is off a mark costs one atomic load.
#[derive(Default)]
pub struct DirtyLog {
    /// `VHOST_F_LOG_ALL` is acked.
    logging: AtomicBool,
    map: RwLock<Option<LogMap>>,
}

impl DirtyLog {
    /// Takes the front-end's (new) log, once no mark holds the old one (then unmapped).
    pub fn set_map(&self, map: LogMap) {
        *self.map.write().unwrap_or_else(PoisonError::into_inner) = Some(map);
    }

    /// The front-end acked (or dropped) `VHOST_F_LOG_ALL`.
    pub fn set_logging(&self, on: bool) {
        self.logging.store(on, Ordering::Release);
    }

    /// Whether the front-end has handed over a log (`SET_LOG_BASE`).
    pub fn has_map(&self) -> bool {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Whether writes are being logged now.
    pub fn is_logging(&self) -> bool {
        self.logging.load(Ordering::Acquire)
    }

    fn with_map(&self, mark: impl FnOnce(&LogMap)) {
        if !self.is_logging() {
            return;
        }
        if let Some(map) = self
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            mark(map);
        }
    }

    /// Marks guest-physical `gpa..gpa+len`, written, if logging is on.
    pub fn mark(&self, gpa: u64, len: u64) {
        self.with_map(|map| map.mark(gpa, len));
    }

    /// Marks the guest pages behind host range `host..host+len` of `memory`, if logging is on.
    pub fn mark_host(&self, memory: &GuestMemory, host: usize, len: usize) {
        self.with_map(|map| map.mark_host(memory, host, len));
    }

    /// Marks the used ring of a queue with `size` entries at `used_ring` (flags, idx, the
    /// entries and `avail_event`), if logging is on.
    pub fn mark_used_ring(&self, used_ring: u64, size: u16) {
        // 2 + 2 bytes of header, 8 per entry, 2 of avail_event.
        let len = 6u64.saturating_add(8u64.saturating_mul(u64::from(size)));
        self.mark(used_ring, len);
    }

    /// Marks outside the log so far (a log smaller than guest memory).
    pub fn beyond(&self) -> u64 {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or(0, LogMap::beyond)
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;
    use std::io::Read;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn log_of(bytes: u64) -> (LogMap, std::fs::File) {
        let file = tempfile::tempfile().unwrap();
        file.set_len(bytes).unwrap();
        let mut payload = bytes.to_le_bytes().to_vec();
        payload.extend_from_slice(&0u64.to_le_bytes());
        (
            LogMap::from_message(&payload, file.try_clone().unwrap()).unwrap(),
            file,
        )
    }

    fn bits(file: &mut std::fs::File) -> Vec<u8> {
        use std::io::Seek;
        file.rewind().unwrap();
        let mut out = Vec::new();
        file.read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn marks_exactly_the_pages_touched() {
        let (log, mut file) = log_of(4096);
        log.mark(0x1000, 1); // page 1
        log.mark(0x2fff, 2); // pages 2 and 3
        log.mark(0x10_0000, 0); // nothing
        log.mark(0x8000, 0x10000); // pages 8..=23: two whole bytes
        let b = bits(&mut file);
        assert_eq!(b[0], 0b0000_1110);
        assert_eq!((b[1], b[2], b[3]), (0xff, 0xff, 0));
        assert!(b[4..].iter().all(|&x| x == 0));
        // Past the log: counted, nothing written out of bounds.
        log.mark(4096 * 8 * 4096, 1);
        log.mark(u64::MAX - 10, 100);
        assert_eq!(log.beyond(), 2);
    }

    #[test]
    fn host_addresses_are_translated_through_the_regions() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x10_0000), 0x4000),
        ])
        .unwrap();
        let (log, mut file) = log_of(64);
        let second = mem.iter().nth(1).unwrap().as_ptr() as usize;
        log.mark_host(&mem, second + 0x1800, 0x1000); // gpa 0x101800..0x102800: pages 257, 258
        log.mark_host(&mem, 16, 8); // unrelated host memory: ignored
        let b = bits(&mut file);
        assert_eq!(b[32], 0b0000_0110);
        assert_eq!(b.iter().map(|x| x.count_ones()).sum::<u32>(), 2);
    }

    #[test]
    fn logging_is_off_until_acked_and_hostile_payloads_are_refused() {
        let log = DirtyLog::default();
        log.mark(0, 4096); // no map, logging off: nothing
        log.set_logging(true);
        log.mark(0, 4096); // no map yet: nothing
        let (map, mut file) = log_of(64);
        log.set_map(map);
        log.set_logging(false);
        log.mark(0, 4096);
        assert_eq!(bits(&mut file)[0], 0, "logging off: nothing marked");
        log.set_logging(true);
        log.mark_used_ring(0x2c00, 256); // 2054 bytes from 0x2c00: pages 2 and 3
        assert_eq!(bits(&mut file)[0], 0b0000_1100, "the used ring's two pages");
        let file = tempfile::tempfile().unwrap();
        file.set_len(64).unwrap();
        let clone = || file.try_clone().unwrap();
        assert!(LogMap::from_message(&[0; 8], clone()).is_err(), "short");
        let mut big = (1u64 << 40).to_le_bytes().to_vec();
        big.extend_from_slice(&[0; 8]);
        assert!(LogMap::from_message(&big, clone()).is_err(), "too large");
        let mut past = 128u64.to_le_bytes().to_vec();
        past.extend_from_slice(&[0; 8]);
        assert!(
            LogMap::from_message(&past, clone()).is_err(),
            "past the file"
        );
    }
}
