//! A snapshot of the guest memory map for one burst: guest-physical ranges to host addresses,
//! with the last region hit remembered, so translating a descriptor costs a compare or two
//! instead of vm-memory's region search per access.
//!
//! Built from the memory guard a worker already holds for the burst, so it always matches the
//! front-end's current memory table (a SET_MEM_TABLE swaps the guard, the next burst builds a
//! new map). Building one is a walk over the regions (at most a few) into an inline array: no
//! allocation for up to 8 regions.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::cell::Cell;
use std::marker::PhantomData;
use std::ptr::NonNull;

use smallvec::SmallVec;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::vring::GuestMemory;

/// One mapped region.
#[derive(Debug, Clone, Copy)]
struct Region {
    start: u64,
    len: u64,
    host: NonNull<u8>,
}

/// Guest memory as host addresses, valid while the memory it was built from is borrowed.
#[derive(Debug)]
pub struct MemMap<'m> {
    // Inline for up to 32 regions (vhost-user front-ends use 8 unless they configure more
    // memory slots): building the map allocates nothing.
    regions: SmallVec<[Region; 32]>,
    last: Cell<usize>,
    _memory: PhantomData<&'m GuestMemory>,
}

impl<'m> MemMap<'m> {
    /// The map of `memory` (regions that are not host-mapped are left out: nothing in them
    /// translates).
    pub fn new(memory: &'m GuestMemory) -> Self {
        let regions = memory
            .iter()
            .filter_map(|region| {
                let host = region.get_host_address(MemoryRegionAddress(0)).ok()?;
                Some(Region {
                    start: region.start_addr().raw_value(),
                    len: region.len(),
                    host: NonNull::new(host)?,
                })
            })
            .collect();
        Self {
            regions,
            last: Cell::new(0),
            _memory: PhantomData,
        }
    }

    /// The host address of the `len` bytes at guest address `gpa`, if all of them lie in one
    /// region.
    #[inline]
    pub fn host(&self, gpa: u64, len: u64) -> Option<NonNull<u8>> {
        let last = self.last.get();
        if let Some(r) = self.regions.get(last) {
            if let Some(p) = Self::inside(r, gpa, len) {
                return Some(p);
            }
        }
        for (i, r) in self.regions.iter().enumerate() {
            if let Some(p) = Self::inside(r, gpa, len) {
                self.last.set(i);
                return Some(p);
            }
        }
        None
    }

    /// Copies guest bytes `gpa..gpa+dst.len()` into `dst`; false (nothing copied) unless
    /// they lie in one mapped region.
    #[inline]
    pub fn read(&self, gpa: u64, dst: &mut [u8]) -> bool {
        let Some(src) = self.host(gpa, dst.len() as u64) else {
            return false;
        };
        // SAFETY: `host` checked that `dst.len()` bytes from `src` lie inside one region
        // mapped for as long as the memory snapshot this map borrows; `dst` is our own
        // memory, never guest memory, so the two cannot overlap. The guest may change the
        // bytes meanwhile: the caller gets some value of each byte and checks what it got.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr(), dst.len()) };
        true
    }

    /// The `N` guest bytes at `gpa`, if they lie in one mapped region: a copy of a size known
    /// when compiling (a few register moves), where [`MemMap::read`] calls `memmove`.
    #[inline]
    pub fn read_array<const N: usize>(&self, gpa: u64) -> Option<[u8; N]> {
        let src = self.host(gpa, N as u64)?;
        // SAFETY: `host` checked that `N` bytes from `src` lie inside one region mapped for
        // as long as the memory snapshot this map borrows; a byte array has no alignment
        // requirement. The guest may change the bytes meanwhile: the caller gets some value
        // of each byte and checks what it got (as in `read`).
        Some(unsafe { std::ptr::read_unaligned(src.as_ptr().cast::<[u8; N]>()) })
    }

    /// Writes `src` into guest bytes `gpa..gpa+src.len()`; false (nothing written) unless
    /// they lie in one mapped region.
    #[inline]
    pub fn write(&self, gpa: u64, src: &[u8]) -> bool {
        let Some(dst) = self.host(gpa, src.len() as u64) else {
            return false;
        };
        // SAFETY: as in `read`, with the roles swapped: `dst` is inside one mapped region,
        // `src` is our own memory.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_ptr(), src.len()) };
        true
    }

