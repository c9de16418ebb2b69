//! The synchronous engine: blocking `preadv`/`pwritev`/`fdatasync`/`fallocate` on the worker
//! thread. Used where io_uring is unavailable (old kernels, seccomp) or asked for with
//! `engine=sync`. One op runs at a time, so a slow backing stalls the queue, not the daemon.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use super::iov::IovCursor;
use super::{GuestIovecs, Inline, IoOp, OpKind, RunInline};

/// Blocking I/O on one file.
#[derive(Debug)]
pub struct SyncFile {
    file: Arc<File>,
}

/// The blocking engine over one file.
pub type SyncEngine = Inline<SyncFile>;

impl SyncEngine {
    /// An engine over `file`.
    pub fn new(file: Arc<File>) -> Self {
        Inline::wrap(SyncFile { file })
    }
}

impl RunInline for SyncFile {
    fn name(&self) -> &'static str {
        "sync"
    }

    unsafe fn run(&mut self, op: IoOp) -> Result<(), i32> {
        let fd = self.file.as_raw_fd();
        match op.kind {
            // SAFETY: forwarded from the caller of `run`.
            OpKind::Read { offset } => unsafe { transfer(fd, offset, op.iovecs, Direction::Read) },
            // SAFETY: forwarded from the caller of `run`.
            OpKind::Write { offset } => unsafe {
                transfer(fd, offset, op.iovecs, Direction::Write)
            },
            // SAFETY: fdatasync only reads the fd number.
            OpKind::Flush => retry_eintr(|| unsafe { libc::fdatasync(fd) as isize }).map(drop),
            OpKind::Discard { offset, len } => fallocate(fd, PUNCH_HOLE, offset, len),
            OpKind::WriteZeroes { offset, len, unmap } => {
                fallocate(fd, write_zeroes_mode(unmap), offset, len)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    Read,
    Write,
}

/// Moves every byte of `iovecs` at `offset`, continuing short transfers. A read that returns 0
/// has hit end of file: the rest reads as zeros. A write that returns 0 made no progress: EIO.
///
/// # Safety
/// As for [`Engine::push`]: the iovecs are valid guest buffers (writable for reads) that stay
/// mapped for the duration of this call.
pub(super) unsafe fn transfer(
    fd: RawFd,
    offset: u64,
    iovecs: GuestIovecs,
    direction: Direction,
) -> Result<(), i32> {
    let mut cursor = IovCursor::new(iovecs);
    while !cursor.is_complete() {
        let position = offset_at(offset, cursor.done())?;
        let (iov, count) = (cursor.remaining().as_ptr(), iov_count(cursor.remaining()));
        // SAFETY: `iov`/`count` describe the cursor's live iovec array; the buffers are valid
        // for this direction by the caller's contract.
        let n = retry_eintr(|| unsafe {
            match direction {
                Direction::Read => libc::preadv(fd, iov, count, position),
                Direction::Write => libc::pwritev(fd, iov, count, position),
            }
        })?;
        match (n, direction) {
            (0, Direction::Write) => return Err(libc::EIO),
            // SAFETY: read buffers are writable by the caller's contract.
            (0, Direction::Read) => unsafe { cursor.zero_remaining() },
            (n, _) => cursor.advance(n),
        }
    }
    Ok(())
}

/// `fallocate` mode that deallocates a range while keeping the file size.
pub const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

/// `fallocate` mode for WRITE_ZEROES: punch when the guest allows unmapping, else zero in place
/// (keeping the blocks allocated, as the guest asked).
pub fn write_zeroes_mode(unmap: bool) -> i32 {
    if unmap {
        PUNCH_HOLE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    }
}

/// `fallocate` on a raw fd with EINTR retried; the errno on failure.
pub fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> Result<(), i32> {
    let offset = i64::try_from(offset).map_err(|_| libc::EINVAL)?;
    let len = i64::try_from(len).map_err(|_| libc::EINVAL)?;
    // SAFETY: fallocate only reads the fd number and plain integers.
    retry_eintr(|| unsafe { libc::fallocate(fd, mode, offset, len) as isize }).map(drop)
}

fn offset_at(base: u64, done: u64) -> Result<i64, i32> {
    base.checked_add(done)
        .and_then(|position| i64::try_from(position).ok())
        .ok_or(libc::EINVAL)
}

fn iov_count(iovecs: &[libc::iovec]) -> i32 {
    i32::try_from(iovecs.len()).unwrap_or(i32::MAX)
}

fn retry_eintr(mut call: impl FnMut() -> isize) -> Result<usize, i32> {
    loop {
        let rc = call();
        if rc >= 0 {
            return Ok(rc.unsigned_abs());
        }
        let errno = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        if errno != libc::EINTR {
            return Err(errno);
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
pub(crate) mod tests {
    use super::*;
    use crate::storage::{Completion, Engine};
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    pub(crate) fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    /// An op of `kind` over `buf` alone, tagged `tag`.
    pub(crate) fn op(kind: OpKind, buf: &mut [u8], tag: u64) -> IoOp {
        IoOp {
            kind,
            iovecs: vec![iov(buf)].into(),
            tag,
        }
    }

    /// Runs the engine contract checks shared by every file engine.
    pub(crate) fn engine_contract(make: fn(Arc<File>) -> Box<dyn Engine>) {
        let mut tmp = tempfile::tempfile().unwrap();
        tmp.write_all(&[0xAA; 8192]).unwrap();
        let file = Arc::new(tmp);
        let mut engine = make(file.clone());
        let mut out = Vec::new();

        // A write split over two iovecs, then read back across end of file.
        let mut a = [1u8; 512];
        let mut b = [2u8; 512];
        let write = IoOp {
            kind: OpKind::Write { offset: 4096 },
            iovecs: vec![iov(&mut a), iov(&mut b)].into(),
            tag: 1,
        };
        // SAFETY: the buffers are locals that outlive the drain below.
        unsafe { engine.push(write) };
        engine.submit().unwrap();
        engine.drain(&mut out);
        assert_eq!(
            out.pop(),
            Some(Completion {
                tag: 1,
                result: Ok(())
            })
        );

        let mut tail = [9u8; 2048];
        let read = IoOp {
            kind: OpKind::Read {
                offset: 8192 - 1024,
            },
            iovecs: vec![iov(&mut tail)].into(),
            tag: 2,
        };
        // SAFETY: as above.
        unsafe { engine.push(read) };
        engine.submit().unwrap();
        engine.drain(&mut out);
        assert_eq!(
            out.pop(),
            Some(Completion {
                tag: 2,
                result: Ok(())
            })
        );
        assert!(tail[..1024].iter().all(|&x| x == 0xAA));
        assert!(tail[1024..].iter().all(|&x| x == 0), "EOF must zero-fill");

        let mut check = [0u8; 1024];
        file.read_exact_at(&mut check, 4096).unwrap();
        assert!(check[..512].iter().all(|&x| x == 1));
        assert!(check[512..].iter().all(|&x| x == 2));

        for (tag, kind) in [
            (3, OpKind::Flush),
            (
                4,
                OpKind::Discard {
                    offset: 0,
                    len: 4096,
                },
            ),
            (
                5,
                OpKind::WriteZeroes {
                    offset: 4096,
                    len: 512,
                    unmap: false,
                },
            ),
        ] {
            // SAFETY: no buffers.
            unsafe {
                engine.push(IoOp {
                    kind,
                    iovecs: GuestIovecs::default(),
                    tag,
                })
            };
        }
        engine.submit().unwrap();
        engine.drain(&mut out);
        out.sort_by_key(|c| c.tag);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
        file.read_exact_at(&mut check, 4096).unwrap();
        assert!(check[..512].iter().all(|&x| x == 0));
        assert!(check[512..].iter().all(|&x| x == 2));
        file.read_exact_at(&mut check, 0).unwrap();
        assert!(check.iter().all(|&x| x == 0));
        assert_eq!(engine.in_flight(), 0);
    }

    #[test]
    fn sync_engine_contract() {
        engine_contract(|file| Box::new(SyncEngine::new(file)));
    }

    #[test]
    fn write_errors_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        let mut engine = SyncEngine::new(file);
        let mut buf = [0u8; 512];
        // SAFETY: `buf` outlives the reap.
        unsafe {
            engine.push(IoOp {
                kind: OpKind::Write { offset: 0 },
                iovecs: vec![iov(&mut buf)].into(),
                tag: 7,
            })
        };
        let mut out = Vec::new();
        engine.reap(&mut out);
        assert_eq!(out[0].result, Err(libc::EBADF));
    }
}
