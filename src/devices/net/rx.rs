//! A guest's receive side.
//!
//! [`RxBatch`] takes enough rx chains for a frame, lets the caller put the bytes in (a tap `readv` straight into them, or a guest-to-guest copy from a switch port),
//! then return exactly the chains used, with `num_buffers` set, in one step.
//!
//! Without `VIRTIO_NET_F_MRG_RXBUF` a frame must fit one chain. With it, a frame may span
//! several chains; they are published together (one used-index store per burst,
//! `ring::burst`: Linux drops a frame whose later buffers are not visible yet). Chains taken but not
//! needed are put back (the ring's next-avail index is rewound), so nothing the guest posted is
//! wasted. A malformed chain is returned with length 0 and counted; chains taken before it in
//! the same batch go back with length 0 too (they cannot be put back past it) — this only
//! happens to a guest that posts bad buffers.
//!
//! [`RxTarget`] is a guest's receive side as switch senders see it: one copy from the
//! sender's frame into the receiver's chains, under that rx queue's lock.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{Address, GuestAddressSpace};

use super::frame::{rx_buffer_into, FrameRef, Frames, RxBuffer, TxFrame};
use super::header::{complete_checksum, NetHeader, F_NEEDS_CSUM, HEADER_LEN};
use super::slots::Slots;
use super::spec::{Negotiated, MAX_CHAIN_DESCRIPTORS, MAX_FRAME_CHAINS};
use super::stats::{Direction, Drop, NetStats, Tally};
use crate::devices::desc::Buffers;
use crate::devices::sg::{copy_between, copy_in, write_stream_in};
use crate::ring::burst::{Burst, PREFETCH_AHEAD};
use crate::ring::dirty::DirtyLog;
use crate::ring::map::{copy, MemMap};
use crate::ring::split::RingError;
use crate::vring::{avail_index, AtomicGuestMemory, CheckedVring, GuestMemory};

/// Chains taken for one frame.
#[derive(Debug, Default)]
pub struct RxBatch {
    /// The chains taken, filled in place in reused slots (they grow to the most chains one
    /// frame ever took: at most a ring).
    buffers: Slots<RxBuffer>,
    capacity: u64,
    /// Scratch for the chain being walked.
    descs: Buffers,
}

/// What [`RxBatch::gather`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gathered {
    /// Enough room for the frame.
    Ready,
    /// The ring ran out first; everything taken was put back.
    Empty,
}

impl RxBatch {
    /// The chains taken so far.
    pub fn buffers(&self) -> &[RxBuffer] {
        self.buffers.used()
    }

    /// Forgets the chains taken (their slots stay for reuse).
    fn reset(&mut self) {
        self.buffers.clear();
        self.capacity = 0;
    }

    /// Their total room.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Takes chains until they hold `need` bytes (header included). Without mergeable
    /// buffers one chain is taken, whatever its size: the caller checks it. `bad` is told
    /// about each malformed chain (returned to the guest with length 0).
    pub fn gather(
        &mut self,
        burst: &mut Burst<'_, '_, '_>,
        memory: &GuestMemory,
        need: u64,
        mergeable: bool,
        mut bad: impl FnMut(Drop),
    ) -> Result<Gathered, RingError> {
        self.reset();
        let map = burst.map();
        // Chains taken for this frame, broken ones included (bounded: `MAX_FRAME_CHAINS`).
        let mut taken = 0usize;
        loop {
            if !self.buffers.is_empty() && (!mergeable || self.capacity >= need) {
                return Ok(Gathered::Ready);
            }
            if taken >= MAX_FRAME_CHAINS {
                // Its chains are too small or broken: treated as a full ring.
                self.put_back(burst);
                return Ok(Gathered::Empty);
            }
            taken = taken.saturating_add(1);
            let popped = match burst.pop(&mut self.descs) {
                Ok(popped) => popped,
                Err(e) => {
                    self.put_back(burst);
                    return Err(e);
                }
            };
            let Some((head, walked)) = popped else {
                self.put_back(burst);
                return Ok(Gathered::Empty);
            };
            let slot = self.buffers.next_free();
            let checked = walked
                .map_err(|_| Drop::BrokenChain)
                .and_then(|()| rx_buffer_into(memory, map, head, &self.descs, slot));
            match checked {
                Ok(()) => {
                    self.capacity = self.capacity.saturating_add(u64::from(slot.capacity));
                    self.buffers.keep();
                }
                Err(reason) => {
                    // The chains before it cannot be put back past it: all go back empty.
                    bad(reason);
                    for taken in self.buffers() {
                        burst.used(taken.head, 0);
                    }
                    burst.used(head, 0);
                    self.reset();
                }
            }
        }
    }

