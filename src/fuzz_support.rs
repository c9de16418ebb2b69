//! Fuzzing entry points shared by `fuzz/` (libFuzzer) and the corpus-replay test, so a crash
//! found by the fuzzer replays as an ordinary `cargo test`.
//!
//! [`blk_request`] decodes the input into a split virtqueue in a small guest memory (descriptor
//! table, a few avail entries — the same head twice, sometimes — and raw memory contents) and
//! hands it to the real queue worker (`devices::blk::worker`) with the null engine, which
//! writes zeros into read buffers, so every iovec produced is actually touched: parsing,
//! the head bookkeeping, the request-to-op mapping, QoS admission and the used ring are the
//! daemon's own code. [`net_frame`] does the
//! same for the virtio-net tx and rx paths; [`tier_record`] for the tier's on-disk records
//! and journal.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::blk::request::Limits;
use crate::storage::null::NullEngine;
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

/// Builds a ready split queue in `mem` from the input: descriptor table, one avail entry,
/// then the rest of the input as guest memory contents.
fn fuzz_queue(
    input: &mut Input<'_>,
    mem: &GuestMemoryMmap<()>,
    queue_size: u16,
    entries: u16,
) -> Option<Queue> {
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
    for slot in 0..entries.min(queue_size) {
        let head = input.u16() % queue_size;
        let _ = mem.write_obj(head, GuestAddress(AVAIL_RING + 4 + 2 * u64::from(slot)));
    }
    let _ = mem.write_obj(entries.min(queue_size), GuestAddress(AVAIL_RING + 2));
    // The rest of the input is guest memory contents (headers, segments, indirect tables).
    let rest = std::mem::take(&mut input.0);
    let body = 0x3000;
    let n = rest.len().min(MEMORY_SIZE - body);
    let _ = mem.write_slice(&rest[..n], GuestAddress(body as u64));

    let mut queue = Queue::new(queue_size).ok()?;
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    Some(queue)
}

fn fuzz_memory() -> Option<GuestMemoryMmap<()>> {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).ok()
}

/// One fuzz iteration over the virtio-blk request path, through the real queue worker.
/// Never panics on any input.
pub fn blk_request(data: &[u8]) {
    use crate::devices::blk::shared::DeviceShared;
    use crate::devices::blk::worker::QueueWorker;
    use crate::vring::CheckedVring;
    use std::sync::Arc;
    use vhost_user_backend::VringT;
    let mut input = Input(data);
    let Some(mem) = fuzz_memory() else {
        return;
    };
    let queue_size: u16 = 1 << (input.u8() % 5 + 1); // 2..=32
    let readonly = input.u8() & 1 == 1;
    let capacity = u64::from(input.u32()) << 9;
    let entries = u16::from(input.u8() % 4 + 1);
    if fuzz_queue(&mut input, &mem, queue_size, entries).is_none() {
        return;
    }
    let atomic = vm_memory::GuestMemoryAtomic::new(mem);
    let Ok(vring) = CheckedVring::new(atomic.clone(), queue_size) else {
        return;
    };
    vring.set_queue_size(queue_size);
    if vring
        .set_queue_info(DESC_TABLE, AVAIL_RING, USED_RING)
        .is_err()
    {
        return;
    }
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    let shared = Arc::new(DeviceShared::new(
        "fuzz",
        1,
        queue_size,
        Limits { capacity, readonly },
        crate::storage::EngineSource::default(),
    ));
    let Ok(mut worker) = QueueWorker::new(
        0,
        shared,
        Box::new(NullEngine::default()),
        atomic,
        Default::default(),
    ) else {
        return;
    };
    worker.remember_vring(&vring);
    let _ = worker.process_queue(&vring);
    worker.drain_detached();
}

