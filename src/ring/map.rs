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
    regions: SmallVec<[Region; 8]>,
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
}
