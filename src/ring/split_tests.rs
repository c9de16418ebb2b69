//! The split ring against virtio-queue's reading of the same rings (the reference), and
//! against broken rings a hostile driver can build.

use super::*;
use crate::devices::desc::collect_buffers;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes};

use crate::ring::burst::Burst;
use crate::vring::GuestMemory;

fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// Publishes `heads` in the avail ring (after what is there).
fn publish(mem: &GuestMemory, mock: &MockSplitQueue<GuestMemory>, heads: &[u16]) {
    let avail = mock.avail_addr();
    let idx: u16 = mem.read_obj(avail.unchecked_add(2)).unwrap();
    let size = mock.create_queue::<Queue>().unwrap().size();
    for (i, h) in heads.iter().enumerate() {
        let slot = (idx.wrapping_add(i as u16) % size) as u64;
        mem.write_obj(*h, avail.unchecked_add(4 + 2 * slot))
            .unwrap();
    }
    mem.write_obj(idx.wrapping_add(heads.len() as u16), avail.unchecked_add(2))
        .unwrap();
}

/// A tiny deterministic generator (no dependency for one test).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_direct_chains_read_as_virtio_queue_reads_them() {
    let mem = memory();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut checked = 0;
    for round in 0..400 {
        let size = 1u16 << (rng.next() % 5 + 1);
        let mock = MockSplitQueue::new(&mem, size);
        for i in 0..size {
            let flags = (rng.next() % 4) as u16; // NEXT and WRITE, never INDIRECT
            let next = (rng.next() % (u64::from(size) + 2)) as u16; // sometimes out of range
            let d = desc(
                0x8_0000 + rng.next() % 0x1000,
                (rng.next() % 4096) as u32,
                flags,
                next,
            );
            mock.desc_table().store(i, d).unwrap();
        }
        let heads: Vec<u16> = (0..size)
            .map(|_| (rng.next() % (u64::from(size) + 1)) as u16)
            .collect();
        publish(&mem, &mock, &heads);
        let mut reference: Queue = mock.create_queue().unwrap();
        let mut ours: Queue = mock.create_queue().unwrap();
        let map = MemMap::new(&mem);
        let mut burst = Burst::new(&mut ours, &map).unwrap();
        let mut out = Buffers::new();
        for _ in 0..size {
            let theirs = reference.pop_descriptor_chain(&mem);
            let (head, walked) = burst.pop(&mut out).unwrap().unwrap();
            match theirs {
                Some(chain) => {
                    assert_eq!(chain.head_index(), head, "round {round}");
                    match collect_buffers(chain) {
                        Ok(buffers) => {
                            assert_eq!(walked, Ok(()), "round {round} head {head}");
                            assert_eq!(&buffers[..], &out[..], "round {round} head {head}");
                            checked += 1;
                        }
                        Err(_) => assert_eq!(walked, Err(BrokenChain), "round {round}"),
                    }
                }
                // virtio-queue ends the iteration on a head beyond the table.
                None => assert_eq!(walked, Err(BrokenChain), "round {round} head {head}"),
            }
        }
        assert!(burst.pop(&mut out).unwrap().is_none());
        let _ = burst.finish();
    }
    assert!(checked > 500, "too few valid chains compared: {checked}");
}