    /// Puts every chain taken back into the ring.
    pub fn put_back(&mut self, burst: &mut Burst<'_, '_, '_>) {
        // At most a ring's worth of chains is ever taken, which fits in u16.
        burst.unpop(u16::try_from(self.buffers.len()).unwrap_or(u16::MAX));
        self.reset();
    }

    /// Returns the chains holding the first `len` bytes (header included) to the guest and
    /// puts the rest back. Writes `num_buffers` into the header first, unless `header` says
    /// it holds the right value already (one buffer, written with 1). The used entries
    /// become visible with the burst's other entries, in one index store (Linux reads a
    /// mergeable frame's buffers at once and drops it if some are missing).
    pub fn commit(
        &mut self,
        burst: &mut Burst<'_, '_, '_>,
        memory: &GuestMemory,
        len: u64,
        header: Header,
    ) {
        let mut count = 0u16;
        let mut left = len;
        for buffer in self.buffers() {
            if left == 0 && count > 0 {
                break;
            }
            let take = left.min(u64::from(buffer.capacity));
            // `take <= capacity`, a u32.
            burst.used(buffer.head, u32::try_from(take).unwrap_or(u32::MAX));
            left = left.saturating_sub(take);
            count = count.saturating_add(1);
        }
        // A frame in one buffer whose header the caller wrote with `num_buffers` 1 has it
        // already (a call and a copy per frame saved on the switch's usual path); a tap
        // writes the header without it.
        let written = header == Header::WrittenForOneBuffer && count == 1;
        if let Some(first) = self.buffers().first().filter(|_| !written) {
            // `num_buffers` is the last field of the 12-byte header; the chain was checked
            // to hold the header, so this cannot fail on a valid map.
            let offset = (HEADER_LEN as u64).saturating_sub(2);
            let bytes = count.to_le_bytes();
            if write_stream_in(memory, burst.map(), &first.spans, offset, &bytes).is_err() {
                log::debug!("rx header write failed");
            }
        }
        // Every byte is in now (num_buffers last, or already): mark what was written.
        if let Some(log) = burst.log() {
            let mut left = len;
            for buffer in self.buffers().iter().take(usize::from(count)) {
                let take = left.min(u64::from(buffer.capacity));
                mark_spans(log, &buffer.spans, take);
                left = left.saturating_sub(take);
            }
        }
        // The unused chains were taken after the used ones: they go back into the ring.
        let unused = self.buffers.len().saturating_sub(usize::from(count));
        burst.unpop(u16::try_from(unused).unwrap_or(u16::MAX));
        self.reset();
    }
}

/// What the first buffer's virtio header holds when a frame is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// Written with `num_buffers` 1 (the switch's copies).
    WrittenForOneBuffer,
    /// Anything else in `num_buffers` (a tap leaves the field as it was).
    NumBuffersUnset,
}

/// Marks the first `len` bytes of `spans` dirty (they were written).
fn mark_spans(log: &DirtyLog, spans: &[crate::devices::sg::Span], len: u64) {
    let mut left = len;
    for span in spans {
        if left == 0 {
            break;
        }
        let take = left.min(u64::from(span.len));
        log.mark(span.addr.0, take);
        left = left.saturating_sub(take);
    }
}

/// A guest's receive side as seen by senders: its rx queues, memory and offloads.
pub struct RxTarget {
    /// The rx vring of each queue pair, set once when the connection's vrings are created.
    queues: std::sync::OnceLock<Vec<CheckedVring>>,
    memory: AtomicGuestMemory,
    /// The device's acked feature bits (shared with it; decoded per frame, no lock).
    features: Arc<AtomicU64>,
    /// The receiver's dirty-page log (live migration).
    log: Arc<DirtyLog>,
}

impl RxTarget {
    /// A receive side whose rx queues are given later ([`RxTarget::set_queues`]).
    pub fn new(memory: AtomicGuestMemory, features: Arc<AtomicU64>, log: Arc<DirtyLog>) -> Self {
        Self {
            queues: std::sync::OnceLock::new(),
            memory,
            features,
            log,
        }
    }

