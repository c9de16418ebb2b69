//! Inflight tracking for split rings (vhost-user `INFLIGHT_SHMFD`): which requests the device
//! took off a ring and has not returned, recorded in memory the front-end keeps (QEMU holds
//! the region's fd across our crashes and hands it back with `SET_INFLIGHT_FD`), so a
//! restarted daemon resubmits exactly those, in the order they were taken, and never
//! completes one twice.
//!
//! The layout per queue is libvhost-user's (QEMU never reads it; only we do): a 16-byte
//! header `{u64 features, u16 version, u16 desc_num, u16 last_batch_head, u16 used_idx}`, then
//! one 16-byte entry per descriptor `{u8 inflight, 5 bytes padding, u16 next, u64 counter}`;
//! queues follow each other every [`queue_region_size`] bytes. Its meaning differs in two
//! places, so we write version 2 (see `VERSION`): `features` holds our avail record, and
//! `last_batch_head` is unused (batches are recovered from the used ring).
//!
//! The protocol, per request:
//! 1. [`InflightQueue::begin`] when its head is taken off the avail ring: a fresh counter
//!    (taking order), then `inflight = 1`;
//! 2. [`InflightQueue::popped_to`] with the ring's next avail position. libvhost-user infers
//!    that position from `used_idx` + the number in flight, which is wrong as soon as a device
//!    skips an avail entry (a head beyond the ring, a head published twice: we skip those and
//!    serve what follows). We record it instead, in the header's `features` word, which only
//!    the backend uses: bit 63 set, position in the low 16 bits;
//! 3. completions are returned in batches: the used entries are written and the used index
//!    published once (`ring::burst`), then [`InflightQueue::returned`] for each head
//!    (`inflight = 0`), then [`InflightQueue::used_to`] (`used_idx` = the ring's new used
//!    index). libvhost-user marks `last_batch_head` before each single entry instead; a batch
//!    needs more than one head, and the used ring already holds them.
//!
//! After a crash, [`InflightQueue::recover`] compares the header's `used_idx` with the used
//! index in guest memory: if the ring is ahead, the crash fell between publishing a batch and
//! recording it, and the heads in the used entries between the two indices (the driver
//! never writes the used ring) are cleared. What is still marked in flight is then exactly
//! what was taken and not returned: resubmitted by counter. A crash between `begin`
//! and `popped_to` leaves a head both marked and not yet counted as taken: the device sees it
//! published again while resubmitted and skips the duplicate.
//!
//! Every store is an atomic with release ordering, in the order above: the record stays
//! consistent whatever instruction the process dies at (the memory outlives it).

// Front-end-controlled numbers flow through here (the region is theirs): no indexing or
// arithmetic that can panic or wrap silently.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};

/// Bytes of a queue's header.
const HEADER: usize = 16;
/// Bytes of one descriptor's entry.
const ENTRY: usize = 16;
/// Alignment of each queue's region (libvhost-user's `INFLIGHT_ALIGNMENT`).
const ALIGN: usize = 64;
/// Set in the header's `features` word when it holds our next-avail record.
const AVAIL_VALID: u64 = 1 << 63;
/// The layout version we write: 2 since used entries are published in batches (step 3 in the
/// module docs). A version-1 region is still read (the used-ring reading clears a crash
/// window of one entry, as libvhost-user's layout had, or of a batch, as builds between the
/// two versions wrote). A binary that only knows version 1 resets a version-2 region instead
/// of misreading it (after a downgrade, what was in flight is not resubmitted).
const VERSION: u16 = 2;
/// The oldest layout version we read.
const OLDEST_READ: u16 = 1;

/// Bytes one queue of `queue_size` descriptors takes (libvhost-user's formula, which leaves
/// room for the 16-byte header: `16·n + 2` rounded up to 64 is at least `16·n + 16`).
pub fn queue_region_size(queue_size: u16) -> usize {
    let raw = usize::from(queue_size)
        .saturating_mul(ENTRY)
        .saturating_add(2);
    raw.div_ceil(ALIGN).saturating_mul(ALIGN)
}

/// What recovery found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovery {
    /// Heads taken and not returned before the crash, in the order they were taken.
    pub pending: Vec<u16>,
    /// The avail position to go on from (`None`: no record; a fresh region).
    pub next_avail: Option<u16>,
    /// The region did not describe this queue (first use, or another queue size): reset.
    pub fresh: bool,
}

/// One queue's part of the shared inflight region.
pub struct InflightQueue {
    base: NonNull<u8>,
    size: u16,
    counter: u64,
}