/// One fuzz iteration over the virtio-net paths: the chain as a transmitted frame (header
/// checks, iovecs, a copy into another guest's buffers, software checksum) and as a receive
/// buffer taken and returned through an `RxBatch`. Never panics on any input.
pub fn net_frame(data: &[u8]) {
    use crate::devices::net::{frame, header, rx};
    let mut input = Input(data);
    let (Some(mem), Some(other)) = (fuzz_memory(), fuzz_memory()) else {
        return;
    };
    let queue_size: u16 = 1 << (input.u8() % 5 + 1);
    let mtu = input.u16();
    let mergeable = input.u8() & 1 == 1;
    let need = u64::from(input.u32());
    let Some(mut queue) = fuzz_queue(&mut input, &mem, queue_size, 1) else {
        return;
    };
    let mut buffers = crate::devices::desc::Buffers::new();
    let head = {
        let map = crate::ring::map::MemMap::new(&mem);
        let Ok(burst) = crate::ring::burst::Burst::new(&mut queue, &map) else {
            return;
        };
        // The walk limit the NIC's queues run with.
        let mut burst = burst.limit_walk(crate::devices::net::spec::MAX_CHAIN_DESCRIPTORS);
        let popped = burst.pop(&mut buffers);
        let _ = burst.finish();
        let Ok(Some((head, Ok(())))) = popped else {
            return;
        };
        head
    };
    if let Ok(tx) = frame::tx_frame(&mem, &buffers, mtu) {
        let mut iovecs = Vec::new();
        let _ = crate::devices::sg::host_iovecs(
            &mem,
            &tx.spans,
            12,
            u64::from(tx.frame_len),
            &mut iovecs,
        );
        let target = [frame::Span {
            addr: GuestAddress(0x8000),
            len: 0x8000,
        }];
        let _ = crate::devices::sg::copy_between(
            &mem,
            &tx.spans,
            12,
            &other,
            &target,
            12,
            u64::from(tx.frame_len),
        );
        let mut bytes = vec![0u8; (tx.frame_len as usize).min(MEMORY_SIZE)];
        if crate::devices::sg::read_stream(&mem, &tx.spans, 12, &mut bytes).is_ok() {
            let _ = header::complete_checksum(&mut bytes, &tx.header);
        }
    }
    let _ = frame::rx_buffer(&mem, head, &buffers);
    // The same ring as an rx queue: gather, then commit what a frame of `need` bytes uses.
    queue.set_next_avail(0);
    let map = crate::ring::map::MemMap::new(&mem);
    let Ok(burst) = crate::ring::burst::Burst::new(&mut queue, &map) else {
        return;
    };
    let mut burst = burst.limit_walk(crate::devices::net::spec::MAX_CHAIN_DESCRIPTORS);
    let mut batch = rx::RxBatch::default();
    if let Ok(rx::Gathered::Ready) =
        batch.gather(&mut burst, &mem, need % 0x20000, mergeable, |_| {})
    {
        batch.commit(
            &mut burst,
            &mem,
            need % 0x20000,
            crate::devices::net::rx::Header::NumBuffersUnset,
        );
    }
    let _ = burst.finish();
}

