//! The requests a queue worker handed to its engine and has not returned yet.
//!
//! Each has a record in a [`Table`] until its last engine op completes. The records are kept
//! in place and reused: starting a request writes its fields into a free record, completing
//! it reads them where they are (a record is ~200 bytes; moving one in and out of a slab per
//! request was 7% of a polled null-device queue's time).
//!
//! A request keeps the guest-memory snapshot its iovecs point into mapped until it completes
//! (the front-end may replace the memory table meanwhile). The table counts the requests per
//! snapshot with plain integers and holds one `Arc` per snapshot in use, not one atomic
//! increment and decrement per request while requests overlap (at queue depth 1 each
//! request still takes and lets go of it); a snapshot is let go with its last request (an idle
//! queue pins nothing, so a table the front-end replaced or a region it removed is unmapped
//! as soon as no request uses it).
//!
//! Bounded: at most as many records as requests were in flight at once (the worker's head set
//! caps that at the queue size), and a record gives back any heap a long request made it
//! allocate when it completes.

// Guest-controlled numbers (tags, counts) flow through here: no indexing or arithmetic that
// can panic or wrap silently.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::Arc;
use std::time::Instant;

use vm_memory::GuestAddress;

use super::bounce::Bounce;
use super::stats::OpClass;
use crate::vring::GuestMemory;

/// Host ranges a request writes; inline for the usual few segments.
pub type Written = smallvec::SmallVec<[(usize, usize); 4]>;

/// What a started request is, fixed when it starts.
#[derive(Debug, Clone, Copy)]
pub struct Started {
    /// The chain's head.
    pub head: u16,
    /// Where the status byte goes.
    pub status: GuestAddress,
    /// The used length when it succeeds.
    pub used_len: u32,
    /// Engine ops still outstanding (discard/write-zeroes may have several).
    pub pending: u32,
    /// Its stats class.
    pub class: OpClass,
    /// Its data bytes, for stats.
    pub bytes: u64,
    /// When it started (its latency counts from here).
    pub started: Instant,
}

/// One request's record.
#[derive(Debug)]
pub struct InFlight {
    /// What it is.
    pub request: Started,
    /// The status so far: OK until an op fails.
    pub code: u8,
    /// The aligned stand-in for unaligned guest buffers on a `direct` disk.
    pub bounce: Option<Bounce>,
    /// A read's guest buffers (host address, length), marked in the dirty-page log when it
    /// completes if a migration is running by then (it may have started since).
    pub written: Written,
    /// The snapshot it pins (a [`Pins`] generation).
    pin: u64,
    /// Whether the record holds a request.
    active: bool,
}

/// The records of one queue's requests in flight.
#[derive(Debug, Default)]
pub struct Table {
    records: Vec<InFlight>,
    /// Indexes of inactive records.
    free: Vec<u32>,
    pins: Pins,
}

impl Table {
    /// A table with room for `depth` requests before it grows.
    pub fn with_capacity(depth: usize) -> Self {
        Self {
            records: Vec::with_capacity(depth),
            free: Vec::with_capacity(depth),
            pins: Pins::default(),
        }
    }

    /// Records a request that starts now with its memory snapshot `memory`; returns its tag
    /// (for its engine ops) and its record, whose `bounce` and `written` the caller fills
    /// (both empty here). `None` cannot happen (a free index is always a record's).
    pub fn start(
        &mut self,
        request: Started,
        memory: &Arc<GuestMemory>,
    ) -> Option<(u64, &mut InFlight)> {
        let index = match self.free.pop() {
            Some(index) => index as usize,
            None => {
                self.records.push(InFlight {
                    request,
                    code: 0,
                    bounce: None,
                    written: Written::new(),
                    pin: 0,
                    active: false,
                });
                self.records.len().saturating_sub(1)
            }
        };
        let record = self.records.get_mut(index)?;
        record.request = request;
        record.code = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
        record.pin = self.pins.pin(memory);
        record.active = true;
        Some((index as u64, record))
    }

    /// The active request with tag `tag` and the memory snapshot it pins.
    pub fn get_mut(&mut self, tag: u64) -> Option<(&mut InFlight, &Arc<GuestMemory>)> {
        let index = usize::try_from(tag).ok()?;
        let record = self.records.get_mut(index).filter(|r| r.active)?;
        let memory = self.pins.get(record.pin)?;
        Some((record, memory))
    }

    /// Ends the request with tag `tag` (after its last op): the record is free again, its
    /// snapshot let go if no other request uses it. What it kept for the completion (a bounce
    /// buffer, the written ranges) is cleared, heap included.
    pub fn finish(&mut self, tag: u64) {
        let Ok(index) = usize::try_from(tag) else {
            return;
        };
        let Some(record) = self.records.get_mut(index).filter(|r| r.active) else {
            return;
        };
        record.active = false;
        record.bounce = None;
        if record.written.spilled() {
            // A request with many buffers made the list allocate: do not keep that heap for
            // the record's next request (a guest would pin its largest list in every record).
            record.written = Written::new();
        } else {
            record.written.clear();
        }
        self.pins.unpin(record.pin);
        if let Ok(index) = u32::try_from(index) {
            self.free.push(index);
        }
    }