// SAFETY: the pointer refers to shared memory that stays mapped for the value's life (the
// `new` contract); every access is atomic, so moving the value to another thread is sound.
unsafe impl Send for InflightQueue {}

impl InflightQueue {
    /// The queue of `size` descriptors whose region starts at `base`.
    ///
    /// # Safety
    /// `base` must be 8-byte aligned and point to `queue_region_size(size)` bytes of writable
    /// memory that stay mapped while the value lives (the front-end may write them too; all
    /// accesses here are atomic, so that is merely wrong data, never undefined behaviour).
    pub unsafe fn new(base: NonNull<u8>, size: u16) -> Self {
        let mut queue = Self {
            base,
            size,
            counter: 0,
        };
        queue.counter = (0..size)
            .filter_map(|head| queue.entry_counter(head))
            .max()
            .unwrap_or(0);
        queue
    }

    fn u16_at(&self, offset: usize) -> Option<&AtomicU16> {
        self.at(offset, 2)
            // SAFETY: in bounds and 2-aligned (checked by `at`); atomics only (see `new`).
            .map(|p| unsafe { &*p.as_ptr().cast::<AtomicU16>() })
    }

    fn u64_at(&self, offset: usize) -> Option<&AtomicU64> {
        self.at(offset, 8)
            // SAFETY: in bounds and 8-aligned (checked by `at`); atomics only (see `new`).
            .map(|p| unsafe { &*p.as_ptr().cast::<AtomicU64>() })
    }

    fn u8_at(&self, offset: usize) -> Option<&AtomicU8> {
        self.at(offset, 1)
            // SAFETY: in bounds (checked by `at`); atomics only (see `new`).
            .map(|p| unsafe { &*p.as_ptr().cast::<AtomicU8>() })
    }

    /// `base + offset` if `len` bytes there lie inside the region and are `len`-aligned.
    fn at(&self, offset: usize, len: usize) -> Option<NonNull<u8>> {
        let end = offset.checked_add(len)?;
        if end > queue_region_size(self.size) || offset.checked_rem(len)? != 0 {
            return None;
        }
        // SAFETY: `offset` is within the region (checked above), which `new`'s contract says
        // is mapped; the result is therefore non-null and in bounds.
        Some(unsafe { self.base.add(offset) })
    }

    fn entry(head: u16) -> usize {
        HEADER.saturating_add(usize::from(head).saturating_mul(ENTRY))
    }

    fn entry_counter(&self, head: u16) -> Option<u64> {
        let inflight = self.u8_at(Self::entry(head))?.load(Ordering::Acquire);
        (inflight != 0)
            .then(|| self.u64_at(Self::entry(head).saturating_add(8)))
            .flatten()
            .map(|c| c.load(Ordering::Acquire))
    }

    /// Makes the region describe this queue from scratch: nothing in flight, used index
    /// `used_idx`, no avail record.
    pub fn reset(&mut self, used_idx: u16) {
        for head in 0..self.size {
            if let Some(flag) = self.u8_at(Self::entry(head)) {
                flag.store(0, Ordering::Release);
            }
        }
        self.counter = 0;
        self.store_u64(0, 0);
        self.store_u16(10, self.size);
        self.store_u16(12, 0);
        self.store_u16(14, used_idx);
        self.store_u16(8, VERSION);
    }

    fn store_u16(&self, offset: usize, value: u16) {
        if let Some(field) = self.u16_at(offset) {
            field.store(value, Ordering::Release);
        }
    }

    fn store_u64(&self, offset: usize, value: u64) {
        if let Some(field) = self.u64_at(offset) {
            field.store(value, Ordering::Release);
        }
    }

    fn load_u16(&self, offset: usize) -> u16 {
        self.u16_at(offset).map_or(0, |f| f.load(Ordering::Acquire))
    }