/// One fuzz iteration over our split-ring engine (`crate::ring`): rings placed anywhere
/// (misaligned, across regions, outside memory), any descriptors, avail entries and indices,
/// then a sequence of pops, used entries, put-backs and burst ends driven by the input.
/// Checks, besides never panicking: every chain both we and virtio-queue can walk reads the
/// same; a head virtio-queue refuses is refused; the used index in guest memory is exactly
/// the number of used entries added; a chain never yields more descriptors than a table holds.
pub fn ring_split(data: &[u8]) {
    use crate::devices::desc::{collect_buffers, Buffers};
    use crate::ring::{burst::Burst, map::MemMap};
    // The last quarter of the input drives the run (relocation, EVENT_IDX, walk limit, each
    // step's operation and operands); the rest builds the ring and the memory behind it
    // (`fuzz_queue` takes all of what it is given). One stream for both left the run's bytes
    // to the memory image: every selector read 0, and the run only ever popped.
    let cut = data.len().saturating_sub(data.len() / 4);
    let (ring_bytes, step_bytes) = data.split_at(cut);
    let mut input = Input(ring_bytes);
    let mut steps = Input(step_bytes);
    // Two regions, so rings and tables can straddle a boundary.
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), MEMORY_SIZE),
        (GuestAddress(MEMORY_SIZE as u64), MEMORY_SIZE),
    ]) else {
        return;
    };
    let queue_size: u16 = 1 << (input.u8() % 6); // 1..=32
    let entries = u16::from(input.u8()) % (queue_size + 1);
    let Some(mut queue) = fuzz_queue(&mut input, &mem, queue_size, entries) else {
        return;
    };
    if steps.u8() & 1 == 1 {
        // Somewhere else entirely (the input decides; virtio-queue drops misaligned ones).
        let at = u64::from(steps.u32()) % (2 * MEMORY_SIZE as u64 + 0x100);
        queue.set_desc_table_address(Some(at as u32), Some(0));
    }
    queue.set_event_idx(steps.u8() & 1 == 1);
    // Half the inputs walk with a limit (a NIC's queues do): 1..=128 buffers per chain.
    let walk_limit = match steps.u8() {
        b if b & 1 == 1 => Some(u32::from(b >> 1) + 1),
        _ => None,
    };
    let Ok(mut reference) = Queue::new(queue_size) else {
        return;
    };
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(queue.desc_table());
    reference.set_desc_table_address(lo, hi);
    let (lo, hi) = split(queue.avail_ring());
    reference.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(queue.used_ring());
    reference.set_used_ring_address(lo, hi);
    reference.set_ready(true);
    let map = MemMap::new(&mem);
    let mut ours = Buffers::new();
    let mut added = 0u16;
    let start_used: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).unwrap_or(0);
    for _ in 0..8 {
        let Ok(burst) = Burst::new(&mut queue, &map) else {
            return;
        };
        let mut burst = match walk_limit {
            Some(max) => burst.limit_walk(max),
            None => burst,
        };
        let mut popped = 0u16;
        for _ in 0..8 {
            let op = steps.u8() % 4;
            if op == 0 {
                // The one-buffer rx take: what it takes is exactly what the reference pops
                // (one writable buffer with room); what it leaves, `pop` takes below.
                let min = u32::from(steps.u16());
                if let Ok(Some((head, addr, len))) = burst.pop_single(true, min) {
                    popped += 1;
                    assert!(len >= min, "head {head}");
                    let theirs = reference.pop_descriptor_chain(&mem);
                    assert!(
                        theirs.is_some(),
                        "head {head}: taken here, not by the reference"
                    );
                    if let Some(Ok(theirs)) = theirs.map(collect_buffers) {
                        assert_eq!(theirs.len(), 1, "head {head}");
                        let b = &theirs[0];
                        assert!(
                            b.writable && b.addr.0 == addr && b.len == len,
                            "head {head}"
                        );
                    }
                    continue;
                }
            }
            match op {
                0 | 1 => {
                    if let Ok(Some((head, walked))) = burst.pop(&mut ours) {
                        popped += 1;
                        assert!(ours.len() <= 65536);
                        if let (Some(max), Ok(())) = (walk_limit, &walked) {
                            assert!(ours.len() <= max as usize, "{} > {max}", ours.len());
                        }
                        let theirs = reference.pop_descriptor_chain(&mem);
                        match (theirs.map(collect_buffers), walked) {
                            (Some(Ok(theirs)), Ok(())) => assert_eq!(&theirs[..], &ours[..]),
                            (None, walked) => assert!(walked.is_err(), "head {head}"),
                            _ => {}
                        }
                    }
                }
                2 => {
                    let head = steps.u16();
                    burst.used(head, steps.u32());
                    // A head outside the ring is not returned (no such descriptor).
                    if head < burst.size() {
                        added = added.wrapping_add(1);
                    }
                }
                _ => {
                    let n = u16::from(steps.u8()) % (popped + 1);
                    burst.unpop(n);
                    popped -= n;
                    for _ in 0..n {
                        reference.set_next_avail(reference.next_avail().wrapping_sub(1));
                    }
                }
            }
        }
        let _ = burst.finish();
    }
    let used: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).unwrap_or(0);
    assert_eq!(used, start_used.wrapping_add(added));
    assert_eq!(queue.next_used(), used);
}

