//! Test virtqueues for in-process worker tests: a [`TestQueue`] lays out a split ring in
//! guest memory with `virtio_queue::mock`, exposes it as the [`CheckedVring`] a worker
//! serves, and lets a test post descriptor chains and read the used ring back, the way a
//! driver would.

#![allow(clippy::arithmetic_side_effects, clippy::expect_used)] // test-only: fails loudly by design

use vhost_user_backend::VringT;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic};

use crate::vring::{AtomicGuestMemory, CheckedVring, GuestMemory};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// Guest memory for a test: one region of `size` bytes at 0, kept for the whole test run
/// (the mock rings borrow it), and the atomic view workers take.
pub fn memory(size: usize) -> (&'static GuestMemory, AtomicGuestMemory) {
    let mem: &'static GuestMemory = Box::leak(Box::new(
        GuestMemory::from_ranges(&[(GuestAddress(0), size)]).expect("test memory"),
    ));
    (mem, GuestMemoryAtomic::new(mem.clone()))
}

/// A split ring in test memory and the vring a worker serves it through.
///
/// The used ring is placed here, not where `MockSplitQueue::create` puts it: virtio-queue
/// 0.18's mock ends the avail ring 4 + `size` bytes after its start (entries counted as
/// bytes), so its used ring overlaps the avail ring from entry `size / 2` on, and a device's
/// used entries overwrite heads the driver has not had taken yet.
pub struct TestQueue {
    mock: MockSplitQueue<'static, GuestMemory>,
    used_addr: GuestAddress,
    mem: &'static GuestMemory,
    /// The vring, as `vhost-user-backend` would hand it to a worker.
    pub vring: CheckedVring,
    next_desc: u16,
    size: u16,
}

impl TestQueue {
    /// A ring of `size` entries at guest address `at`, ready and enabled.
    pub fn new(mem: &'static GuestMemory, atomic: &AtomicGuestMemory, at: u64, size: u16) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(at), size);
        // After the whole avail ring (flags, idx, ring, used_event), 4-aligned.
        let used_addr = GuestAddress((mock.avail_addr().0 + 6 + 2 * u64::from(size) + 3) & !3);
        mem.write_slice(&vec![0u8; 6 + 8 * usize::from(size)], used_addr)
            .expect("used ring");
        let vring = CheckedVring::new(atomic.clone(), size).expect("vring");
        vring.set_queue_size(size);
        vring
            .set_queue_info(mock.desc_table_addr().0, mock.avail_addr().0, used_addr.0)
            .expect("queue info");
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        Self {
            mock,
            used_addr,
            mem,
            vring,
            next_desc: 0,
            size,
        }
    }

    /// Posts a chain of `(addr, len, device-writable)` buffers; returns its head.
    pub fn post(&mut self, buffers: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        let count = u16::try_from(buffers.len()).expect("chain length");
        let raw: Vec<RawDescriptor> = buffers
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let index = head.wrapping_add(i as u16) % self.size;
                let last = i + 1 == buffers.len();
                let flags = if writable { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                let next = if last { 0 } else { (index + 1) % self.size };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.mock.add_desc_chains(&raw, head).expect("post chain");
        self.next_desc = (head + count) % self.size;
        head
    }

    /// The used ring's flags (`VRING_USED_F_NO_NOTIFY`: the device asks for no kicks).
    pub fn used_flags(&self) -> u16 {
        self.mem.read_obj(self.used_addr).expect("used flags")
    }

    /// Sets the used ring's flags (as a device that asked for no kicks left them).
    pub fn set_used_flags(&self, flags: u16) {
        self.mem
            .write_obj(flags, self.used_addr)
            .expect("used flags");
    }

    /// Every used entry so far, as `(head, length)`.
    pub fn used(&self) -> Vec<(u16, u32)> {
        let idx: u16 = self
            .mem
            .read_obj(self.used_addr.unchecked_add(2))
            .expect("used idx");
        (0..idx)
            .map(|i| {
                let at = self
                    .used_addr
                    .unchecked_add(4 + 8 * u64::from(i % self.size));
                let id: u32 = self.mem.read_obj(at).expect("used id");
                let len: u32 = self.mem.read_obj(at.unchecked_add(4)).expect("used len");
                (u16::try_from(id).expect("head"), len)
            })
            .collect()
    }
}

/// A dirty log over `bytes` of log (a temp file) and the file, to read the bits back.
pub fn test_log(bytes: u64) -> (std::sync::Arc<crate::ring::dirty::DirtyLog>, std::fs::File) {
    let file = tempfile::tempfile().unwrap();
    file.set_len(bytes).unwrap();
    let mut payload = bytes.to_le_bytes().to_vec();
    payload.extend_from_slice(&0u64.to_le_bytes());
    let log = std::sync::Arc::new(crate::ring::dirty::DirtyLog::default());
    log.set_map(
        crate::ring::dirty::LogMap::from_message(&payload, file.try_clone().unwrap()).unwrap(),
    );
    (log, file)
}

/// Every page of `now` that differs from `before` must have its bit set in `log`; returns
/// how many pages changed.
pub fn assert_changes_logged(before: &[u8], now: &[u8], log: &mut std::fs::File) -> usize {
    use std::io::{Read, Seek};
    log.rewind().unwrap();
    let mut bits = Vec::new();
    log.read_to_end(&mut bits).unwrap();
    let mut changed = 0;
    for (page, (a, b)) in before.chunks(4096).zip(now.chunks(4096)).enumerate() {
        if a != b {
            changed += 1;
            assert!(
                bits.get(page / 8)
                    .is_some_and(|b| b & (1 << (page % 8)) != 0),
                "page {page} was written but not logged"
            );
        }
    }
    changed
}