    /// Requests in flight (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.records.len().saturating_sub(self.free.len())
    }

    /// Snapshots held (for tests).
    #[cfg(test)]
    fn snapshots(&self) -> usize {
        self.pins.held.len()
    }
}

/// Memory snapshots in use and how many requests use each, in the order first pinned (a
/// request QoS held back may pin an older snapshot after a newer one).
#[derive(Debug, Default)]
struct Pins {
    held: Vec<Pin>,
    next: u64,
}

#[derive(Debug)]
struct Pin {
    generation: u64,
    memory: Arc<GuestMemory>,
    users: usize,
}

impl Pins {
    /// Counts one more user of `memory`; returns its generation.
    fn pin(&mut self, memory: &Arc<GuestMemory>) -> u64 {
        if let Some(newest) = self.held.last_mut() {
            if Arc::ptr_eq(&newest.memory, memory) {
                newest.users = newest.users.saturating_add(1);
                return newest.generation;
            }
        }
        let generation = self.next;
        self.next = self.next.wrapping_add(1);
        self.held.push(Pin {
            generation,
            memory: Arc::clone(memory),
            users: 1,
        });
        generation
    }

    fn get(&self, generation: u64) -> Option<&Arc<GuestMemory>> {
        self.held
            .iter()
            .rev()
            .find(|p| p.generation == generation)
            .map(|p| &p.memory)
    }

    /// Counts one user fewer of `generation`; the snapshot goes with its last user.
    fn unpin(&mut self, generation: u64) {
        let Some(position) = self.held.iter().rposition(|p| p.generation == generation) else {
            return;
        };
        let Some(pin) = self.held.get_mut(position) else {
            return;
        };
        pin.users = pin.users.saturating_sub(1);
        if pin.users == 0 {
            self.held.remove(position);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn memory() -> Arc<GuestMemory> {
        Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap())
    }

    fn started(head: u16) -> Started {
        Started {
            head,
            status: GuestAddress(0x10),
            used_len: 1,
            pending: 1,
            class: OpClass::Read,
            bytes: 0,
            started: Instant::now(),
        }
    }

    #[test]
    fn records_are_reused_in_place_and_tags_find_them() {
        let mem = memory();
        let mut table = Table::with_capacity(2);
        let (a, _) = table.start(started(1), &mem).unwrap();
        let (b, _) = table.start(started(2), &mem).unwrap();
        assert_ne!(a, b);
        assert_eq!(table.get_mut(a).unwrap().0.request.head, 1);
        assert_eq!(table.len(), 2);
        table.finish(a);
        assert!(table.get_mut(a).is_none(), "a finished tag finds nothing");
        table.finish(a); // twice: nothing happens
        assert_eq!(table.len(), 1);
        let (c, record) = table.start(started(3), &mem).unwrap();
        assert_eq!(c, a, "the free record is reused");
        assert_eq!(record.code, 0, "a reused record starts OK");
        assert_eq!(table.records.len(), 2, "no new record");
        assert!(table.get_mut(99).is_none());
        assert!(table.get_mut(u64::MAX).is_none());
    }

    #[test]
    fn a_finished_record_keeps_no_heap_and_starts_over_ok() {
        let mem = memory();
        let mut table = Table::default();
        let (tag, record) = table.start(started(1), &mem).unwrap();
        record.written.extend((0..100).map(|i| (i, 1)));
        assert!(record.written.spilled());
        record.code = 10;
        table.finish(tag);
        let (again, record) = table.start(started(2), &mem).unwrap();
        assert_eq!(again, tag);
        assert!(record.written.is_empty() && !record.written.spilled());
        assert_eq!(record.code, 0);
    }

    #[test]
    fn snapshots_are_held_while_used_and_go_with_their_last_request() {
        let old = memory();
        let new = memory();
        let mut table = Table::default();
        let (a, _) = table.start(started(1), &old).unwrap();
        let (b, _) = table.start(started(2), &old).unwrap();
        assert_eq!(Arc::strong_count(&old), 2, "one Arc for both requests");
        // The front-end replaced the memory table: c uses the new one.
        let (c, _) = table.start(started(3), &new).unwrap();
        assert_eq!(table.snapshots(), 2);
        assert!(Arc::ptr_eq(table.get_mut(a).unwrap().1, &old));
        assert!(Arc::ptr_eq(table.get_mut(c).unwrap().1, &new));
        table.finish(a);
        assert_eq!(Arc::strong_count(&old), 2, "still used by b");
        table.finish(b);
        assert_eq!(
            Arc::strong_count(&old),
            1,
            "the old table went with its last request"
        );
        // A request QoS held back with the old table starts after a newer one.
        let (d, _) = table.start(started(4), &old).unwrap();
        assert!(Arc::ptr_eq(table.get_mut(d).unwrap().1, &old));
        assert!(Arc::ptr_eq(table.get_mut(c).unwrap().1, &new));
        table.finish(c);
        table.finish(d);
        assert_eq!(Arc::strong_count(&new), 1, "an idle queue pins no table");
        assert_eq!(Arc::strong_count(&old), 1);
        assert_eq!(table.snapshots(), 0);
        assert_eq!(table.len(), 0);
    }
}
