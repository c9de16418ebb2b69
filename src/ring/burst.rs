//! A burst on one queue: chains taken from the avail ring and entries added to the used ring,
//! with the queue's indices advanced locally and written back (and the used index published)
//! once, when the burst ends.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::num::Wrapping;

use virtio_queue::{Queue, QueueT};

use super::dirty::DirtyLog;
use super::map::MemMap;
use super::split::{BrokenChain, RingError, SplitRing};
use crate::devices::desc::Buffers;

/// A chain taken: its head, and whether it could be walked.
pub type Popped = (u16, Result<(), BrokenChain>);

/// A burst on `queue`; ends with [`Burst::finish`], which says whether to interrupt the
/// driver. Dropped unfinished (a bug: debug builds assert), it still writes the indices back
/// and publishes what was used, so nothing is taken twice, but no interrupt decision is made.
#[must_use = "a burst must end with finish(), which says whether to interrupt the driver"]
pub struct Burst<'q, 'a, 'm> {
    queue: &'q mut Queue,
    ring: SplitRing<'a, 'm>,
    next_avail: Wrapping<u16>,
    /// Where the burst started taking chains.
    avail_start: Wrapping<u16>,
    /// The avail index as last read (chains up to it may be taken without another read).
    avail_end: Wrapping<u16>,
    used_start: Wrapping<u16>,
    next_used: Wrapping<u16>,
    /// The burst takes chains only up to `avail_end` (see [`Burst::up_to`]).
    fixed_end: bool,
    finished: bool,
    /// The dirty-page log to mark the used ring in, while a migration runs.
    log: Option<&'a DirtyLog>,
}

/// How many chains ahead of the one being served a burst asks the CPU to fetch buffers.
pub const PREFETCH_AHEAD: u16 = 4;

impl<'q, 'a, 'm> Burst<'q, 'a, 'm> {
    /// Starts a burst on `queue` through `map`.
    pub fn new(queue: &'q mut Queue, map: &'a MemMap<'m>) -> Result<Self, RingError> {
        let ring = SplitRing::new(map, queue)?;
        let next_avail = Wrapping(queue.next_avail());
        let next_used = Wrapping(queue.next_used());
        Ok(Self {
            queue,
            ring,
            next_avail,
            avail_start: next_avail,
            avail_end: next_avail,
            used_start: next_used,
            next_used,
            fixed_end: false,
            finished: false,
            log: None,
        })
    }

    /// Chains longer than `max` descriptors are broken (`SplitRing::limit_walk`).
    pub fn limit_walk(mut self, max: u32) -> Self {
        self.ring.limit_walk(max);
        self
    }

    /// Marks what the burst writes into the used ring in `log` (`ring::dirty`); the caller
    /// marks the buffers it writes, through [`Burst::log`].
    pub fn with_log(mut self, log: Option<&'a DirtyLog>) -> Self {
        self.log = log;
        self
    }

    /// The memory map the burst translates through (for the caller's own copies).
    pub fn map(&self) -> &'a MemMap<'m> {
        self.ring.map()
    }

    /// Kicks off while we poll ([`SplitRing::suppress_kicks`]); the flag's store is marked in
    /// the dirty-page log like the burst's other used-ring writes.
    pub fn suppress_kicks(&self) {
        if self.ring.suppress_kicks() {
            if let Some(log) = self.log {
                log.mark_used_ring(self.queue.used_ring(), self.ring.size());
            }
        }
    }