/// One fuzz iteration over the vhost-user message relay (`devices::shell::relay`): the input
/// is the byte stream a front-end sends (any headers, sizes, requests; no fds), relayed to a
/// handler that echoes every message back as a reply. Never panics, never hangs: the relay
/// ends when the front-end closes, whatever it sent.
pub fn relay_messages(data: &[u8]) {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let data = &data[..data.len().min(64 << 10)];
    let (Ok((mut qemu, front)), Ok((back, mut handler))) = (UnixStream::pair(), UnixStream::pair())
    else {
        return;
    };
    let relay = std::thread::spawn(move || {
        // A blk-like device's slot: the inflight messages are answered by the relay too.
        let slot = crate::devices::shell::inflight::InflightSlot::new(4, 256);
        use crate::devices::shell::memory_cap::{MemoryCap, Pool};
        let mut memory = MemoryCap::new(Pool::daemon(), 1 << 30);
        let hooks = crate::devices::shell::relay::Hooks {
            inflight: Some(&slot),
            log: &crate::ring::dirty::DirtyLog::default(),
            announce: &|_| {},
            kicker: crate::sys::kick::Kicker::new().ok(),
            memory: &mut memory,
            mapped: &crate::devices::shell::memory_cap::Tables::default(),
        };
        let _ = crate::devices::shell::relay::relay(front, back, |_| {}, hooks);
    });
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = handler.read(&mut buf) {
            if n == 0 || handler.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let _ = qemu.write_all(data);
    let _ = qemu.shutdown(std::net::Shutdown::Write);
    let mut replies = Vec::new();
    let _ = qemu.read_to_end(&mut replies);
    drop(qemu);
    let _ = relay.join();
    let _ = echo.join();
}

/// One fuzz iteration over the control protocol: each input line is a request handled by the
/// real dispatcher (`control::methods::handle_line`) against a fresh registry (null and file
/// disks, switch ports). Every path in a request is moved under a private scratch directory
/// and requests that would touch the host (taps, uplinks, daemon shutdown) are dropped, so
/// the fuzzer can create devices without writing anywhere else. Never panics; everything it
/// starts is stopped.
pub fn control_lines(data: &[u8]) {
    use std::sync::{Arc, Mutex, OnceLock};
    static SCRATCH: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    let Some(scratch) = SCRATCH
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("novacron-fuzz-{}", std::process::id()));
            std::fs::create_dir_all(&dir).ok().map(|()| dir)
        })
        .as_ref()
    else {
        return;
    };
    let registry = Arc::new(Mutex::new(crate::registry::Registry::new(None)));
    let notify: crate::control::methods::Notify = Arc::new(|| {});
    for line in data.split(|b| *b == b'\n').take(16) {
        let Some(line) = confine(line, scratch) else {
            continue;
        };
        if let crate::control::methods::Handled::Later { pending, .. } =
            crate::control::methods::handle_line(&registry, &line, &notify, false)
        {
            // Deferred work (a tier batch) finishes before the next line, as a client
            // waiting for its answer would see it.
            let _ = pending.recv();
        }
    }
    crate::lock::lock(&registry).stop_all();
}

/// A request line with every string that looks like a path moved under `scratch`; `None` for
/// requests that would reach outside the process (taps, uplinks, shutdown).
fn confine(line: &[u8], scratch: &std::path::Path) -> Option<Vec<u8>> {
    /// Keys whose values name files (relative ones too: they would land in the cwd).
    const PATH_KEYS: [&str; 4] = ["socket", "path", "tier-hot", "tier-cold"];
    fn confined(s: &str, scratch: &std::path::Path) -> String {
        let name: String = s
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
            .take(32)
            .collect();
        scratch.join(format!("f{name}")).display().to_string()
    }
    fn walk(value: &mut serde_json::Value, scratch: &std::path::Path) -> bool {
        match value {
            serde_json::Value::String(s) if s.contains('/') => {
                *s = confined(s, scratch);
                true
            }
            serde_json::Value::Object(map) => {
                if ["tap", "uplink"].iter().any(|k| map.contains_key(*k)) {
                    return false;
                }
                if map.get("method").and_then(|m| m.as_str()) == Some("daemon.shutdown") {
                    return false;
                }
                for (key, v) in map.iter_mut() {
                    if let serde_json::Value::String(s) = v {
                        if PATH_KEYS.contains(&key.as_str()) && s != "null" {
                            *s = confined(s, scratch);
                        }
                    }
                }
                map.values_mut().all(|v| walk(v, scratch))
            }
            serde_json::Value::Array(items) => items.iter_mut().all(|v| walk(v, scratch)),
            _ => true,
        }
    }
    let mut value: serde_json::Value = serde_json::from_slice(line).ok()?;
    walk(&mut value, scratch).then(|| value.to_string().into_bytes())
}

/// One fuzz iteration over the tier's on-disk parsers: the input as a cold record (header and
/// bounded decompression) and as a metadata journal (replay). Never panics on any input;
/// memory stays bounded by the extent size whatever the input claims.
pub fn tier_record(data: &[u8]) {
    use crate::storage::tier::{journal, record};
    let mut input = Input(data);
    let extent = u64::from(input.u8() % 4);
    let generation = u64::from(input.u8() % 4);
    let max_raw = 64 << 10;
    let rest = input.0;
    let mut out = Vec::new();
    if record::decode_into(rest, extent, generation, max_raw, &mut out).is_ok() {
        assert!(out.len() <= max_raw as usize);
    }
    let _ = record::parse_header(rest, max_raw, record::max_compressed_len(max_raw));
    let (replayed, _) = journal::replay(rest);
    assert!(replayed.entries as usize * journal::ENTRY_LEN <= rest.len());
}
