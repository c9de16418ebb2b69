//! A cursor over an iovec list, for continuing short reads and writes.
//!
//! The cursor never dereferences the iovecs except in [`IovCursor::zero_remaining`], whose
//! caller promises the memory is writable.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

/// Iovecs pointing into mapped guest memory: a request's data buffers on their way from the
/// request parser through the worker to an engine and the kernel.
#[derive(Debug, Default)]
pub struct GuestIovecs(pub Vec<libc::iovec>);

// SAFETY: the iovecs are plain addresses in guest memory. Whoever holds them also holds that
// memory's mapping alive (the blk worker's in-flight table pins the request's guest memory
// snapshot until its completion) and is the only one to hand them to an engine or the kernel;
// which thread holds them changes neither. This is the one place raw guest pointers become `Send`.
unsafe impl Send for GuestIovecs {}

/// Most freed lists a thread keeps for reuse, and the largest one it keeps (bounded memory:
/// 256 x 64 iovecs = 256 KiB per thread at most).
const POOL_LISTS: usize = 256;
const POOL_LARGEST: usize = 64;
/// Room every new list gets at least, so a recycled list fits the next request (most need
/// one to a few iovecs) and is not grown.
const LIST_MIN: usize = 8;

thread_local! {
    /// Empty lists this thread freed, for the next requests it parses: a worker completes
    /// what it submitted, so its requests reuse each other's lists and the hot path does not
    /// allocate (checked by the blk worker's tests with a counting allocator).
    static POOL: std::cell::RefCell<Vec<Vec<libc::iovec>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl GuestIovecs {
    /// An empty list with room for `n` iovecs, one this thread freed earlier when it can.
    pub fn with_capacity(n: usize) -> Self {
        let recycled = POOL
            .try_with(|pool| pool.try_borrow_mut().ok().and_then(|mut p| p.pop()))
            .ok()
            .flatten();
        match recycled {
            Some(mut list) => {
                list.reserve(n);
                Self(list)
            }
            None => Self(Vec::with_capacity(n.max(LIST_MIN))),
        }
    }
}

impl Drop for GuestIovecs {
    fn drop(&mut self) {
        let mut list = std::mem::take(&mut self.0);
        if list.capacity() == 0 || list.capacity() > POOL_LARGEST {
            return;
        }
        list.clear();
        // A thread being torn down (or a pool in use: never, but no panic in a destructor)
        // frees the list instead.
        let _ = POOL.try_with(|pool| {
            if let Ok(mut pool) = pool.try_borrow_mut() {
                if pool.capacity() == 0 {
                    // Once per thread, the pool at its full size: never grown list by list
                    // (a deeper queue would otherwise allocate at each new peak).
                    pool.reserve_exact(POOL_LISTS);
                }
                if pool.len() < POOL_LISTS {
                    pool.push(list);
                }
            }
        });
    }
}

impl From<Vec<libc::iovec>> for GuestIovecs {
    fn from(iovecs: Vec<libc::iovec>) -> Self {
        Self(iovecs)
    }
}

impl std::ops::Deref for GuestIovecs {
    type Target = [libc::iovec];

    fn deref(&self) -> &[libc::iovec] {
        &self.0
    }
}

/// Tracks how much of an iovec list has been transferred.
#[derive(Debug)]
pub struct IovCursor {
    remaining: GuestIovecs,
    done: u64,
    total: u64,
}

impl IovCursor {
    /// Starts at the first byte of `iovecs`.
    pub fn new(iovecs: GuestIovecs) -> Self {
        let total = iovecs.iter().map(|iov| iov.iov_len as u64).sum();
        let mut cursor = Self {
            remaining: iovecs,
            done: 0,
            total,
        };
        cursor.remaining.0.retain(|iov| iov.iov_len > 0);
        cursor
    }

    /// Bytes transferred so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Whether every byte has been transferred.
    pub fn is_complete(&self) -> bool {
        self.remaining.is_empty()
    }

    /// The iovecs still to transfer.
    pub fn remaining(&self) -> &[libc::iovec] {
        &self.remaining
    }

    /// Marks `n` more bytes transferred; `n` larger than what remains is clamped.
    pub fn advance(&mut self, mut n: usize) {
        let mut consumed = 0usize;
        for iov in &mut self.remaining.0 {
            if n == 0 {
                break;
            }
            if let Some(rest) = n.checked_sub(iov.iov_len) {
                n = rest;
                self.done = self.done.saturating_add(iov.iov_len as u64);
                consumed = consumed.saturating_add(1);
            } else {
                // SAFETY: n < iov_len, so the new base stays inside the same buffer; it is only
                // pointer arithmetic, nothing is dereferenced.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n) }.cast();
                iov.iov_len = iov.iov_len.saturating_sub(n);
                self.done = self.done.saturating_add(n as u64);
                n = 0;
            }
        }
        self.remaining.0.drain(..consumed);
        debug_assert!(self.done <= self.total);
    }

    /// Copies `src` into the remaining iovecs, in order; returns the bytes copied (fewer than
    /// `src` if the iovecs end first).
    ///
    /// # Safety
    /// The remaining iovecs must be valid for writes and not accessed by anyone else.
    pub unsafe fn copy_in(&mut self, src: &[u8]) -> usize {
        let mut done = 0usize;
        for iov in &mut self.remaining.0 {
            let Some(rest) = src.get(done..) else {
                break;
            };
            let n = rest.len().min(iov.iov_len);
            if n == 0 {
                break;
            }
            // SAFETY: the caller guarantees the buffer is writable for iov_len bytes, and
            // `n <= iov_len`; `rest` is ours and does not overlap guest memory.
            unsafe { std::ptr::copy_nonoverlapping(rest.as_ptr(), iov.iov_base.cast::<u8>(), n) };
            done = done.saturating_add(n);
        }
        self.advance(done);
        done
    }

    /// Fills every remaining byte with zeros (a read that hit end of file) and completes.
    ///
    /// # Safety
    /// The remaining iovecs must be valid for writes and not accessed by anyone else.
    pub unsafe fn zero_remaining(&mut self) {
        for iov in self.remaining.0.drain(..) {
            // SAFETY: the caller guarantees the buffer is writable for iov_len bytes.
            unsafe { std::ptr::write_bytes(iov.iov_base.cast::<u8>(), 0, iov.iov_len) };
            self.done = self.done.saturating_add(iov.iov_len as u64);
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn advance_across_and_within_iovecs() {
        let mut a = [1u8; 4];
        let mut b = [2u8; 8];
        let mut cursor = IovCursor::new(vec![iov(&mut a), iov(&mut b)].into());
        cursor.advance(6);
        assert_eq!(cursor.done(), 6);
        assert_eq!(cursor.remaining().len(), 1);
        assert_eq!(cursor.remaining()[0].iov_len, 6);
        cursor.advance(100);
        assert!(cursor.is_complete());
        assert_eq!(cursor.done(), 12);
    }

    #[test]
    fn zero_fill_after_short_read() {
        let mut a = [7u8; 8];
        let mut cursor = IovCursor::new(vec![iov(&mut a)].into());
        cursor.advance(3);
        // SAFETY: `a` is a live local buffer nobody else touches.
        unsafe { cursor.zero_remaining() };
        assert!(cursor.is_complete());
        assert_eq!(a, [7, 7, 7, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn empty_iovecs_are_complete() {
        let cursor = IovCursor::new(GuestIovecs(vec![libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }]));
        assert!(cursor.is_complete());
    }
}