#[test]
fn an_indirect_table_is_walked_and_its_abuses_are_refused() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, 8);
    let table = 0x9_0000u64;
    for (i, d) in [
        desc(0xa_0000, 12, 0, 1),
        desc(0xa_1000, 100, F_NEXT, 2),
        desc(0xa_2000, 1, F_WRITE, 0),
    ]
    .iter()
    .enumerate()
    {
        let d = SplitDescriptor::from(*d);
        let d = desc(
            d.addr().0,
            d.len(),
            d.flags() | if i < 2 { F_NEXT } else { 0 },
            d.next(),
        );
        mem.write_obj(d, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let cases: [(RawDescriptor, bool); 6] = [
        (desc(table, 48, F_INDIRECT, 0), true),
        (desc(table, 40, F_INDIRECT, 0), false), // not whole descriptors
        (desc(table, 0, F_INDIRECT, 0), false),  // empty
        (desc(table, 48, F_INDIRECT | F_NEXT, 1), false), // indirect and next
        (desc(0x20_0000, 48, F_INDIRECT, 0), false), // unmapped table
        (desc(0x10_0000 - 16, 32, F_INDIRECT, 0), false), // runs off the end
    ];
    let mut out = Buffers::new();
    for (i, (d, _)) in cases.iter().enumerate() {
        mock.desc_table().store(i as u16, *d).unwrap();
        publish(&mem, &mock, &[i as u16]);
    }
    let mut queue: Queue = mock.create_queue().unwrap();
    let map = MemMap::new(&mem);
    let mut burst = Burst::new(&mut queue, &map).unwrap();
    for (i, (_, ok)) in cases.iter().enumerate() {
        let (head, walked) = burst.pop(&mut out).unwrap().unwrap();
        assert_eq!(head, i as u16);
        assert_eq!(walked.is_ok(), *ok, "case {i}");
        if *ok {
            assert_eq!(out.len(), 3);
            assert_eq!(out[2].addr, GuestAddress(0xa_2000));
            assert!(out[2].writable && !out[0].writable);
        }
    }
    // A table that points into itself in a loop, and one nesting another table.
    mem.write_obj(desc(0xa_0000, 1, F_NEXT, 1), GuestAddress(table))
        .unwrap();
    mem.write_obj(desc(0xa_0000, 1, F_NEXT, 0), GuestAddress(table + 16))
        .unwrap();
    mock.desc_table()
        .store(6, desc(table, 32, F_INDIRECT, 0))
        .unwrap();
    mem.write_obj(desc(table, 32, F_INDIRECT, 0), GuestAddress(table + 0x100))
        .unwrap();
    mock.desc_table()
        .store(7, desc(table + 0x100, 16, F_INDIRECT, 0))
        .unwrap();
    publish(&mem, &mock, &[6, 7]);
    assert_eq!(burst.pop(&mut out).unwrap().unwrap().1, Err(BrokenChain));
    assert_eq!(burst.pop(&mut out).unwrap().unwrap().1, Err(BrokenChain));
    let _ = burst.finish();
}

#[test]
fn rings_that_are_misaligned_unmapped_or_run_ahead_are_refused() {
    let mem = GuestMemory::from_ranges(&[
        (GuestAddress(0), 0x1_0000),
        (GuestAddress(0x1_0000), 0x1_0000),
    ])
    .unwrap();
    let map = MemMap::new(&mem);
    let mut queue = Queue::new(16).unwrap();
    queue.set_size(16);
    queue.set_avail_ring_address(Some(0x2000), Some(0));
    queue.set_used_ring_address(Some(0x3000), Some(0));
    // virtio-queue already ignores misaligned ring addresses; our own check stands behind it.
    assert_eq!(
        area(&map, 0x1008, 256, 16).unwrap_err(),
        RingError::Misaligned(0x1008)
    );
    queue.set_desc_table_address(Some(0xff80), Some(0)); // 256 bytes over two regions
    assert_eq!(
        SplitRing::new(&map, &queue).unwrap_err(),
        RingError::Unmapped(0xff80)
    );
    queue.set_desc_table_address(Some(0x1000), Some(0));
    let ring = SplitRing::new(&map, &queue).unwrap();
    mem.write_obj(17u16, GuestAddress(0x2002)).unwrap();
    assert_eq!(
        ring.pending(0),
        Err(RingError::AvailIndex { avail: 17, next: 0 })
    );
    mem.write_obj(16u16, GuestAddress(0x2002)).unwrap();
    assert_eq!(ring.pending(0), Ok(16));
    mem.write_obj(0u16, GuestAddress(0x2002)).unwrap();
    assert_eq!(ring.pending(65535), Ok(1), "indices wrap");
}

/// Chains `heads` (one writable buffer each) written and published on the fixed ring.
fn publish_fixed(mem: &GuestMemory, heads: std::ops::Range<u16>) {
    for i in heads.clone() {
        mem.write_obj(
            desc(0x8_0000, 64, F_WRITE, 0),
            GuestAddress(16 * u64::from(i)),
        )
        .unwrap();
        mem.write_obj(i, GuestAddress(0x1004 + 2 * u64::from(i)))
            .unwrap();
    }
    mem.write_obj(heads.end, GuestAddress(0x1002)).unwrap();
}

/// A ring of `size` at fixed places (virtio-queue's mock lays its used ring over the avail
/// ring's `used_event`, which this test needs): descriptors at 0, avail at 0x1000, used at
/// 0x2000; chains `0..heads` each one writable buffer, all published.
fn fixed_ring(mem: &GuestMemory, size: u16, heads: u16) -> Queue {
    publish_fixed(mem, 0..heads);
    let mut queue = Queue::new(size).unwrap();
    queue.set_size(size);
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(0x1000), Some(0));
    queue.set_used_ring_address(Some(0x2000), Some(0));
    queue.set_ready(true);
    queue
}

