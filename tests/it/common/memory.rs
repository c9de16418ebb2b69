//! Guest memory for tests: memfd-backed regions the daemon maps through SET_MEM_TABLE.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Guest memory made of memfd regions at the given guest-physical ranges.
pub struct TestMemory {
    pub mem: GuestMemoryMmap<()>,
    files: Vec<File>,
}

impl TestMemory {
    /// Regions `(gpa, size)`; sizes must be page multiples.
    pub fn new(ranges: &[(u64, usize)]) -> TestMemory {
        let mut regions = Vec::new();
        let mut files = Vec::new();
        for &(gpa, size) in ranges {
            // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd
            // that we own immediately below.
            let fd = unsafe { libc::memfd_create(c"novacron-test".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0, "memfd_create failed");
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            let file = unsafe { File::from_raw_fd(fd) };
            file.set_len(size as u64).expect("memfd size");
            let mapping =
                MmapRegion::from_file(FileOffset::new(file.try_clone().unwrap(), 0), size)
                    .expect("mmap memfd");
            regions.push(GuestRegionMmap::new(mapping, GuestAddress(gpa)).expect("region"));
            files.push(file);
        }
        TestMemory {
            mem: GuestMemoryMmap::from_regions(regions).expect("guest memory"),
            files,
        }
    }

    /// Adds a memfd region at `gpa` (for ADD_MEM_REG); returns its descriptor for the message.
    pub fn add_region(&mut self, gpa: u64, size: usize) -> VhostUserMemoryRegionInfo {
        let extra = TestMemory::new(&[(gpa, size)]);
        use vm_memory::GuestMemoryBackend;
        let mut regions: Vec<GuestRegionMmap> = Vec::new();
        for r in self.mem.iter().chain(extra.mem.iter()) {
            use vm_memory::GuestMemoryRegion;
            let file = r
                .file_offset()
                .expect("file-backed")
                .file()
                .try_clone()
                .unwrap();
            let mapping =
                MmapRegion::from_file(FileOffset::new(file, 0), r.len() as usize).unwrap();
            regions.push(GuestRegionMmap::new(mapping, r.start_addr()).unwrap());
        }
        self.mem = GuestMemoryMmap::from_regions(regions).expect("guest memory");
        self.files.extend(extra.files);
        self.regions()
            .into_iter()
            .find(|r| r.guest_phys_addr == gpa)
            .expect("new region")
    }

    /// Shrinks region `index`'s file to `len` bytes (a hostile front-end: the daemon's next
    /// access past the new end faults). The test must not touch that memory either after.
    pub fn truncate_region(&self, index: usize, len: u64) {
        self.files[index].set_len(len).expect("truncate memfd");
    }

    /// The region table for SET_MEM_TABLE.
    pub fn regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        use vm_memory::GuestMemoryBackend;
        use vm_memory::GuestMemoryRegion;
        self.mem
            .iter()
            .map(|region| {
                let fd = region
                    .file_offset()
                    .expect("file-backed")
                    .file()
                    .as_raw_fd();
                (region, fd)
            })
            .map(|(region, fd)| VhostUserMemoryRegionInfo {
                guest_phys_addr: vm_memory::GuestMemoryRegion::start_addr(region).0,
                memory_size: vm_memory::GuestMemoryRegion::len(region),
                userspace_addr: region.as_ptr() as u64,
                mmap_offset: 0,
                mmap_handle: fd,
            })
            .collect()
    }

    /// Translates a guest address to the front-end's virtual address (for SET_VRING_ADDR).
    pub fn host_address(&self, gpa: u64) -> u64 {
        use vm_memory::GuestMemoryBackend;
        self.mem
            .get_host_address(GuestAddress(gpa))
            .expect("gpa mapped") as u64
    }
}