    /// The dirty-page log this burst marks.
    pub fn log(&self) -> Option<&'a DirtyLog> {
        self.log
    }

    /// Takes chains only up to avail index `end` (read before `map` was taken), never re-reading
    /// the driver's index.
    ///
    /// Why: a chain's buffers may lie in a memory region the front-end added just before
    /// publishing it (it waits for ADD_MEM_REG's reply, then posts). A map snapshot taken
    /// *after* the index was read covers every chain published up to that index; a chain seen
    /// later may need a newer map than this burst holds (it was refused as a bad address
    /// under load before this), so it waits for the next burst.
    pub fn up_to(&mut self, end: u16) -> Result<(), RingError> {
        let pending = (Wrapping(end) - self.next_avail).0;
        if pending > self.ring.size() {
            return Err(RingError::AvailIndex {
                avail: end,
                next: self.next_avail.0,
            });
        }
        self.avail_end = Wrapping(end);
        self.fixed_end = true;
        Ok(())
    }

    /// A burst that takes chains only up to avail index `end` ([`Burst::up_to`]); `None` (the
    /// index could not be read) refuses the ring.
    pub fn bounded(
        queue: &'q mut Queue,
        map: &'a MemMap<'m>,
        end: Option<u16>,
    ) -> Result<Self, RingError> {
        let avail_ring = queue.avail_ring();
        let mut burst = Self::new(queue, map)?;
        let bounded = end
            .ok_or(RingError::Unmapped(avail_ring))
            .and_then(|end| burst.up_to(end));
        match bounded {
            Ok(()) => Ok(burst),
            Err(e) => {
                let _ = burst.finish();
                Err(e)
            }
        }
    }

    /// Chains available now (reads the driver's index). A burst takes at most a ring's
    /// worth: nothing it took is visible as used before it ends, so a driver that publishes
    /// past `start + size` meanwhile has a broken ring (and could otherwise keep one burst
    /// going for as long as it likes).
    pub fn available(&mut self) -> Result<u16, RingError> {
        if self.fixed_end {
            return Ok((self.avail_end - self.next_avail).0);
        }
        let pending = self.ring.pending(self.next_avail.0)?;
        let end = self.next_avail + Wrapping(pending);
        if (end - self.avail_start).0 > self.ring.size() {
            return Err(RingError::AvailIndex {
                avail: end.0,
                next: self.avail_start.0,
            });
        }
        self.avail_end = end;
        Ok(pending)
    }

    /// The driver's avail index as last read.
    pub fn avail_seen(&self) -> u16 {
        self.avail_end.0
    }

    /// The queue's size.
    pub fn size(&self) -> u16 {
        self.ring.size()
    }

    /// The avail position of the next chain to take (every entry before it was taken).
    pub fn next_avail(&self) -> u16 {
        self.next_avail.0
    }

    /// The used index once the burst is finished (counting the entries added so far).
    pub fn next_used(&self) -> u16 {
        self.next_used.0
    }

    /// Takes the next chain into `out`: `None` when the ring is empty, else its head and
    /// whether it could be walked (a broken chain is taken too: the caller returns it).
    pub fn pop(&mut self, out: &mut Buffers) -> Result<Option<Popped>, RingError> {
        if self.next_avail == self.avail_end && self.available()? == 0 {
            return Ok(None);
        }
        let head = self.ring.head(self.next_avail.0);
        self.next_avail += Wrapping(1);
        Ok(Some((head, self.ring.chain(head, out))))
    }

    /// Takes the next chain if it is one direct buffer, device-writable or (`writable`
    /// false) device-readable, of at least `min` bytes (a NIC's usual rx or tx chain),
    /// without a walk into a [`Buffers`]: its head, guest address and length. Anything else
    /// (the ring empty, a longer or indirect chain, the other direction, a shorter buffer) is
    /// left where it is, for [`Burst::pop`].
    pub fn pop_single(
        &mut self,
        writable: bool,
        min: u32,
    ) -> Result<Option<(u16, u64, u32)>, RingError> {
        if self.next_avail == self.avail_end && self.available()? == 0 {
            return Ok(None);
        }
        let head = self.ring.head(self.next_avail.0);
        match self.ring.single(head, writable) {
            Some((addr, len)) if len >= min => {
                self.next_avail += Wrapping(1);
                Ok(Some((head, addr, len)))
            }
            _ => Ok(None),
        }
    }

    /// At the start of a burst of up to `count` chains: hints the CPU to fetch their
    /// descriptors and the used-ring lines their entries will go to (one overlapped wait for
    /// the burst's ring lines instead of one miss per descriptor line in turn), and the first
    /// buffers of the next [`PREFETCH_AHEAD`] chains, for reading or (`write`) for writing.
    /// Then [`Burst::prefetch`] one more chain ahead before each pop.
    pub fn prefetch_start(&self, count: u16, write: bool) {
        self.prefetch_rings(count);
        for ahead in 0..PREFETCH_AHEAD {
            self.prefetch(ahead, write);
        }
    }

    fn prefetch_rings(&self, count: u16) {
        let count = count.min((self.avail_end - self.next_avail).0);
        for i in 0..count {
            self.ring.prefetch_desc((self.next_avail + Wrapping(i)).0);
        }
        // Used elements are 8 bytes: one line holds 8 of them.
        for i in (0..count).step_by(8).chain(count.checked_sub(1)) {
            self.ring.prefetch_used((self.next_used + Wrapping(i)).0);
        }
    }

    /// Hints the CPU to fetch the first buffer of the chain `ahead` positions past the next
    /// one, if the driver published it (see [`SplitRing::prefetch`]).
    pub fn prefetch(&self, ahead: u16, write: bool) {
        if ahead < (self.avail_end - self.next_avail).0 {
            self.ring
                .prefetch((self.next_avail + Wrapping(ahead)).0, write);
        }
    }

    /// Puts the last `count` chains taken back (they will be taken again); never further
    /// back than where the burst started.
    pub fn unpop(&mut self, count: u16) {
        let taken = (self.next_avail - self.avail_start).0;
        debug_assert!(count <= taken, "unpop {count} of {taken}");
        self.next_avail -= Wrapping(count.min(taken));
    }

    /// Returns `head` to the driver with `len` bytes written (visible when the burst ends).
    /// A head outside the ring (a broken avail entry) is not returned: there is no such
    /// descriptor, and an unknown id in the used ring breaks the driver's ring.
    pub fn used(&mut self, head: u16, len: u32) {
        if head >= self.ring.size() {
            return;
        }
        self.ring.write_used(self.next_used.0, head, len);
        self.next_used += Wrapping(1);
    }

    /// Ends the burst; returns whether the driver wants an interrupt for what was used.
    pub fn finish(mut self) -> bool {
        self.flush()
    }

    fn flush(&mut self) -> bool {
        if self.finished {
            return false;
        }
        self.finished = true;
        self.queue.set_next_avail(self.next_avail.0);
        if self.next_used == self.used_start {
            return false;
        }
        self.queue.set_next_used(self.next_used.0);
        let notify = self.ring.publish_used(self.used_start.0, self.next_used.0);
        if let Some(log) = self.log {
            log.mark_used_ring(self.queue.used_ring(), self.ring.size());
        }
        notify
    }
}

impl Drop for Burst<'_, '_, '_> {
    fn drop(&mut self) {
        debug_assert!(
            self.finished || std::thread::panicking(),
            "burst dropped without finish()"
        );
        self.flush();
    }
}