#[test]
fn used_entries_appear_together_and_signal_as_event_idx_says() {
    let mem = memory();
    let mut queue = fixed_ring(&mem, 16, 4);
    queue.set_event_idx(true);
    // The driver asks for an interrupt once the used index passes 2.
    let used_event = GuestAddress(0x1000 + 4 + 2 * 16);
    mem.write_obj(2u16, used_event).unwrap();
    let used_idx = |mem: &GuestMemory| mem.read_obj::<u16>(GuestAddress(0x2002)).unwrap();
    let map = MemMap::new(&mem);
    let mut out = Buffers::new();
    {
        let mut burst = Burst::new(&mut queue, &map).unwrap();
        let (a, _) = burst.pop(&mut out).unwrap().unwrap();
        let (b, _) = burst.pop(&mut out).unwrap().unwrap();
        burst.used(a, 10);
        burst.used(b, 20);
        assert_eq!(used_idx(&mem), 0, "nothing visible before the burst ends");
        assert!(!burst.finish(), "used index 2 does not pass used_event 2");
    }
    assert_eq!(used_idx(&mem), 2);
    assert_eq!(queue.next_avail(), 2);
    assert_eq!(queue.next_used(), 2);
    {
        let mut burst = Burst::new(&mut queue, &map).unwrap();
        let (c, _) = burst.pop(&mut out).unwrap().unwrap();
        let (_, _) = burst.pop(&mut out).unwrap().unwrap();
        burst.unpop(1);
        burst.used(c, 30);
        assert!(burst.finish(), "used index 3 passes used_event 2");
    }
    assert_eq!(
        queue.next_avail(),
        3,
        "the chain put back is taken again later"
    );
    let id: u32 = mem.read_obj(GuestAddress(0x2004 + 8 * 2)).unwrap();
    let len: u32 = mem.read_obj(GuestAddress(0x2008 + 8 * 2)).unwrap();
    assert_eq!((id, len), (2, 30));
    // Without EVENT_IDX the avail ring's NO_INTERRUPT flag decides.
    queue.set_event_idx(false);
    mem.write_obj(AVAIL_NO_INTERRUPT, GuestAddress(0x1000))
        .unwrap();
    let mut burst = Burst::new(&mut queue, &map).unwrap();
    let (d, _) = burst.pop(&mut out).unwrap().unwrap();
    burst.used(d, 0);
    assert!(!burst.finish());
}

#[test]
fn kicks_are_suppressed_with_one_store_and_left_alone_under_event_idx() {
    let mem = memory();
    let mut queue = fixed_ring(&mem, 16, 0);
    let flags = GuestAddress(0x2000);
    let map = MemMap::new(&mem);
    let ring = SplitRing::new(&map, &queue).unwrap();
    assert!(ring.suppress_kicks(), "the flag is written");
    assert_eq!(mem.read_obj::<u16>(flags).unwrap(), USED_NO_NOTIFY);
    assert!(!ring.suppress_kicks(), "already set: no second store");
    // The driver's view after a queue reset: flags cleared, kicks wanted again.
    mem.write_obj(0u16, flags).unwrap();
    assert!(ring.suppress_kicks());
    assert_eq!(mem.read_obj::<u16>(flags).unwrap(), USED_NO_NOTIFY);
    // Under EVENT_IDX the flags are not ours to use.
    mem.write_obj(0u16, flags).unwrap();
    queue.set_event_idx(true);
    let ring = SplitRing::new(&map, &queue).unwrap();
    assert!(!ring.suppress_kicks());
    assert_eq!(mem.read_obj::<u16>(flags).unwrap(), 0);
    // virtio-queue turns them back on as it always did.
    queue.set_event_idx(false);
    mem.write_obj(USED_NO_NOTIFY, flags).unwrap();
    queue.enable_notification(&mem).unwrap();
    assert_eq!(mem.read_obj::<u16>(flags).unwrap(), 0);
}

