//! The split-ring engine alone (`novacron::ring`), in-process, against virtio-queue on the
//! same ring: a burst of 64 one-descriptor chains popped and returned.
//!
//! - `ours/pop+used/64`: one avail-index read, 64 chains walked from the host mapping, 64 used
//!   entries written, one used-index store (what the net and blk paths do per burst);
//! - `virtio-queue/pop+add_used/64`: `pop_descriptor_chain` + `add_used` per chain (what the
//!   daemon did before), each access through `GuestMemory`.
//!
//! Criterion reports chains per second.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // a benchmark: fail loudly; criterion macros are undocumented

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use novacron::devices::desc::Buffers;
use novacron::ring::{burst::Burst, map::MemMap};
use novacron::vring::GuestMemory;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const SIZE: u16 = 256;
const BURST: u16 = 64;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

/// A ring of `SIZE` with every descriptor a 1500-byte buffer, heads 0..SIZE in the avail ring.
fn ring() -> (GuestMemory, Queue) {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    for i in 0..u64::from(SIZE) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&(0x10_0000 + i * 2048).to_le_bytes());
        raw[8..12].copy_from_slice(&1500u32.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(DESC + 16 * i)).unwrap();
        mem.write_obj(i as u16, GuestAddress(AVAIL + 4 + 2 * i))
            .unwrap();
    }
    let mut q = Queue::new(SIZE).unwrap();
    q.set_size(SIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    (mem, q)
}

/// Makes `BURST` more chains available (the same heads, round the ring).
fn publish(mem: &GuestMemory) {
    let idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
    mem.write_obj(idx.wrapping_add(BURST), GuestAddress(AVAIL + 2))
        .unwrap();
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring");
    group.throughput(Throughput::Elements(u64::from(BURST)));
    let (mem, mut q) = ring();
    let mut out = Buffers::new();
    group.bench_function("ours/pop+used/64", |b| {
        b.iter(|| {
            publish(&mem);
            let map = MemMap::new(&mem);
            let mut burst = Burst::new(&mut q, &map).unwrap();
            while let Some((head, walked)) = burst.pop(&mut out).unwrap() {
                walked.unwrap();
                burst.used(head, out.len() as u32);
            }
            burst.finish()
        })
    });
    let (mem, mut q) = ring();
    group.bench_function("virtio-queue/pop+add_used/64", |b| {
        b.iter(|| {
            publish(&mem);
            while let Some(chain) = q.pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                let n = chain.count() as u32;
                q.add_used(&mem, head, n).unwrap();
            }
            q.needs_notification(&mem).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