    /// Reads what a previous process left: see the module docs. `used_idx` is the used
    /// index in guest memory now, `used_id` the descriptor id in a used-ring position (`None`:
    /// the ring cannot be read).
    pub fn recover(&mut self, used_idx: u16, used_id: impl Fn(u16) -> Option<u32>) -> Recovery {
        let version = self.load_u16(8);
        let desc_num = self.load_u16(10);
        if !(OLDEST_READ..=VERSION).contains(&version) || desc_num != self.size {
            self.reset(used_idx);
            return Recovery {
                fresh: true,
                ..Recovery::default()
            };
        }
        let recorded = self.load_u16(14);
        if recorded != used_idx {
            // The crash fell between publishing a batch and recording it: what the used ring
            // holds between the two indices was returned. More than a ring apart, the record
            // is not ours (or the ring was reset): nothing to clear. A used ring that cannot
            // be read leaves the record as it is (a later process may read it; moving the
            // index on would lose the only trace of the batch).
            let published = used_idx.wrapping_sub(recorded);
            let ids: Option<Vec<u32>> = if published <= self.size {
                (0..published)
                    .map(|i| used_id(recorded.wrapping_add(i)))
                    .collect()
            } else {
                Some(Vec::new())
            };
            if let Some(ids) = ids {
                for head in ids.into_iter().filter_map(|id| u16::try_from(id).ok()) {
                    if let Some(flag) = (head < self.size)
                        .then(|| self.u8_at(Self::entry(head)))
                        .flatten()
                    {
                        flag.store(0, Ordering::Release);
                    }
                }
                self.store_u16(14, used_idx);
            }
        }
        // Recorded in the current layout from here on.
        self.store_u16(8, VERSION);
        let mut pending: Vec<(u64, u16)> = (0..self.size)
            .filter_map(|head| self.entry_counter(head).map(|c| (c, head)))
            .collect();
        pending.sort_unstable();
        self.counter = pending.last().map_or(0, |&(c, _)| c);
        let record = self.u64_at(0).map_or(0, |f| f.load(Ordering::Acquire));
        Recovery {
            pending: pending.into_iter().map(|(_, head)| head).collect(),
            next_avail: (record & AVAIL_VALID != 0).then_some(record as u16),
            fresh: false,
        }
    }

    /// `head` was taken off the avail ring (before it is executed).
    pub fn begin(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        self.counter = self.counter.saturating_add(1);
        let entry = Self::entry(head);
        self.store_u64(entry.saturating_add(8), self.counter);
        if let Some(flag) = self.u8_at(entry) {
            flag.store(1, Ordering::Release);
        }
    }

    /// Every avail entry before `next_avail` has been taken (begun or skipped).
    pub fn popped_to(&self, next_avail: u16) {
        self.store_u64(0, AVAIL_VALID | u64::from(next_avail));
    }

    /// `head` was returned: its used entry is published (the used index covers it).
    pub fn returned(&self, head: u16) {
        if head < self.size {
            if let Some(flag) = self.u8_at(Self::entry(head)) {
                flag.store(0, Ordering::Release);
            }
        }
    }

