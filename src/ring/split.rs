//! The split virtqueue, read and written by us: a burst of chains taken with one avail-index
//! read, descriptors read straight from the host mapping of the ring, used entries written in
//! place and published with one index store.
//!
//! Why not virtio-queue: its `pop_descriptor_chain` + `DescriptorChain` read every descriptor
//! and ring entry through `GuestMemory` (a region search and a bounds check per access) and
//! its `add_used` publishes the used index after every element. On the net path that was
//! most of the ~1 µs a frame cost. The queue's state (addresses, size, next avail/used,
//! EVENT_IDX) still lives in virtio-queue's `Queue`, which vhost-user-backend drives; a
//! [`SplitRing`] is a view built from it for one burst, and the caller writes the indices it
//! advanced back into the `Queue`.
//!
//! Everything here is guest-controlled and checked: the three ring areas must be aligned as
//! the spec requires (descriptor table 16, avail 2, used 4) and each must lie inside one
//! memory region (as DPDK's vhost library also requires; QEMU places rings in one RAM
//! block), or the ring is refused; an avail index more than a ring ahead is a broken ring;
//! a chain's head and every `next` are checked against the table, a chain is at most a table
//! long (no loops), an indirect table must end the chain (after zero or more direct
//! descriptors), be a whole number of descriptors, mapped in one region, and may not nest. Buffers themselves are not checked
//! here (the device's parser maps them).

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::num::Wrapping;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::map::MemMap;
use crate::devices::desc::{Buffer, Buffers};

const DESC_SIZE: u64 = 16;
/// Most descriptors of an indirect table walked on a ring smaller than this (see `chain`).
pub const MAX_TABLE_WALK: u32 = 1026;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
/// `VRING_AVAIL_F_NO_INTERRUPT`.
const AVAIL_NO_INTERRUPT: u16 = 1;
/// `VRING_USED_F_NO_NOTIFY`.
const USED_NO_NOTIFY: u16 = 1;

/// Why a ring cannot be served. (Not `Copy`: matching `Err(e)` on a result holding a burst
/// must move it, so the burst's borrow of the queue ends there.)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// Size zero or not a power of two.
    #[error("queue size {0} is not a power of two")]
    Size(u16),
    /// A ring area is not aligned as the spec requires.
    #[error("ring area at {0:#x} is misaligned")]
    Misaligned(u64),
    /// A ring area is not inside one memory region.
    #[error("ring area at {0:#x} is not mapped in one region")]
    Unmapped(u64),
    /// The driver's avail index is more than a ring ahead of what we took.
    #[error("avail index {avail} is more than a ring ahead of {next}")]
    AvailIndex {
        /// The driver's index.
        avail: u16,
        /// Ours.
        next: u16,
    },
}

/// A chain that cannot be walked: bad head or `next`, a loop, a bad or nested indirect
/// table. The head is still the driver's to get back (with length 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("broken descriptor chain")]
pub struct BrokenChain;

/// One descriptor as read from guest memory.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// A split ring as host addresses, for one burst.
#[derive(Debug)]
pub struct SplitRing<'a, 'm> {
    map: &'a MemMap<'m>,
    desc: NonNull<u8>,
    avail: NonNull<u8>,
    used: NonNull<u8>,
    size: u16,
    event_idx: bool,
    /// Most descriptors one chain walk reads (direct and indirect together), if the device
    /// sets a limit ([`SplitRing::limit_walk`]).
    max_walk: u32,
}

/// The host address of a ring area of `len` bytes at `gpa` aligned to `align` (both the
/// guest address and the host address: a front-end may start a region at an odd guest
/// address, and atomics on a misaligned host address are undefined behaviour).
fn area(map: &MemMap<'_>, gpa: u64, len: u64, align: u64) -> Result<NonNull<u8>, RingError> {
    if gpa.checked_rem(align) != Some(0) {
        return Err(RingError::Misaligned(gpa));
    }
    let host = map.host(gpa, len).ok_or(RingError::Unmapped(gpa))?;
    if (host.as_ptr() as u64).checked_rem(align) != Some(0) {
        return Err(RingError::Misaligned(gpa));
    }
    Ok(host)
}

impl<'a, 'm> SplitRing<'a, 'm> {
    /// The memory map the ring translates through.
    pub fn map(&self) -> &'a MemMap<'m> {
        self.map
    }

