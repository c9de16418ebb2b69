//! Fuzzing entry points shared by `fuzz/` (libFuzzer) and the corpus-replay test, so a crash
//! found by the fuzzer replays as an ordinary `cargo test`.
//!
//! [`blk_request`] decodes the input into a split virtqueue in a small guest memory (descriptor
//! table, avail ring, raw memory contents), pops one chain, and runs it through the same
//! validation and I/O submission the worker uses, with the null engine (which writes zeros
//! into read buffers, so every iovec produced is actually touched).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::blk::request::{self, Limits, RequestKind};
use crate::storage::null::NullEngine;
use crate::storage::{Engine, IoOp, OpKind};
use virtio_queue::{Queue, QueueT};

const MEMORY_SIZE: usize = 64 << 10;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;

/// Reads little-endian values off the front of the input, yielding zeros when exhausted.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

/// One fuzz iteration over the virtio-blk request path. Never panics on any input.
pub fn blk_request(data: &[u8]) {
    let mut input = Input(data);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]) else {
        return;
    };
    let queue_size: u16 = 1 << (input.u8() % 5 + 1); // 2..=32
    let readonly = input.u8() & 1 == 1;
    let capacity = u64::from(input.u32()) << 9;
    let descriptors = usize::from(input.u8() % 40);
    for i in 0..descriptors.min(usize::from(queue_size)) {
        // Keep most addresses inside the small memory so parsing goes deep.
        let addr = match input.u8() % 4 {
            0 => input.u64(),
            _ => u64::from(input.u16()) % MEMORY_SIZE as u64,
        };
        let len = match input.u8() % 4 {
            0 => input.u32(),
            _ => u32::from(input.u16()),
        };
        let flags = input.u16() & 0x7;
        let next = input.u16() % (queue_size + 2);
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        let _ = mem.write_slice(&raw, GuestAddress(DESC_TABLE + 16 * i as u64));
    }
    let head = input.u16() % queue_size;
    let _ = mem.write_obj(head, GuestAddress(AVAIL_RING + 4));
    let _ = mem.write_obj(1u16, GuestAddress(AVAIL_RING + 2));
    // The rest of the input is guest memory contents (headers, segments, indirect tables).
    let rest = input.0;
    let body = 0x3000;
    let n = rest.len().min(MEMORY_SIZE - body);
    let _ = mem.write_slice(&rest[..n], GuestAddress(body as u64));

    let mut queue = match Queue::new(queue_size) {
        Ok(queue) => queue,
        Err(_) => return,
    };
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    let Some(chain) = queue.pop_descriptor_chain(&mem) else {
        return;
    };
    let limits = Limits { capacity, readonly };
    let Ok(buffers) = request::collect_buffers(chain) else {
        return;
    };
    let Ok(parsed) = request::parse(&mem, &buffers, limits) else {
        return;
    };
    let kind = match parsed.kind {
        RequestKind::Read { offset } => OpKind::Read { offset },
        RequestKind::Write { offset } => OpKind::Write { offset },
        _ => return,
    };
    let mut engine = NullEngine::default();
    // SAFETY: `parse` built the iovecs from `mem`, which lives until the end of this function,
    // after the op has completed (the null engine completes inline).
    unsafe {
        engine.push(IoOp {
            kind,
            iovecs: parsed.iovecs,
            tag: 0,
        })
    };
    let mut out = Vec::new();
    engine.reap(&mut out);
}