    /// Records the rx vring of every queue pair (once per connection).
    pub fn set_queues(&self, queues: Vec<CheckedVring>) {
        if self.queues.set(queues).is_err() {
            log::warn!("rx queues given twice for one connection; keeping the first");
        }
    }

    /// Locks the rx queue for a flow: the one `hash` picks, or the next usable one if that
    /// one is stopped or disabled. One vring lock per frame.
    fn lock_queue(
        &self,
        hash: usize,
    ) -> Option<(
        &CheckedVring,
        std::sync::MutexGuard<'_, vhost_user_backend::VringState<AtomicGuestMemory>>,
    )> {
        let queues = self.queues.get()?;
        let count = queues.len();
        let start = hash.checked_rem(count.max(1)).unwrap_or(0);
        (0..count).find_map(|i| {
            let vring = queues.get(start.saturating_add(i).checked_rem(count)?)?;
            if vring.size_rejected() {
                return None;
            }
            let state = vring.get_mut();
            (state.get_queue().ready() && state.is_enabled()).then_some((vring, state))
        })
    }

    /// Copies `frame` into the guest's rx buffers and returns them (one frame: tests).
    #[cfg(test)]
    pub fn deliver(&self, frame: &FrameRef<'_>, hash: usize, stats: &NetStats) -> Result<(), Drop> {
        let mut result = Err(Drop::LinkDown);
        self.deliver_burst(std::slice::from_ref(frame), &[0], hash, stats, |_, r| {
            result = r
        });
        result
    }

    /// Copies `frames[i]` for each `i` in `picks`, in that order, into the guest's rx buffers:
    /// one lock of one rx queue (picked by `hash`), one used-index store and at most one
    /// interrupt for all of them. `outcome` hears about each frame.
    pub fn deliver_burst<F: Frames + ?Sized>(
        &self,
        frames: &F,
        picks: &[u16],
        hash: usize,
        stats: &NetStats,
        mut outcome: impl FnMut(u16, Result<(), Drop>),
    ) {
        let negotiated = Negotiated::from_features(self.features.load(Ordering::Acquire));
        let Some((vring, mut state)) = self.lock_queue(hash) else {
            picks.iter().for_each(|&i| outcome(i, Err(Drop::LinkDown)));
            return;
        };
        // The avail index before the memory snapshot (see `Burst::up_to`).
        let end = avail_index(state.get_queue(), &self.memory);
        let memory = self.memory.memory();
        let map = MemMap::new(&memory);
        let mut burst = match Burst::bounded(state.get_queue_mut(), &map, end) {
            Ok(burst) => burst
                .with_log(Some(&self.log))
                .limit_walk(MAX_CHAIN_DESCRIPTORS),
            Err(e) => {
                log::debug!("rx ring refused: {e}");
                picks
                    .iter()
                    .for_each(|&i| outcome(i, Err(Drop::BrokenChain)));
                return;
            }
        };
        SCRATCH.with(|scratch| {
            // One scratch per sending thread, reused: no allocation per frame.
            let mut scratch = scratch.borrow_mut();
            // Once the ring has no room for a frame, the rest of this delivery is dropped
            // without walking the ring again: a receiver posting tiny or broken buffers costs
            // its senders one walk of its ring per delivery, not one per frame.
            let mut full = None;
            let mut tally = Tally::default();
            // A frame takes one chain unless it is larger than the receiver's buffers.
            burst.prefetch_start(u16::try_from(picks.len()).unwrap_or(u16::MAX), true);
            for &i in picks {
                burst.prefetch(PREFETCH_AHEAD, true);
                let Some(frame) = frames.frame(usize::from(i)) else {
                    continue;
                };
                let result = match full {
                    Some(reason) => Err(reason),
                    None => {
                        deliver_one(&mut burst, &memory, &frame, negotiated, &mut scratch, stats)
                    }
                };
                match result {
                    Ok(()) => tally.add(u64::from(frame.len())),
                    Err(reason @ (Drop::NoRxBuffers | Drop::TooLarge)) => full = Some(reason),
                    Err(_) => {}
                }
                outcome(i, result);
            }
            stats.received_tally(tally);
        });
        if burst.finish() {
            if let Err(e) = vring.signal_locked(&state) {
                log::debug!("rx notify failed: {e}");
            }
        }
    }
}

/// A sending thread's reusable buffers for deliveries.
#[derive(Default)]
struct Scratch {
    batch: RxBatch,
    /// A frame linearised for a software checksum.
    linear: Vec<u8>,
}