    /// The ring `queue` describes, in `map`.
    pub fn new(map: &'a MemMap<'m>, queue: &Queue) -> Result<Self, RingError> {
        let size = queue.size();
        if size == 0 || !size.is_power_of_two() {
            return Err(RingError::Size(size));
        }
        let n = u64::from(size);
        // Sizes: 16 per descriptor; avail = flags, idx, ring, used_event; used = flags, idx,
        // ring of 8-byte elements, avail_event. n <= 32768, so none of these overflow.
        let desc = area(map, queue.desc_table(), n.saturating_mul(DESC_SIZE), 16)?;
        let avail = area(
            map,
            queue.avail_ring(),
            n.saturating_mul(2).saturating_add(6),
            2,
        )?;
        let used = area(
            map,
            queue.used_ring(),
            n.saturating_mul(8).saturating_add(6),
            4,
        )?;
        Ok(Self {
            map,
            desc,
            avail,
            used,
            size,
            event_idx: queue.event_idx_enabled(),
            max_walk: u32::MAX,
        })
    }

    /// Chains of more than `max` buffers (direct descriptors and indirect table entries; the
    /// indirect descriptor itself is not counted) are broken: the walk stops reading there.
    /// For devices whose chains are short by nature (a NIC's: Linux sends at most
    /// `MAX_SKB_FRAGS` + 2), so that a guest's ring of table-long chains cannot make every
    /// walk of it, on a sender's thread, read a ring times a table of descriptors.
    pub fn limit_walk(&mut self, max: u32) {
        self.max_walk = max.max(1);
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// `ptr + offset` for an offset the constructor proved inside the area (callers pass
    /// offsets below `4 + 8 * size`, the largest area's length, or a table's checked length).
    fn at(ptr: NonNull<u8>, offset: u64) -> *mut u8 {
        debug_assert!(
            offset < 16 * 65536 + 8,
            "ring offset {offset} out of any area"
        );
        // SAFETY: every caller passes an offset below the area's length as checked in `new`
        // (slot indices are reduced modulo the size), so the pointer stays in the mapping.
        unsafe { ptr.as_ptr().add(offset as usize) }
    }

    fn load_u16(ptr: *mut u8, order: Ordering) -> u16 {
        // SAFETY: `ptr` is inside a mapped ring area and 2-aligned (area base aligned as
        // checked in `new`, offsets even); guest memory is shared, so atomic access is the
        // right model for it, as in vm-memory.
        u16::from_le(unsafe { AtomicU16::from_ptr(ptr.cast()) }.load(order))
    }

    /// The driver's avail index.
    pub fn avail_idx(&self) -> u16 {
        Self::load_u16(Self::at(self.avail, 2), Ordering::Acquire)
    }

    /// Chains the driver has made available beyond `next_avail`.
    pub fn pending(&self, next_avail: u16) -> Result<u16, RingError> {
        let avail = self.avail_idx();
        let pending = (Wrapping(avail) - Wrapping(next_avail)).0;
        if pending > self.size {
            return Err(RingError::AvailIndex {
                avail,
                next: next_avail,
            });
        }
        Ok(pending)
    }

    fn slot(&self, position: u16) -> u64 {
        // size is a power of two: the mask is the modulo.
        u64::from(position & self.size.wrapping_sub(1))
    }

    /// The head the driver put at avail position `position`.
    pub fn head(&self, position: u16) -> u16 {
        let offset = self.slot(position).saturating_mul(2).saturating_add(4);
        Self::load_u16(Self::at(self.avail, offset), Ordering::Relaxed)
    }

    fn read_desc(table: NonNull<u8>, index: u16) -> Desc {
        debug_assert!(u64::from(index) * DESC_SIZE < 16 * 65536);
        let p = Self::at(table, u64::from(index).saturating_mul(DESC_SIZE));
        if p.align_offset(8) == 0 {
            // Two 8-byte loads (the descriptor table is 16-aligned, checked in `new`; an
            // indirect table usually is): the byte-array read below compiled to 16 byte
            // loads and 30 shifts and ors, twice per chain on the hot path.
            // SAFETY: as below, and `p` is 8-aligned, as is `p + 8`, both inside the table.
            let (low, high) = unsafe {
                (
                    std::ptr::read_volatile(p.cast::<u64>()),
                    std::ptr::read_volatile(p.add(8).cast::<u64>()),
                )
            };
            // Little-endian fields: len, flags and next are the low 32, next 16 and top 16
            // bits of the second word's value (the truncations are the field boundaries).
            let high = u64::from_le(high);
            #[allow(clippy::cast_possible_truncation)]
            return Desc {
                addr: u64::from_le(low),
                len: high as u32,
                flags: (high >> 32) as u16,
                next: (high >> 48) as u16,
            };
        }
        // SAFETY: `index` is below the table's descriptor count (checked by the caller), so
        // the 16 bytes are inside the mapped table; an unaligned byte-array read has no
        // alignment requirement; volatile because the guest may change it at any time.
        let raw = unsafe { std::ptr::read_volatile(p.cast::<[u8; 16]>()) };
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = raw;
        Desc {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        }
    }

    /// The chain at `head` if it is one direct buffer, device-writable or (`writable`
    /// false) device-readable (flags exactly WRITE or nothing: no NEXT, no INDIRECT), as
    /// `(address, length)`; `None` for anything else, or a head outside the ring. A NIC's
    /// usual rx or tx chain, read with one descriptor load.
    pub fn single(&self, head: u16, writable: bool) -> Option<(u64, u32)> {
        if head >= self.size {
            return None;
        }
        let d = Self::read_desc(self.desc, head);
        let want = if writable { F_WRITE } else { 0 };
        (d.flags == want).then_some((d.addr, d.len))
    }

    /// Walks the chain starting at `head` into `out` (cleared first).
    pub fn chain(&self, head: u16, out: &mut Buffers) -> Result<(), BrokenChain> {
        out.clear();
        if head >= self.size {
            return Err(BrokenChain);
        }
        let mut table = self.desc;
        let mut count = u32::from(self.size);
        let mut ttl = count;
        let mut indirect = false;
        let mut index = head;
        let mut budget = self.max_walk;
        loop {
            ttl = ttl.checked_sub(1).ok_or(BrokenChain)?;
            let d = Self::read_desc(table, index);
            if d.flags & F_INDIRECT != 0 {
                // The last descriptor of the chain (after zero or more direct ones: the device
                // MUST handle that, virtio 1.2 §2.7.5.3.2), never with NEXT, never inside a
                // table.
                if indirect || d.flags & F_NEXT != 0 {
                    return Err(BrokenChain);
                }
                let entries = u64::from(d.len) / DESC_SIZE;
                if d.len == 0 || u64::from(d.len) % DESC_SIZE != 0 || entries > 65536 {
                    return Err(BrokenChain);
                }
                table = self.map.host(d.addr, u64::from(d.len)).ok_or(BrokenChain)?;
                count = u32::try_from(entries).map_err(|_| BrokenChain)?;
                // A table is walked up to the queue size or MAX_TABLE_WALK descriptors,
                // whichever is larger: Linux sizes a disk's tables by `seg_max` (ours is at
                // most 1022, plus header and status), which may exceed a small ring (QEMU's
                // vhost-user-blk defaults to 128 entries); no device here needs a longer chain,
                // and a guest's 64 Ki-entry table would cost a walk of 64 Ki reads per chain.
                // A loop runs out of `ttl`.
                ttl = count.min(u32::from(self.size).max(MAX_TABLE_WALK));
                indirect = true;
                index = 0;
                continue;
            }
            // The limit counts buffers (an indirect descriptor is not one), as DPDK's does.
            budget = budget.checked_sub(1).ok_or(BrokenChain)?;
            out.push(Buffer {
                addr: GuestAddress(d.addr),
                len: d.len,
                writable: d.flags & F_WRITE != 0,
            });
            if d.flags & F_NEXT == 0 {
                return Ok(());
            }
            if u32::from(d.next) >= count {
                return Err(BrokenChain);
            }
            index = d.next;
        }
    }

    /// A hint, never a failure: asks the CPU to start fetching the descriptor the chain at
    /// avail `position` starts with (nothing for a head outside the table). A burst asks for
    /// all its chains' descriptors at once, so their cross-core misses overlap instead of
    /// each stalling the walk (or [`SplitRing::prefetch`]) in turn.
    pub fn prefetch_desc(&self, position: u16) {
        let head = self.head(position);
        if head < self.size {
            prefetch_line(
                Self::at(self.desc, u64::from(head).saturating_mul(DESC_SIZE)),
                false,
            );
        }
    }

    /// A hint: asks the CPU to fetch, for writing, the used-ring line of used position
    /// `position`.
    pub fn prefetch_used(&self, position: u16) {
        let offset = self.slot(position).saturating_mul(8).saturating_add(4);
        prefetch_line(Self::at(self.used, offset), true);
    }

    /// A hint, never a failure: asks the CPU to start fetching the first bytes (two cache
    /// lines: a virtio-net header and a small frame) of the buffer the chain at avail
    /// `position` starts with, for reading or (`write`) for writing. Their lines were last
    /// written by the driver's core, so each first touch is a cross-core miss; fetched a few
    /// chains ahead, the misses overlap with the work on earlier chains (DPDK's vhost
    /// prefetches the same way). Reads the head and the descriptor (warming them for the
    /// real walk); does nothing for a head, descriptor or address it cannot use.
    pub fn prefetch(&self, position: u16, write: bool) {
        let head = self.head(position);
        if head >= self.size {
            return;
        }
        let d = Self::read_desc(self.desc, head);
        if d.flags & F_INDIRECT != 0 {
            return;
        }
        let lines = if d.len > 64 { 2 } else { 1 };
        let Some(start) = self.map.host(d.addr, u64::from(d.len.min(128))) else {
            return;
        };
        // In bounds: `host` checked `min(len, 128)` bytes, and the second line is only
        // touched when the buffer is longer than 64 bytes.
        for offset in [0usize, 64].into_iter().take(lines) {
            prefetch_line(start.as_ptr().wrapping_add(offset), write);
        }
    }

    /// Asks the driver not to kick (`VRING_USED_F_NO_NOTIFY`) while we poll; returns whether
    /// the flag was written. With EVENT_IDX there is nothing to do: the driver kicks only
    /// when the index passes `avail_event`, which we move only when we want kicks back.
    ///
    /// virtio-queue's `disable_notification` stores the flag on every call, through a memory
    /// snapshot and a region search; called once per pass, that store took the used ring's
    /// first line from the driver's cache each time (its kick check reads it). Here the flag
    /// is stored only when it is not already set.
    pub fn suppress_kicks(&self) -> bool {
        if self.event_idx {
            return false;
        }
        let flags = Self::at(self.used, 0);
        if Self::load_u16(flags, Ordering::Relaxed) == USED_NO_NOTIFY {
            return false;
        }
        // SAFETY: as in `load_u16`: the used ring's flags, inside the area, 2-aligned.
        unsafe { AtomicU16::from_ptr(flags.cast()) }
            .store(USED_NO_NOTIFY.to_le(), Ordering::Relaxed);
        true
    }

    /// Writes used element `(head, len)` at used position `position` (not yet visible).
    pub fn write_used(&self, position: u16, head: u16, len: u32) {
        let offset = self.slot(position).saturating_mul(8).saturating_add(4);
        let p = Self::at(self.used, offset);
        let mut element = [0u8; 8];
        let (id, length) = element.split_at_mut(4);
        id.copy_from_slice(&u32::from(head).to_le_bytes());
        length.copy_from_slice(&len.to_le_bytes());
        // SAFETY: the slot is inside the mapped used ring (offset < 4 + 8 * size); byte
        // array, no alignment requirement.
        unsafe { std::ptr::write_volatile(p.cast::<[u8; 8]>(), element) };
    }

    /// Makes used entries up to `new` visible (one index store) after `old`; returns whether
    /// the driver wants an interrupt for them (EVENT_IDX's `used_event` when negotiated,
    /// else the avail ring's NO_INTERRUPT flag).
    pub fn publish_used(&self, old: u16, new: u16) -> bool {
        let idx = Self::at(self.used, 2);
        // SAFETY: as in `load_u16`: inside the used ring, 2-aligned.
        unsafe { AtomicU16::from_ptr(idx.cast()) }.store(new.to_le(), Ordering::Release);
        // The index store must be visible before the driver's flag or used_event is read (a
        // Release store followed by an Acquire load may be reordered): the driver clears its
        // flag or moves used_event, fences, then re-reads the used index; without this fence
        // both sides can read the old values and the interrupt is lost.
        fence(Ordering::SeqCst);
        if !self.event_idx {
            let flags = Self::load_u16(Self::at(self.avail, 0), Ordering::Acquire);
            return flags & AVAIL_NO_INTERRUPT == 0;
        }
        let event_offset = u64::from(self.size).saturating_mul(2).saturating_add(4);
        let used_event = Wrapping(Self::load_u16(
            Self::at(self.avail, event_offset),
            Ordering::Acquire,
        ));
        let (old, new) = (Wrapping(old), Wrapping(new));
        new - used_event - Wrapping(1) < new - old
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
#[path = "split_tests.rs"]
mod tests;

/// Hints the CPU to fetch the cache line at `at` (for writing with `write`).
#[inline]
fn prefetch_line(at: *const u8, write: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // `_MM_HINT_ET0` compiles to a read prefetch without the `prfchw` target feature (not
        // in the x86_64 baseline, and std cannot detect it): ask for PREFETCHW itself where
        // CPUID says the CPU has it (leaf 0x8000_0001, ECX bit 8; read once).
        static PREFETCHW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let has_prefetchw = *PREFETCHW.get_or_init(|| {
            // Leaf 0x8000_0000 says whether 0x8000_0001 may be asked.
            let max = std::arch::x86_64::__cpuid(0x8000_0000).eax;
            max >= 0x8000_0001 && std::arch::x86_64::__cpuid(0x8000_0001).ecx & (1 << 8) != 0
        });
        if write && has_prefetchw {
            // SAFETY: PREFETCHW is a hint: it never faults, whatever the address, writes
            // nothing, touches no register but its address operand, and the CPU has it.
            unsafe {
                std::arch::asm!(
                    "prefetchw [{0}]",
                    in(reg) at,
                    options(nostack, preserves_flags, readonly)
                );
            }
            return;
        }
        // SAFETY: a prefetch is a hint: it never faults, whatever the address, and writes
        // nothing; SSE (which `_mm_prefetch` needs) is part of the x86_64 baseline.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, write);
}