#[test]
fn a_burst_unwound_by_a_panic_still_publishes_what_it_used() {
    let mem = memory();
    let mut queue = fixed_ring(&mem, 4, 1);
    let map = MemMap::new(&mem);
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut out = Buffers::new();
        let mut burst = Burst::new(&mut queue, &map).unwrap();
        let (h, _) = burst.pop(&mut out).unwrap().unwrap();
        burst.used(h, 1);
        panic!("a bug mid-burst");
    }));
    assert!(unwound.is_err());
    assert_eq!(mem.read_obj::<u16>(GuestAddress(0x2002)).unwrap(), 1);
    assert_eq!(queue.next_avail(), 1);
}

#[test]
fn a_burst_takes_at_most_a_ring_however_fast_the_driver_publishes() {
    let mem = memory();
    let mut queue = fixed_ring(&mem, 4, 4);
    let map = MemMap::new(&mem);
    let mut out = Buffers::new();
    let mut burst = Burst::new(&mut queue, &map).unwrap();
    let mut taken = 0;
    loop {
        match burst.pop(&mut out) {
            Ok(Some((head, _))) => {
                taken += 1;
                burst.used(head, 0);
                // The driver sees nothing used yet, but publishes one more each time.
                let idx: u16 = mem.read_obj(GuestAddress(0x1002)).unwrap();
                mem.write_obj(idx.wrapping_add(1), GuestAddress(0x1002))
                    .unwrap();
            }
            Ok(None) => panic!("the driver always has more"),
            Err(RingError::AvailIndex { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(taken, 4, "one ring's worth, then the ring is broken");
    let _ = burst.finish();
}

#[test]
fn a_head_outside_the_ring_is_never_returned() {
    let mem = memory();
    let mut queue = fixed_ring(&mem, 4, 2);
    mem.write_obj(9u16, GuestAddress(0x1004)).unwrap(); // avail slot 0: head 9 of 4
    let map = MemMap::new(&mem);
    let mut out = Buffers::new();
    let mut burst = Burst::new(&mut queue, &map).unwrap();
    let (bad, walked) = burst.pop(&mut out).unwrap().unwrap();
    assert_eq!((bad, walked), (9, Err(BrokenChain)));
    burst.used(bad, 0);
    let (good, _) = burst.pop(&mut out).unwrap().unwrap();
    burst.used(good, 7);
    let _ = burst.finish();
    assert_eq!(mem.read_obj::<u16>(GuestAddress(0x2002)).unwrap(), 1);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x2004)).unwrap(), 1);
}

#[test]
fn a_bounded_burst_takes_nothing_published_after_its_bound() {
    let mem = memory();
    let mut queue = fixed_ring(&mem, 8, 2);
    let map = MemMap::new(&mem);
    let mut out = Buffers::new();
    // The driver publishes two more after the worker read index 2 and took its snapshot.
    publish_fixed(&mem, 2..4);
    let mut burst = Burst::bounded(&mut queue, &map, Some(2)).unwrap();
    assert!(burst.pop(&mut out).unwrap().is_some());
    assert!(burst.pop(&mut out).unwrap().is_some());
    assert!(
        burst.pop(&mut out).unwrap().is_none(),
        "index 2 was the bound"
    );
    let _ = burst.finish();
    assert_eq!(
        queue.next_avail(),
        2,
        "the later two wait for the next burst"
    );
    // A bound more than a ring ahead, or none at all, refuses the ring.
    assert!(Burst::bounded(&mut queue, &map, Some(11)).is_err());
    assert!(Burst::bounded(&mut queue, &map, None).is_err());
}

/// Head 0: a direct header descriptor, then (descriptor 1) an indirect table of 20 entries
/// at `TABLE`, the last one device-writable.
const TABLE: u64 = 0x9_0000;
fn header_and_table(mem: &GuestMemory, mock: &MockSplitQueue<GuestMemory>) {
    for i in 0..20u16 {
        let flags = if i < 19 { F_NEXT } else { F_WRITE };
        let d = desc(0xa_0000 + u64::from(i) * 0x100, 16, flags, i + 1);
        mem.write_obj(d, GuestAddress(TABLE + 16 * u64::from(i)))
            .unwrap();
    }
    mock.desc_table()
        .store(0, desc(0xb_0000, 16, F_NEXT, 1))
        .unwrap();
    mock.desc_table()
        .store(1, desc(TABLE, 20 * 16, F_INDIRECT, 0))
        .unwrap();
}

#[test]
fn direct_descriptors_may_lead_into_an_indirect_table_longer_than_the_ring() {
    // A disk's request: a direct header descriptor, then an indirect table of 20 entries on an
    // 8-entry ring (Linux sizes tables by seg_max, which may exceed a small ring).
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, 8);
    header_and_table(&mem, &mock);
    // An indirect descriptor that is not the chain's last is refused.
    mock.desc_table()
        .store(2, desc(0xb_0000, 16, F_NEXT, 3))
        .unwrap();
    mock.desc_table()
        .store(3, desc(TABLE, 20 * 16, F_INDIRECT | F_NEXT, 4))
        .unwrap();
    mock.desc_table().store(4, desc(0xb_0000, 1, 0, 0)).unwrap();
    publish(&mem, &mock, &[0, 2]);
    let mut queue: Queue = mock.create_queue().unwrap();
    let map = MemMap::new(&mem);
    let mut burst = Burst::new(&mut queue, &map).unwrap();
    let mut out = Buffers::new();
    let (head, walked) = burst.pop(&mut out).unwrap().unwrap();
    assert_eq!((head, walked), (0, Ok(())));
    assert_eq!(out.len(), 21, "the header, then the whole table");
    assert_eq!(out[0].addr, GuestAddress(0xb_0000));
    assert_eq!(out[20].addr, GuestAddress(0xa_0000 + 19 * 0x100));
    assert!(out[20].writable && !out[19].writable);
    let (head, walked) = burst.pop(&mut out).unwrap().unwrap();
    assert_eq!((head, walked), (2, Err(BrokenChain)));
    let _ = burst.finish();
}