    /// Every head returned so far was cleared ([`InflightQueue::returned`]); the ring's used
    /// index is now `used_idx`.
    pub fn used_to(&self, used_idx: u16) {
        self.store_u16(14, used_idx);
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

    /// A region in our own (8-aligned) memory.
    struct Region(Vec<u64>);

    impl Region {
        fn new(size: u16) -> Self {
            Region(vec![0; queue_region_size(size) / 8])
        }

        fn queue(&mut self, size: u16) -> InflightQueue {
            // SAFETY: the Vec is 8-aligned, large enough and outlives every queue in a test.
            unsafe { InflightQueue::new(NonNull::new(self.0.as_mut_ptr().cast()).unwrap(), size) }
        }
    }

    #[test]
    fn region_sizes_leave_room_for_the_header() {
        for size in [1u16, 2, 3, 4, 128, 256, 1024, 32768] {
            let bytes = queue_region_size(size);
            assert!(bytes >= HEADER + ENTRY * usize::from(size), "{size}");
            assert_eq!(bytes % ALIGN, 0);
        }
        assert_eq!(queue_region_size(256), 4160, "libvhost-user's size");
    }

    #[test]
    fn a_fresh_region_is_reset_and_reports_nothing() {
        let mut region = Region::new(8);
        let mut q = region.queue(8);
        let r = q.recover(5, |_| None);
        assert!(r.fresh);
        assert!(r.pending.is_empty());
        assert_eq!(r.next_avail, None);
        // A region left for another queue size is not trusted either.
        q.begin(3);
        let mut other = region.queue(4);
        assert!(other.recover(5, |_| None).fresh);
    }

    /// Runs `steps` on a fresh queue, then recovers in a new "process" with the used ring
    /// holding `used` (ids from position 0; the used index is its length).
    fn crash_after(steps: impl FnOnce(&mut InflightQueue), used: &[u32]) -> Recovery {
        let mut region = Region::new(8);
        let mut q = region.queue(8);
        q.recover(0, |_| None);
        steps(&mut q);
        let mut again = region.queue(8);
        again.recover(used.len() as u16, |p| used.get(usize::from(p)).copied())
    }

    #[test]
    fn out_of_order_completions_resubmit_exactly_what_was_not_returned() {
        let r = crash_after(
            |q| {
                for head in [4, 1, 6] {
                    q.begin(head);
                }
                q.popped_to(3);
                // The second request completes first.
                q.returned(1);
                q.used_to(1);
            },
            &[1],
        );
        assert_eq!(
            r.pending,
            vec![4, 6],
            "in taking order, the completed one gone"
        );
        assert_eq!(r.next_avail, Some(3));
    }

    #[test]
    fn a_crash_between_publishing_and_recording_does_not_complete_twice() {
        // A batch of two published (the ring shows them), the crash before either is cleared.
        let batch = |q: &mut InflightQueue| {
            for head in [2, 5, 7] {
                q.begin(head);
            }
            q.popped_to(3);
        };
        assert_eq!(crash_after(batch, &[7, 2]).pending, vec![5]);
        // ...or after clearing one of them.
        let r = crash_after(
            |q| {
                batch(q);
                q.returned(7);
            },
            &[7, 2],
        );
        assert_eq!(r.pending, vec![5]);
        // A later batch: only the entries past the recorded index are cleared by recovery.
        let r = crash_after(
            |q| {
                batch(q);
                q.returned(7);
                q.used_to(1);
                // Head 7 taken again and still in flight; 2 published, not recorded.
                q.begin(7);
                q.popped_to(4);
            },
            &[7, 2],
        );
        assert_eq!(r.pending, vec![5, 7]);
        // Before publishing, the heads are still pending.
        assert_eq!(crash_after(batch, &[]).pending, vec![2, 5, 7]);
    }

    #[test]
    fn recovery_trusts_no_used_entry_it_cannot_use() {
        let batch = |q: &mut InflightQueue| {
            for head in [0, 3] {
                q.begin(head);
            }
            q.popped_to(2);
        };
        // Ids beyond the ring or beyond u16 clear nothing.
        assert_eq!(crash_after(batch, &[8, 65536 + 3]).pending, vec![0, 3]);
        // A used index more than a ring ahead of the record is not a batch of ours.
        let ids: Vec<u32> = vec![3; 9];
        assert_eq!(crash_after(batch, &ids).pending, vec![0, 3]);
        // An unreadable ring clears nothing either, and leaves the record for a process that
        // can read it.
        let mut region = Region::new(8);
        let mut q = region.queue(8);
        q.recover(0, |_| None);
        batch(&mut q);
        assert_eq!(region.queue(8).recover(2, |_| None).pending, vec![0, 3]);
        let ids = [3u32, 0];
        let readable = |p: u16| ids.get(usize::from(p)).copied();
        assert!(region.queue(8).recover(2, readable).pending.is_empty());
    }

    #[test]
    fn a_version_1_region_is_read_and_rewritten_as_version_2() {
        let mut region = Region::new(8);
        let mut q = region.queue(8);
        q.recover(0, |_| None);
        q.begin(5);
        q.popped_to(1);
        // As the previous layout version left it: version 1 in bytes 8..10 of the header.
        region.0[1] = (region.0[1] & !0xffff) | 1;
        let r = region.queue(8).recover(0, |_| None);
        assert!(!r.fresh, "version 1 is read");
        assert_eq!(r.pending, vec![5]);
        assert_eq!(region.0[1] & 0xffff, u64::from(VERSION));
        // An unknown version is reset.
        region.0[1] = (region.0[1] & !0xffff) | 3;
        assert!(region.queue(8).recover(0, |_| None).fresh);
    }

    #[test]
    fn skipped_avail_entries_are_not_taken_again() {
        // A head beyond the ring was skipped at avail position 1: the record says 3, where
        // used + in flight would say 2.
        let r = crash_after(
            |q| {
                q.begin(0);
                q.popped_to(1);
                q.popped_to(2);
                q.begin(7);
                q.popped_to(3);
            },
            &[],
        );
        assert_eq!(r.pending, vec![0, 7]);
        assert_eq!(r.next_avail, Some(3));
    }

    #[test]
    fn counters_go_on_after_recovery_and_garbage_stays_in_bounds() {
        let mut region = Region::new(8);
        let mut q = region.queue(8);
        q.recover(0, |_| None);
        q.begin(1);
        q.begin(2);
        let mut again = region.queue(8);
        assert_eq!(again.recover(0, |_| None).pending, vec![1, 2]);
        again.begin(0);
        let mut third = region.queue(8);
        assert_eq!(
            third.recover(0, |_| None).pending,
            vec![1, 2, 0],
            "taken after the others"
        );
        // Out-of-range heads from a confused caller or a hostile region change nothing.
        third.begin(8);
        third.returned(100);
        third.used_to(0);
        for byte in region.0.iter_mut() {
            *byte = u64::MAX;
        }
        let mut garbage = region.queue(8);
        let r = garbage.recover(3, |_| None);
        assert!(r.fresh, "version and size do not match: reset");
    }
}
