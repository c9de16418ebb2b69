//! Bounce buffers for `direct` (O_DIRECT) disks: the kernel refuses O_DIRECT transfers whose
//! buffers are not aligned to the logical block size (EINVAL), but virtio lets a guest put its
//! data anywhere. A request with any unaligned buffer goes through one aligned buffer of our
//! own instead (QEMU does the same): writes are copied in before submission, reads copied out
//! after completion. Aligned requests (what Linux sends) stay zero-copy.

use crate::storage::GuestIovecs;

/// An aligned buffer standing in for a request's guest buffers.
pub struct Bounce {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
    guest: GuestIovecs,
    read: bool,
}

impl std::fmt::Debug for Bounce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bounce")
            .field("len", &self.len)
            .field("read", &self.read)
            .finish()
    }
}

/// Whether any buffer's address or length is not a multiple of `align`.
pub fn needed(iovecs: &[libc::iovec], align: usize) -> bool {
    iovecs.iter().any(|iov| {
        (iov.iov_base as usize).checked_rem(align) != Some(0)
            || iov.iov_len.checked_rem(align) != Some(0)
    })
}

impl Bounce {
    /// A bounce buffer for `guest` (`read`: the device fills it; else it holds the data to
    /// write, copied in now).
    ///
    /// # Safety
    /// For a write, every iovec of `guest` must be valid for reads of its length now.
    pub unsafe fn new(guest: GuestIovecs, align: usize, read: bool) -> Self {
        let len: usize = guest
            .iter()
            .map(|iov| iov.iov_len)
            .fold(0, usize::saturating_add);
        let storage = vec![0u8; len.saturating_add(align)];
        let offset = storage.as_ptr().align_offset(align.max(1)).min(align);
        let mut bounce = Self {
            storage,
            offset,
            len,
            guest,
            read,
        };
        if !read {
            let mut at = 0usize;
            for iov in bounce.guest.iter() {
                let Some(dst) = bounce.storage.get_mut(
                    offset.saturating_add(at)
                        ..offset.saturating_add(at).saturating_add(iov.iov_len),
                ) else {
                    break;
                };
                // SAFETY: the caller guarantees the guest buffer is readable for `iov_len`
                // bytes; `dst` is ours, of the same length, and does not overlap it.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        iov.iov_base.cast::<u8>(),
                        dst.as_mut_ptr(),
                        iov.iov_len,
                    )
                };
                at = at.saturating_add(iov.iov_len);
            }
        }
        bounce
    }

    /// The one aligned iovec the engine transfers to or from. It points into this buffer,
    /// which must outlive the transfer (the worker keeps it with the request).
    pub fn iovecs(&mut self) -> GuestIovecs {
        let base = self
            .storage
            .get_mut(self.offset..)
            .map_or(std::ptr::null_mut(), |s| s.as_mut_ptr());
        GuestIovecs(vec![libc::iovec {
            iov_base: base.cast(),
            iov_len: self.len,
        }])
    }

    /// After a successful read: copies the data out into the guest's buffers.
    ///
    /// # Safety
    /// Every iovec of the guest buffers must be valid for writes of its length now.
    pub unsafe fn finish(self) {
        if !self.read {
            return;
        }
        let mut at = self.offset;
        for iov in self.guest.iter() {
            let Some(src) = self.storage.get(at..at.saturating_add(iov.iov_len)) else {
                break;
            };
            // SAFETY: the caller guarantees the guest buffer is writable for `iov_len` bytes;
            // `src` is ours, of the same length, and does not overlap it.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), iov.iov_base.cast::<u8>(), iov.iov_len)
            };
            at = at.saturating_add(iov.iov_len);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::storage::sync::tests::iov;

    #[test]
    fn unaligned_buffers_go_through_an_aligned_copy_both_ways() {
        let mut backing = vec![0u8; 8192];
        let (a, b) = backing.split_at_mut(1 + 300);
        let a = &mut a[1..]; // 300 bytes at an odd address
        let b = &mut b[..212];
        a.fill(1);
        b.fill(2);
        let guest = GuestIovecs(vec![iov(a), iov(b)]);
        assert!(needed(&guest, 512));
        // SAFETY: `a` and `b` are live locals.
        let mut write = unsafe { Bounce::new(guest, 512, false) };
        let out = write.iovecs();
        assert_eq!(out[0].iov_base as usize % 512, 0);
        assert_eq!(out[0].iov_len, 512);
        // SAFETY: the bounce buffer is live.
        let bytes = unsafe { std::slice::from_raw_parts(out[0].iov_base.cast::<u8>(), 512) };
        assert!(bytes[..300].iter().all(|&x| x == 1) && bytes[300..].iter().all(|&x| x == 2));
        // A read: the device fills the aligned buffer, then it is copied out.
        let guest = GuestIovecs(vec![iov(a), iov(b)]);
        // SAFETY: as above.
        let mut read = unsafe { Bounce::new(guest, 512, true) };
        let into = read.iovecs();
        // SAFETY: the bounce buffer is live and ours.
        unsafe { std::ptr::write_bytes(into[0].iov_base.cast::<u8>(), 7, 512) };
        // SAFETY: `a` and `b` are live and nothing else touches them.
        unsafe { read.finish() };
        assert!(a.iter().all(|&x| x == 7) && b.iter().all(|&x| x == 7));
    }
}