#[test]
fn a_walk_limit_breaks_longer_chains_and_keeps_shorter_ones() {
    // The same chain (a header, then a table of 20: 21 buffers) walked under a limit of 21
    // and of 20: whole, then broken, read no further.
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, 8);
    header_and_table(&mem, &mock);
    publish(&mem, &mock, &[0, 0]);
    let mut queue: Queue = mock.create_queue().unwrap();
    let map = MemMap::new(&mem);
    let mut out = Buffers::new();
    {
        let mut burst = Burst::new(&mut queue, &map).unwrap().limit_walk(21);
        let (head, walked) = burst.pop(&mut out).unwrap().unwrap();
        assert_eq!(
            (head, walked, out.len()),
            (0, Ok(()), 21),
            "at the limit: whole"
        );
        let _ = burst.finish();
    }
    let mut burst = Burst::new(&mut queue, &map).unwrap().limit_walk(20);
    let (head, walked) = burst.pop(&mut out).unwrap().unwrap();
    assert_eq!(
        (head, walked),
        (0, Err(BrokenChain)),
        "one past the limit: broken"
    );
    assert!(
        out.len() <= 20,
        "read no further than the limit: {}",
        out.len()
    );
    let _ = burst.finish();
}

#[test]
fn an_indirect_table_at_an_odd_address_reads_as_an_aligned_one() {
    // The descriptor table is 16-aligned (refused otherwise) and read as two 8-byte words; an
    // indirect table may sit anywhere and is read byte by byte when it is not 8-aligned.
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, 4);
    let entries = [
        desc(0xa_0000, 12, F_NEXT, 1),
        desc(0xa_1008, 0x0102_0304, F_NEXT, 2),
        desc(0xffff_0000_a000, 7, F_WRITE, 0),
    ];
    let (aligned, odd) = (0x9_0000u64, 0x9_1003u64);
    for table in [aligned, odd] {
        for (i, d) in entries.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
    }
    mock.desc_table()
        .store(0, desc(aligned, 48, F_INDIRECT, 0))
        .unwrap();
    mock.desc_table()
        .store(1, desc(odd, 48, F_INDIRECT, 0))
        .unwrap();
    publish(&mem, &mock, &[0, 1]);
    let mut queue: Queue = mock.create_queue().unwrap();
    let map = MemMap::new(&mem);
    let mut burst = Burst::new(&mut queue, &map).unwrap();
    let mut walks = Vec::new();
    for _ in 0..2 {
        let mut out = Buffers::new();
        let (_, walked) = burst.pop(&mut out).unwrap().unwrap();
        assert_eq!(walked, Ok(()));
        walks.push(
            out.iter()
                .map(|b| (b.addr.0, b.len, b.writable))
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(
        walks[0],
        [
            (0xa_0000, 12, false),
            (0xa_1008, 0x0102_0304, false),
            (0xffff_0000_a000, 7, true)
        ]
    );
    assert_eq!(walks[0], walks[1]);
    let _ = burst.finish();
}

#[test]
fn a_descriptor_reads_the_same_at_every_alignment() {
    // Bytes 0x10..=0x1f at host offsets 0..8 of a buffer: the 8-aligned one takes the
    // two-word path, the others the byte path; every field's every byte is distinct.
    let mut buffer = [0u64; 4];
    let base = buffer.as_mut_ptr().cast::<u8>();
    for offset in 0..8usize {
        for (i, b) in (0x10u8..=0x1f).enumerate() {
            // SAFETY: offset + i < 8 + 16 <= 32, inside `buffer`.
            unsafe { base.add(offset + i).write(b) };
        }
        let table = std::ptr::NonNull::new(base.wrapping_add(offset)).unwrap();
        let d = SplitRing::read_desc(table, 0);
        assert_eq!(d.addr, 0x1716_1514_1312_1110, "offset {offset}");
        assert_eq!(d.len, 0x1b1a_1918, "offset {offset}");
        assert_eq!(d.flags, 0x1d1c, "offset {offset}");
        assert_eq!(d.next, 0x1f1e, "offset {offset}");
    }
}

#[test]
fn pop_single_takes_only_one_writable_buffer_with_room_and_leaves_the_rest_for_pop() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, 8);
    let table = 0x9_0000u64;
    mem.write_obj(desc(0xa_0000, 64, F_WRITE, 0), GuestAddress(table))
        .unwrap();
    let chains = [
        desc(0xb_0000, 100, F_WRITE, 0),          // 0: taken
        desc(0xb_1000, 99, F_WRITE, 0),           // 1: too short
        desc(0xb_2000, 100, 0, 0),                // 2: read-only
        desc(0xb_3000, 100, F_WRITE | F_NEXT, 7), // 3: a chain of two
        desc(table, 16, F_INDIRECT, 0),           // 4: indirect
        desc(0xb_5000, 100, F_WRITE | 0x80, 0),   // 5: an unknown flag
    ];
    for (i, d) in chains.iter().enumerate() {
        mock.desc_table().store(i as u16, *d).unwrap();
    }
    mock.desc_table()
        .store(7, desc(0xb_7000, 100, F_WRITE, 0))
        .unwrap();
    publish(&mem, &mock, &[0, 1, 2, 3, 4, 5, 9]);
    let mut queue: Queue = mock.create_queue().unwrap();
    let map = MemMap::new(&mem);
    let mut burst = Burst::new(&mut queue, &map).unwrap();
    assert_eq!(burst.pop_single(true, 100), Ok(Some((0, 0xb_0000, 100))));
    let mut out = Buffers::new();
    for (position, head) in [(1u16, 1u16), (2, 2), (3, 3), (4, 4), (5, 5), (6, 9)] {
        assert_eq!(burst.pop_single(true, 100), Ok(None), "head {head}");
        assert_eq!(burst.next_avail(), position, "head {head} left in the ring");
        let (popped, _) = burst.pop(&mut out).unwrap().unwrap();
        assert_eq!(popped, head);
    }
    assert_eq!(burst.pop_single(true, 1), Ok(None), "the ring is empty");
    let _ = burst.finish();
}
