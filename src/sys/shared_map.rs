//! A shared, writable mapping of part of a file a front-end handed us (an inflight region, a
//! dirty-page log), after the checks that keep a hostile file from hurting the daemon: a
//! regular file, not on hugetlbfs (its mappings round up to huge pages), large enough for the
//! range, at a page-aligned offset. The range is registered with the SIGBUS handler, so a file
//! shrunk after the checks reads zeros instead of ending the daemon. Unmapped on drop.

// Front-end-controlled numbers flow through here: no arithmetic that can panic or wrap.
#![deny(clippy::arithmetic_side_effects)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// `statfs.f_type` of hugetlbfs.
const HUGETLBFS_MAGIC: libc::c_long = 0x9584_58f6;
/// The page size offsets must be aligned to.
const PAGE: u64 = 4096;

/// Why a file could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The file or range is not acceptable.
    #[error("{0}")]
    Refused(String),
    /// A system call failed.
    #[error("{action}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io(action: &'static str) -> impl FnOnce(std::io::Error) -> MapError {
    move |source| MapError::Io { action, source }
}

/// `len` bytes of a file, mapped shared and writable.
pub struct SharedMapping {
    base: NonNull<u8>,
    len: usize,
    file: File,
    /// The range's registration with the SIGBUS handler (dropped with the mapping).
    owner: u64,
}

// SAFETY: the mapping is owned by this value until Drop; users access it through atomics
// (or their own synchronisation), never through references that outlive it.
unsafe impl Send for SharedMapping {}
// SAFETY: as above: the value itself hands out only the base pointer and length.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Maps `len` bytes at `offset` of `file`, after the checks in the module docs.
    pub fn map(file: File, offset: u64, len: usize) -> Result<Self, MapError> {
        if len == 0 {
            return Err(MapError::Refused("an empty range".into()));
        }
        let meta = file.metadata().map_err(io("inspect the fd"))?;
        if !meta.is_file() {
            return Err(MapError::Refused("the fd is not a regular file".into()));
        }
        // SAFETY: a zeroed statfs is a valid value for fstatfs to fill.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs fills `fs`, a live writable statfs, for an fd we hold.
        if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
            return Err(io("inspect the fd's filesystem")(
                std::io::Error::last_os_error(),
            ));
        }
        if fs.f_type == HUGETLBFS_MAGIC {
            return Err(MapError::Refused("a hugetlbfs file".into()));
        }
        let end = u64::try_from(len)
            .ok()
            .and_then(|len| offset.checked_add(len));
        if !end.is_some_and(|end| end <= meta.len()) {
            return Err(MapError::Refused(format!(
                "offset {offset} + {len} bytes past the file's {} bytes",
                meta.len()
            )));
        }
        let offset_ok = offset.checked_rem(PAGE) == Some(0);
        let Some(offset) = libc::off_t::try_from(offset).ok().filter(|_| offset_ok) else {
            return Err(MapError::Refused("offset not page-aligned".into()));
        };
        // SAFETY: a new shared mapping of `len` bytes of a regular file we hold, at a
        // page-aligned offset inside it (checked above); nothing else is mapped there.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io("mmap")(std::io::Error::last_os_error()));
        }
        let Some(base) = NonNull::new(ptr.cast::<u8>()) else {
            return Err(MapError::Refused("mmap returned null".into()));
        };
        let mapping = Self {
            base,
            len,
            file,
            owner: crate::sys::sigbus::new_owner(),
        };
        crate::sys::sigbus::register(mapping.owner, base.as_ptr() as usize, len)
            .map_err(|e| MapError::Refused(e.to_string()))?;
        Ok(mapping)
    }

    /// The first byte (page-aligned).
    pub fn base(&self) -> NonNull<u8> {
        self.base
    }

    /// The file mapped.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true (an empty range is refused); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // Unregistered first: the range may be mapped again by someone else at once.
        crate::sys::sigbus::unregister(self.owner);
        // SAFETY: unmapping exactly the mapping made in `map` (a normal-page file, so its
        // length is what was mapped); users keep the value alive while they use the memory.
        if unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) } != 0 {
            log::error!("munmap: {}", std::io::Error::last_os_error());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hostile_files_and_ranges_are_refused() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(8192).unwrap();
        let copy = || file.try_clone().unwrap();
        assert!(SharedMapping::map(copy(), 0, 8192).is_ok());
        assert!(SharedMapping::map(copy(), 4096, 4096).is_ok());
        assert!(
            SharedMapping::map(copy(), 4096, 4097).is_err(),
            "past the end"
        );
        assert!(SharedMapping::map(copy(), 100, 10).is_err(), "unaligned");
        assert!(
            SharedMapping::map(copy(), u64::MAX, 10).is_err(),
            "overflow"
        );
        assert!(SharedMapping::map(copy(), 0, 0).is_err(), "empty");
        let dir = File::open("/").unwrap();
        assert!(SharedMapping::map(dir, 0, 10).is_err(), "not a file");
    }
}