thread_local! {
    /// The scratch of the current sending thread.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Copies one frame into the chains `burst` offers.
fn deliver_one(
    burst: &mut Burst<'_, '_, '_>,
    memory: &GuestMemory,
    frame: &FrameRef<'_>,
    negotiated: Negotiated,
    scratch: &mut Scratch,
    stats: &NetStats,
) -> Result<(), Drop> {
    let Scratch { batch, linear } = scratch;
    let header = frame.header();
    if header.is_gso() && !negotiated.accepts_gso(header.gso_type) {
        return Err(Drop::GsoUnsupported);
    }
    let checksummed;
    let frame = if header.flags & F_NEEDS_CSUM != 0 && !negotiated.guest_csum {
        frame.linearise_into(linear)?;
        complete_checksum(linear, &header).map_err(|_| Drop::BadHeader)?;
        checksummed = FrameRef::Bytes {
            header: NetHeader {
                flags: 0,
                csum_start: 0,
                csum_offset: 0,
                ..header
            },
            frame: linear,
        };
        &checksummed
    } else {
        frame
    };
    let frame_len = u64::from(frame.len());
    let need = frame_len.saturating_add(HEADER_LEN as u64);
    if deliver_single(burst, frame, need) {
        return Ok(());
    }
    let gathered = batch.gather(burst, memory, need, negotiated.mergeable_rx, |reason| {
        stats.dropped(Direction::Rx, reason)
    });
    match gathered {
        Ok(Gathered::Ready) => {}
        Ok(Gathered::Empty) => return Err(Drop::NoRxBuffers),
        Err(_) => return Err(Drop::BrokenChain),
    }
    if batch.capacity() < need {
        batch.put_back(burst);
        return Err(Drop::TooLarge);
    }
    let out_header = NetHeader {
        num_buffers: 1,
        ..frame.header()
    };
    if fill(memory, burst.map(), batch, &out_header, frame) != Ok(frame_len) {
        batch.put_back(burst);
        return Err(Drop::BadAddress);
    }
    batch.commit(burst, memory, need, Header::WrittenForOneBuffer);
    Ok(())
}

/// [`deliver_one`] for the usual case, without gathering: a guest frame in one buffer of
/// its sender, into the next rx chain if that is one writable buffer, all guest memory, with
/// room for all of it (read with one descriptor load, no walk, no spans), copied by
/// [`fill_mapped_at`]. False: not that case, and the chain (if one was taken) is back in the
/// ring for the general way, which takes it again and says why.
fn deliver_single(burst: &mut Burst<'_, '_, '_>, frame: &FrameRef<'_>, need: u64) -> bool {
    // Nothing taken for a frame `fill_mapped_at` would refuse whatever the buffer.
    if one_buffer_source(frame, need).is_none() {
        return false;
    }
    let Ok(min) = u32::try_from(need) else {
        return false;
    };
    let Ok(Some((head, addr, len))) = burst.pop_single(true, min) else {
        return false;
    };
    let header = NetHeader {
        num_buffers: 1,
        ..frame.header()
    };
    if fill_mapped_at(burst.map(), addr, u64::from(len), &header, frame).is_none() {
        burst.unpop(1);
        return false;
    }
    burst.used(head, min);
    if let Some(log) = burst.log() {
        log.mark(addr, need);
    }
    true
}

/// A guest frame whose sender put header and frame (`need` bytes) in one buffer mapped by
/// its burst: the sender's map, the checked frame and that buffer's guest address.
fn one_buffer_source<'a>(
    frame: &FrameRef<'a>,
    need: u64,
) -> Option<(&'a MemMap<'a>, &'a TxFrame, u64)> {
    let FrameRef::Guest {
        map: Some(from),
        frame: sent,
        ..
    } = *frame
    else {
        return None;
    };
    match sent.spans.as_slice() {
        [src] if u64::from(src.len) >= need => Some((from, sent, src.addr.raw_value())),
        _ => None,
    }
}

