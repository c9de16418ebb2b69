//! Checks on what a front-end hands the daemon with its messages, before `vhost-user-backend`
//! uses it. The relay drops the connection of a front-end that fails them; every other
//! tenant goes on.
//!
//! - Memory regions (`SET_MEM_TABLE`, `ADD_MEM_REG`) must be regular files (memfd, hugetlbfs,
//!   shm) at least as large as the mapped range: mapping past the end of a file succeeds, and
//!   the first access there raises SIGBUS, which would kill the whole daemon.
//! - Kick, call and error fds (`SET_VRING_KICK/CALL/ERR`) must be eventfds, and are made
//!   non-blocking: a pipe, or an eventfd the front-end filled to its limit, would block a
//!   worker (and with it a switch sender) on a read or a write. The flag belongs to the open
//!   file, which the front-end shares and may clear again: kicks are therefore read with
//!   `RWF_NOWAIT` (`sys::kick::consume`), the relay's own kicks have a timeout
//!   (`sys::kick::Kicker`), and a call fd is checked before each write and refused for good
//!   once found blocking (`CheckedVring::signal_locked`; one race is left: a flag cleared
//!   between that check and the write, on the front-end's first try).
//!
//! A file shrunk after it was mapped (seals would forbid it; QEMU does not seal its memory)
//! is handled where the fault happens: `sys::sigbus` maps zeros over the lost pages.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

const SET_MEM_TABLE: u32 = 5;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const ADD_MEM_REG: u32 = 37;
/// Bytes of one region description: guest address, size, front-end address, mmap offset.
pub const REGION_LEN: usize = 32;

/// The region count a `SET_MEM_TABLE` payload gives (its first u32), if it has one.
pub fn table_count(payload: &[u8]) -> Option<usize> {
    let count = u32::from_le_bytes(payload.get(0..4)?.try_into().ok()?);
    usize::try_from(count).ok()
}

/// Region `index` of a `SET_MEM_TABLE` payload (after the count and 4 bytes of padding), if
/// the payload holds it.
pub fn table_region(payload: &[u8], index: usize) -> Option<&[u8]> {
    let start = index.checked_mul(REGION_LEN)?.checked_add(8)?;
    payload.get(start..start.checked_add(REGION_LEN)?)
}

/// Why a message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckError {
    /// A region's file is not a regular file, or smaller than the range mapped from it.
    #[error("memory region {index}: {reason}")]
    Region {
        /// The region's place in the message.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A kick/call/err fd is not an eventfd.
    #[error("request {request}: the descriptor is not an eventfd")]
    NotEventfd {
        /// The request.
        request: u32,
    },
    /// The payload does not hold what the request says.
    #[error("request {request}: malformed payload")]
    Malformed {
        /// The request.
        request: u32,
    },
}

/// Checks one message's descriptors against what its payload says.
pub fn check(request: u32, payload: &[u8], files: &[File]) -> Result<(), CheckError> {
    match request {
        SET_MEM_TABLE => {
            let count = table_count(payload).ok_or(CheckError::Malformed { request })?;
            for (index, file) in files.iter().enumerate().take(count) {
                let region =
                    table_region(payload, index).ok_or(CheckError::Malformed { request })?;
                check_region(index, region, file)?;
            }
            Ok(())
        }
        ADD_MEM_REG => match (
            payload.get(8..8usize.saturating_add(REGION_LEN)),
            files.first(),
        ) {
            (Some(region), Some(file)) => check_region(0, region, file),
            _ => Err(CheckError::Malformed { request }),
        },
        SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => {
            for file in files {
                if !is_eventfd(file) {
                    return Err(CheckError::NotEventfd { request });
                }
                set_nonblocking(file);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A region (guest address, size, front-end address, mmap offset) and its file.
fn check_region(index: usize, region: &[u8], file: &File) -> Result<(), CheckError> {
    let field = |i: usize| {
        let start = i.saturating_mul(8);
        region
            .get(start..start.saturating_add(8))
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(0, u64::from_le_bytes)
    };
    let (size, offset) = (field(1), field(3));
    let fail = |reason: String| CheckError::Region { index, reason };
    let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
    let kind = meta.file_type();
    if !kind.is_file() || kind.is_fifo() || kind.is_socket() {
        return Err(fail("not a regular file (memfd, hugetlbfs or shm)".into()));
    }
    let end = offset
        .checked_add(size)
        .ok_or_else(|| fail("offset + size overflows".into()))?;
    if end > meta.size() {
        return Err(fail(format!(
            "maps bytes {offset}..{end} of a {}-byte file",
            meta.size()
        )));
    }
    Ok(())
}

fn is_eventfd(file: &File) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventfd]")
}

fn set_nonblocking(file: &File) {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own (`file`), with no pointers involved.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests fail loudly by design
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn memfd(size: u64) -> File {
        // SAFETY: a NUL-terminated name and no flags; the returned fd is owned by the File.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).unwrap();
        file
    }

    fn region(size: u64, offset: u64) -> Vec<u8> {
        let mut out = vec![0u8; 8];
        for v in [0u64, size, 0x7f00_0000_0000, offset] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    #[test]
    fn a_region_past_the_end_of_its_file_is_refused() {
        let file = memfd(1 << 20);
        assert_eq!(
            check(
                ADD_MEM_REG,
                &region(1 << 20, 0),
                &[file.try_clone().unwrap()]
            ),
            Ok(())
        );
        assert!(check(
            ADD_MEM_REG,
            &region(2 << 20, 0),
            &[file.try_clone().unwrap()]
        )
        .is_err());
        assert!(check(
            ADD_MEM_REG,
            &region(1 << 20, 4096),
            &[file.try_clone().unwrap()]
        )
        .is_err());
        assert!(check(ADD_MEM_REG, &region(u64::MAX, 1), &[file]).is_err());
        // The table form: the count, padding, then the regions.
        let mut table = vec![1, 0, 0, 0, 0, 0, 0, 0];
        table.extend_from_slice(&region(4 << 20, 0)[8..]);
        assert!(check(SET_MEM_TABLE, &table, &[memfd(1 << 20)]).is_err());
    }

    #[test]
    fn kick_and_call_fds_must_be_eventfds_and_become_non_blocking() {
        use std::os::fd::IntoRawFd;
        let event = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        // SAFETY: `into_raw_fd` hands over the only owner of the descriptor.
        let file = unsafe { File::from_raw_fd(event.into_raw_fd()) };
        assert_eq!(
            check(SET_VRING_CALL, &[0; 8], &[file.try_clone().unwrap()]),
            Ok(())
        );
        // SAFETY: F_GETFL on a descriptor we own.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NONBLOCK, 0);
        let (read, _write) = std::io::pipe().unwrap();
        let pipe = File::from(std::os::fd::OwnedFd::from(read));
        assert_eq!(
            check(SET_VRING_KICK, &[0; 8], &[pipe]),
            Err(CheckError::NotEventfd {
                request: SET_VRING_KICK
            })
        );
    }
}