    #[inline]
    fn inside(r: &Region, gpa: u64, len: u64) -> Option<NonNull<u8>> {
        let offset = gpa.checked_sub(r.start)?;
        let end = offset.checked_add(len)?;
        if end > r.len {
            return None;
        }
        Self::offset(r, offset)
    }

    #[inline]
    fn offset(r: &Region, offset: u64) -> Option<NonNull<u8>> {
        let offset = usize::try_from(offset).ok()?;
        // SAFETY: `offset` is within the region's mapping (checked by the callers against its
        // length), so the result stays inside one allocation and is not null.
        Some(unsafe { NonNull::new_unchecked(r.host.as_ptr().add(offset)) })
    }
}

/// Copies `len` guest bytes from `src` (in `from`'s memory) to `dst` (in `to`'s), guest memory
/// to guest memory with one `memmove`; false (nothing copied) unless each range lies in one
/// mapped region.
#[inline]
pub fn copy(from: &MemMap<'_>, src: u64, to: &MemMap<'_>, dst: u64, len: u64) -> bool {
    let (Some(a), Some(b), Ok(count)) =
        (from.host(src, len), to.host(dst, len), usize::try_from(len))
    else {
        return false;
    };
    // SAFETY: `host` checked both ranges lie inside regions mapped for as long as the two
    // memory snapshots the maps borrow. The two may be the same bytes seen through one
    // mapping (overlapping ranges of one map: `ptr::copy` is a memmove), or through two
    // mappings of one guest's memory (two NICs of one guest on one switch, a hostile guest
    // pointing one's rx buffer at the other's tx frame), which memmove cannot see: the
    // receiver may then get scrambled bytes of that guest's own, and nothing is read or
    // written outside the two checked ranges. The guest may change the bytes meanwhile,
    // which changes only what the receiver gets.
    unsafe { std::ptr::copy(a.as_ptr(), b.as_ptr(), count) };
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn ranges_translate_only_inside_one_region() {
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x10000), 0x1000),
        ])
        .unwrap();
        let map = MemMap::new(&mem);
        let a = map.host(0x10, 0x10).unwrap();
        assert_eq!(
            a.as_ptr() as usize,
            mem.get_host_address(GuestAddress(0x10)).unwrap() as usize
        );
        assert!(map.host(0xff0, 0x20).is_none(), "crosses two regions");
        assert!(map.host(0x2000, 1).is_none(), "a hole");
        assert!(map.host(0x10fff, 2).is_none(), "past the end");
        assert!(map.host(u64::MAX, 2).is_none(), "wraps");
        let c = map.host(0x10800, 0x800).unwrap();
        assert_eq!(
            c.as_ptr() as usize,
            mem.get_host_address(GuestAddress(0x10800)).unwrap() as usize
        );
        assert!(map.host(0x10, 0).is_some());
    }

    #[test]
    fn reads_writes_and_copies_stay_inside_one_region() {
        use vm_memory::Bytes;
        let mem =
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
                .unwrap();
        let map = MemMap::new(&mem);
        assert!(map.write(0x10, b"hello"));
        let mut got = [0u8; 5];
        assert!(map.read(0x10, &mut got));
        assert_eq!(&got, b"hello");
        assert_eq!(map.read_array::<5>(0x10), Some(*b"hello"));
        assert_eq!(map.read_array::<3>(0xffe), None, "crosses two regions");
        assert_eq!(map.read_array::<3>(0x1ffe), None, "past the end");
        assert!(!map.write(0xffe, b"xyz"), "crosses two regions");
        assert!(!map.read(0x1ffe, &mut got), "past the end");
        let mut back = [0u8; 3];
        mem.read_slice(&mut back, GuestAddress(0xffe)).unwrap();
        assert_eq!(back, [0, 0, 0], "a refused write writes nothing");
        // Guest to guest, overlapping ranges included (memmove).
        assert!(copy(&map, 0x10, &map, 0x12, 5));
        let mut moved = [0u8; 7];
        mem.read_slice(&mut moved, GuestAddress(0x10)).unwrap();
        assert_eq!(&moved, b"hehello");
        let other = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let other_map = MemMap::new(&other);
        assert!(copy(&map, 0x12, &other_map, 0x100, 5));
        let mut there = [0u8; 5];
        other.read_slice(&mut there, GuestAddress(0x100)).unwrap();
        assert_eq!(&there, b"hello");
        assert!(
            !copy(&map, 0xffe, &other_map, 0, 4),
            "source crosses regions"
        );
        assert!(
            !copy(&map, 0, &other_map, 0xffe, 4),
            "destination past the end"
        );
    }
}