/// Writes header and frame into the batch's chains; returns the frame bytes copied.
fn fill(
    memory: &GuestMemory,
    map: &MemMap<'_>,
    batch: &RxBatch,
    header: &NetHeader,
    frame: &FrameRef<'_>,
) -> Result<u64, Drop> {
    let first = batch.buffers().first().ok_or(Drop::NoRxBuffers)?;
    if let Some(done) = fill_mapped(map, first, header, frame) {
        return Ok(done);
    }
    write_stream_in(memory, map, &first.spans, 0, &header.to_bytes())?;
    let done = copy_frame(memory, batch, frame)?;
    // The receiver gets the Ethernet header the switch checked, not whatever the sender's
    // memory holds by now.
    if let Some(eth) = frame.checked_ethernet() {
        let mut rest: &[u8] = eth
            .get(..usize::try_from(done).unwrap_or(0).min(eth.len()))
            .unwrap_or_default();
        for (i, buffer) in batch.buffers().iter().enumerate() {
            if rest.is_empty() {
                break;
            }
            let skip = if i == 0 { HEADER_LEN as u64 } else { 0 };
            let n = usize::try_from(copy_in(memory, &buffer.spans, skip, rest)?).unwrap_or(0);
            rest = rest.get(n..).unwrap_or_default();
        }
    }
    Ok(done)
}

/// [`fill`] for the usual case, in three copies and no region search: a guest frame in one
/// buffer of its sender (header included), to one receive buffer with room for it all, each
/// inside one region of its burst's map. `None`: not that case (or not mapped so), and the
/// caller copies the general way (which writes every byte again).
fn fill_mapped(
    map: &MemMap<'_>,
    first: &RxBuffer,
    header: &NetHeader,
    frame: &FrameRef<'_>,
) -> Option<u64> {
    let [dst] = first.spans.as_slice() else {
        return None;
    };
    fill_mapped_at(map, dst.addr.raw_value(), u64::from(dst.len), header, frame)
}

/// [`fill_mapped`] into the `room` guest bytes at `dst`.
fn fill_mapped_at(
    map: &MemMap<'_>,
    dst: u64,
    room: u64,
    header: &NetHeader,
    frame: &FrameRef<'_>,
) -> Option<u64> {
    let len = u64::from(frame.len());
    let need = len.checked_add(HEADER_LEN as u64)?;
    let (from, sent, src) = one_buffer_source(frame, need)?;
    if room < need {
        return None;
    }
    let (src_frame, dst_frame) = (
        src.checked_add(HEADER_LEN as u64)?,
        dst.checked_add(HEADER_LEN as u64)?,
    );
    // Both ranges whole in one region each before anything is written: a refusal leaves the
    // receiver's memory as it was (nothing written that the dirty log would not know of).
    // The receiver's whole buffer, not just the bytes this frame fills, as the general way
    // checks it (one lookup for both).
    from.host(src_frame, len)?;
    map.host(dst, room)?;
    if !map.write(dst, &header.to_bytes()) || !copy(from, src_frame, map, dst_frame, len) {
        return None;
    }
    // The receiver gets the Ethernet header the switch checked (see `fill`).
    let n = usize::try_from(len)
        .unwrap_or(usize::MAX)
        .min(sent.eth.len());
    if !map.write(dst_frame, sent.eth.get(..n)?) {
        return None;
    }
    Some(len)
}

/// Copies the frame's bytes into the batch's chains after the header; returns how many.
fn copy_frame(memory: &GuestMemory, batch: &RxBatch, frame: &FrameRef<'_>) -> Result<u64, Drop> {
    let total = u64::from(frame.len());
    let mut done = 0u64;
    for (i, buffer) in batch.buffers().iter().enumerate() {
        if done >= total {
            break;
        }
        let skip = if i == 0 { HEADER_LEN as u64 } else { 0 };
        let room = u64::from(buffer.capacity).saturating_sub(skip);
        let chunk = room.min(total.saturating_sub(done));
        let copied = match frame {
            FrameRef::Guest {
                memory: src_memory,
                frame: sent,
                ..
            } => copy_between(
                src_memory,
                &sent.spans,
                (HEADER_LEN as u64).saturating_add(done),
                memory,
                &buffer.spans,
                skip,
                chunk,
            )?,
            FrameRef::Bytes { frame, .. } => {
                let start = usize::try_from(done).unwrap_or(usize::MAX);
                let end = usize::try_from(done.saturating_add(chunk)).unwrap_or(usize::MAX);
                copy_in(
                    memory,
                    &buffer.spans,
                    skip,
                    frame.get(start..end).unwrap_or_default(),
                )?
            }
        };
        done = done.saturating_add(copied);
        if copied < chunk {
            break;
        }
    }
    Ok(done)
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};

    /// A 256-entry rx ring of `chains` one-buffer chains of 512 bytes, all published,
    /// device-writable (`flags` 2) or, with `flags` 0, readable (refused as rx buffers).
    fn ring(mem: &GuestMemory, chains: u16, flags: u16) -> Queue {
        let mock = MockSplitQueue::new(mem, 256);
        for i in 0..chains {
            let d = SplitDescriptor::new(0x10_0000 + u64::from(i) * 512, 512, flags, 0);
            mock.desc_table().store(i, RawDescriptor::from(d)).unwrap();
            let slot = mock.avail_addr().0 + 4 + 2 * u64::from(i);
            mem.write_obj(i, GuestAddress(slot)).unwrap();
        }
        mem.write_obj(chains, GuestAddress(mock.avail_addr().0 + 2))
            .unwrap();
        mock.create_queue().unwrap()
    }

    #[test]
    fn a_frame_takes_at_most_max_frame_chains_then_the_ring_counts_as_full() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let mut queue = ring(&mem, 200, 2);
        let map = MemMap::new(&mem);
        let mut burst = Burst::new(&mut queue, &map).unwrap();
        let mut batch = RxBatch::default();
        let per = 512u64;
        // Exactly MAX_FRAME_CHAINS chains: taken.
        let need = per * MAX_FRAME_CHAINS as u64;
        let got = batch.gather(&mut burst, &mem, need, true, |_| {});
        assert_eq!(got, Ok(Gathered::Ready));
        assert_eq!(batch.buffers().len(), MAX_FRAME_CHAINS);
        batch.put_back(&mut burst);
        // One byte more would take one chain more: the walk stops and puts everything back.
        let got = batch.gather(&mut burst, &mem, need + 1, true, |_| {});
        assert_eq!(got, Ok(Gathered::Empty));
        assert_eq!(burst.next_avail(), 0, "every chain put back");
        let _ = burst.finish();
    }

    #[test]
    fn commit_writes_num_buffers_unless_the_header_was_written_with_one() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let mut queue = ring(&mem, 8, 2);
        let map = MemMap::new(&mem);
        let mut burst = Burst::new(&mut queue, &map).unwrap();
        let mut batch = RxBatch::default();
        let num_buffers = |i: u64| {
            mem.read_obj::<u16>(GuestAddress(0x10_0000 + i * 512 + 10))
                .unwrap()
        };
        for i in 0..3u64 {
            mem.write_obj(0xffffu16, GuestAddress(0x10_0000 + i * 512 + 10))
                .unwrap();
        }
        // A tap's frame in one buffer: the field is written.
        assert_eq!(
            batch.gather(&mut burst, &mem, 100, true, |_| {}),
            Ok(Gathered::Ready)
        );
        batch.commit(&mut burst, &mem, 100, Header::NumBuffersUnset);
        assert_eq!(num_buffers(0), 1);
        // A switch copy in one buffer: the field is left as `fill` wrote it.
        assert_eq!(
            batch.gather(&mut burst, &mem, 100, true, |_| {}),
            Ok(Gathered::Ready)
        );
        batch.commit(&mut burst, &mem, 100, Header::WrittenForOneBuffer);
        assert_eq!(num_buffers(1), 0xffff, "not written twice");
        // Two buffers: written whatever the caller wrote.
        assert_eq!(
            batch.gather(&mut burst, &mem, 600, true, |_| {}),
            Ok(Gathered::Ready)
        );
        batch.commit(&mut burst, &mem, 600, Header::WrittenForOneBuffer);
        assert_eq!(num_buffers(2), 2);
        let _ = burst.finish();
    }

    #[test]
    fn refused_chains_count_toward_the_cap_too() {
        // A ring of chains no frame can use: one frame's walk stops after MAX_FRAME_CHAINS of
        // them (each returned empty), not at the end of the ring.
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let mut queue = ring(&mem, 200, 0);
        let map = MemMap::new(&mem);
        let mut burst = Burst::new(&mut queue, &map).unwrap();
        let mut batch = RxBatch::default();
        let mut refused = 0usize;
        let got = batch.gather(&mut burst, &mem, 64, true, |_| refused += 1);
        assert_eq!(got, Ok(Gathered::Empty));
        assert_eq!(refused, MAX_FRAME_CHAINS, "walked no further than the cap");
        assert_eq!(usize::from(burst.next_avail()), MAX_FRAME_CHAINS);
        let _ = burst.finish();
    }
}
