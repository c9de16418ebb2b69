//! Scatter-gather over guest memory, shared by block requests and net frames: a chain's
//! bytes as [`Span`]s (guest address + length, each from one descriptor), cut and walked as
//! one byte stream; host iovecs for the kernel (split where the stream crosses memory
//! regions, at most [`MAX_IOVECS`]); copies between streams and our memory, or guest to
//! guest with no bounce buffer. Every address is checked against the memory map; nothing
//! here knows virtio-blk or virtio-net.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use smallvec::SmallVec;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

use crate::ring::map::MemMap;
use crate::vring::GuestMemory;

/// Why a stream could not be walked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SgError {
    /// A piece lies outside guest memory (or its address wraps).
    #[error("buffer outside guest memory")]
    BadAddress,
    /// The stream ended before the bytes asked for.
    #[error("stream too short")]
    Short,
    /// More iovecs than one `readv`/`writev` takes.
    #[error("more than {MAX_IOVECS} segments")]
    TooManySegments,
}

/// `readv`/`writev` take at most this many iovecs.
pub const MAX_IOVECS: usize = 1024;

/// A contiguous piece of a chain's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A chain's spans, on the stack for the usual short chains.
pub type Spans = SmallVec<[Span; 8]>;

/// Host iovecs for `len` bytes of the stream starting at `offset`, split where the stream
/// crosses memory regions. At most [`MAX_IOVECS`].
pub fn host_iovecs(
    mem: &GuestMemory,
    spans: &[Span],
    offset: u64,
    len: u64,
    out: &mut Vec<libc::iovec>,
) -> Result<(), SgError> {
    // The hot path of every block request and tap frame: pieces are cut lazily and pushed
    // straight out, with no intermediate list.
    for part in Pieces::new(spans, offset, len) {
        push_slices(mem, part?, out)?;
    }
    Ok(())
}

/// [`host_iovecs`], each piece translated through `map` (a burst's map of `mem`) when it lies
/// in one mapped region (no region search per piece), else through `mem` as there.
pub fn host_iovecs_in(
    mem: &GuestMemory,
    map: &MemMap<'_>,
    spans: &[Span],
    offset: u64,
    len: u64,
    out: &mut Vec<libc::iovec>,
) -> Result<(), SgError> {
    for part in Pieces::new(spans, offset, len) {
        let part = part?;
        match map.host(part.addr.raw_value(), u64::from(part.len)) {
            Some(host) => push_iovec(out, host.as_ptr().cast(), part.len as usize)?,
            None => push_slices(mem, part, out)?,
        }
    }
    Ok(())
}

/// Appends the iovecs of `part`, split where it crosses memory regions.
fn push_slices(mem: &GuestMemory, part: Span, out: &mut Vec<libc::iovec>) -> Result<(), SgError> {
    let count = usize::try_from(part.len).map_err(|_| SgError::BadAddress)?;
    for slice in GuestMemoryBackend::get_slices(mem, part.addr, count) {
        let slice = slice.map_err(|_| SgError::BadAddress)?;
        push_iovec(out, slice.ptr_guard_mut().as_ptr().cast(), slice.len())?;
    }
    Ok(())
}

/// Appends one iovec, at most [`MAX_IOVECS`] in all.
fn push_iovec(
    out: &mut Vec<libc::iovec>,
    base: *mut libc::c_void,
    len: usize,
) -> Result<(), SgError> {
    if out.len() >= MAX_IOVECS {
        return Err(SgError::TooManySegments);
    }
    out.push(libc::iovec {
        iov_base: base,
        iov_len: len,
    });
    Ok(())
}

/// The spans covering stream bytes `offset..offset+len`, one at a time (fewer bytes if the
/// stream ends first).
struct Pieces<'s> {
    spans: std::slice::Iter<'s, Span>,
    offset: u64,
    len: u64,
}

impl<'s> Pieces<'s> {
    fn new(spans: &'s [Span], offset: u64, len: u64) -> Self {
        Self {
            spans: spans.iter(),
            offset,
            len,
        }
    }
}

impl Iterator for Pieces<'_> {
    type Item = Result<Span, SgError>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.len > 0 {
            let span = self.spans.next()?;
            let span_len = u64::from(span.len);
            if self.offset >= span_len {
                self.offset = self.offset.saturating_sub(span_len);
                continue;
            }
            let take = span_len.saturating_sub(self.offset).min(self.len);
            let piece = match span.addr.checked_add(self.offset) {
                // `take <= span.len`, a u32.
                Some(addr) => u32::try_from(take)
                    .map(|len| Span { addr, len })
                    .map_err(|_| SgError::BadAddress),
                None => Err(SgError::BadAddress),
            };
            self.len = self.len.saturating_sub(take);
            self.offset = 0;
            return Some(piece);
        }
        None
    }
}

type Slices<'a> = SmallVec<[VolatileSlice<'a, ()>; 2]>;

/// The stream's bytes `offset..offset+len` as volatile slices of guest memory (fewer bytes if
/// the stream ends first).
fn stream_slices<'a>(
    mem: &'a GuestMemory,
    spans: &[Span],
    offset: u64,
    len: u64,
) -> Result<Slices<'a>, SgError> {
    let mut slices = Slices::new();
    for part in Pieces::new(spans, offset, len) {
        let part = part?;
        for slice in GuestMemoryBackend::get_slices(mem, part.addr, part.len as usize) {
            slices.push(slice.map_err(|_| SgError::BadAddress)?);
        }
    }
    Ok(slices)
}

/// Calls `f(guest address, buffer range)` for each piece of the stream's bytes
/// `offset..offset+len`; returns how many bytes the stream held (fewer than `len` if it ends).
fn walk(
    spans: &[Span],
    offset: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), SgError>,
) -> Result<usize, SgError> {
    let mut done = 0usize;
    for part in Pieces::new(spans, offset, len as u64) {
        let part = part?;
        let end = done.saturating_add(part.len as usize);
        f(part.addr, done..end)?;
        done = end;
    }
    Ok(done)
}

/// Copies stream bytes from `offset` into `dst`; the stream must hold them all.
pub fn read_stream(
    mem: &GuestMemory,
    spans: &[Span],
    offset: u64,
    dst: &mut [u8],
) -> Result<(), SgError> {
    let len = dst.len();
    if read_at(mem, spans, offset, dst)? == len {
        Ok(())
    } else {
        Err(SgError::Short)
    }
}

/// Writes `src` into the stream at `offset`; the stream must have room for it all.
pub fn write_stream(
    mem: &GuestMemory,
    spans: &[Span],
    offset: u64,
    src: &[u8],
) -> Result<(), SgError> {
    if copy_in(mem, spans, offset, src)? == src.len() as u64 {
        Ok(())
    } else {
        Err(SgError::Short)
    }
}

/// Where stream bytes `offset..offset+len` lie if the first span holds them all (the usual
/// case for a header: a chain's first buffer holds it).
fn in_first_span(spans: &[Span], offset: u64, len: usize) -> Option<u64> {
    let first = spans.first()?;
    let end = offset.checked_add(u64::try_from(len).ok()?)?;
    (end <= u64::from(first.len)).then_some(first.addr.raw_value().checked_add(offset)?)
}

/// [`read_stream`] through `map`, a burst's map of `mem`, when the first span holds the
/// bytes (no region search per call); else as [`read_stream`].
pub fn read_stream_in(
    mem: &GuestMemory,
    map: &MemMap<'_>,
    spans: &[Span],
    offset: u64,
    dst: &mut [u8],
) -> Result<(), SgError> {
    let len = dst.len();
    if read_at_in(mem, map, spans, offset, dst)? == len {
        Ok(())
    } else {
        Err(SgError::Short)
    }
}

/// [`read_at`] through `map`, a burst's map of `mem`, when the first span holds the bytes;
/// else as [`read_at`].
pub fn read_at_in(
    mem: &GuestMemory,
    map: &MemMap<'_>,
    spans: &[Span],
    offset: u64,
    dst: &mut [u8],
) -> Result<usize, SgError> {
    match in_first_span(spans, offset, dst.len()) {
        Some(at) if map.read(at, dst) => Ok(dst.len()),
        _ => read_at(mem, spans, offset, dst),
    }
}

/// [`write_stream`] through `map` when the first span holds the bytes (as
/// [`read_stream_in`]).
pub fn write_stream_in(
    mem: &GuestMemory,
    map: &MemMap<'_>,
    spans: &[Span],
    offset: u64,
    src: &[u8],
) -> Result<(), SgError> {
    match in_first_span(spans, offset, src.len()) {
        Some(at) if map.write(at, src) => Ok(()),
        _ => write_stream(mem, spans, offset, src),
    }
}

/// The spans covering stream bytes `offset..offset+len` (fewer bytes if the stream ends).
pub fn split_spans(spans: &[Span], offset: u64, len: u64) -> Result<Spans, SgError> {
    Pieces::new(spans, offset, len).collect()
}

/// Copies `len` bytes from one guest's stream (at `src_offset`) into another's (at
/// `dst_offset`), guest memory to guest memory with no bounce buffer. Returns the bytes copied
/// (less than `len` if either stream ends first).
pub fn copy_between(
    src_mem: &GuestMemory,
    src: &[Span],
    src_offset: u64,
    dst_mem: &GuestMemory,
    dst: &[Span],
    dst_offset: u64,
    len: u64,
) -> Result<u64, SgError> {
    // The usual case: the bytes lie in one span on each side, each inside one memory region:
    // one copy, no slice lists (found without building any: this runs per frame).
    if let (Some(from), Some(to)) = (
        within_one(src, src_offset, len),
        within_one(dst, dst_offset, len),
    ) {
        if let (Ok(count), true) = (usize::try_from(len), len > 0) {
            if let (Ok(a), Ok(b)) = (
                GuestMemoryBackend::get_slice(src_mem, from, count),
                GuestMemoryBackend::get_slice(dst_mem, to, count),
            ) {
                a.copy_to_volatile_slice(b);
                return Ok(len);
            }
        }
    }
    let from = stream_slices(src_mem, src, src_offset, len)?;
    let to = stream_slices(dst_mem, dst, dst_offset, len)?;
    Ok(copy_slices(&from, &to))
}

/// The guest address of stream bytes `offset..offset+len` if they lie in one span.
fn within_one(spans: &[Span], offset: u64, len: u64) -> Option<GuestAddress> {
    let mut offset = offset;
    for span in spans {
        let span_len = u64::from(span.len);
        if offset < span_len {
            return if len <= span_len.saturating_sub(offset) {
                span.addr.checked_add(offset)
            } else {
                None
            };
        }
        offset = offset.saturating_sub(span_len);
    }
    None
}

/// Copies `src` (bytes in our memory) into the stream at `offset`; returns bytes copied.
pub fn copy_in(mem: &GuestMemory, dst: &[Span], offset: u64, src: &[u8]) -> Result<u64, SgError> {
    let done = walk(dst, offset, src.len(), |addr, range| {
        let part = src.get(range).ok_or(SgError::BadAddress)?;
        mem.write_slice(part, addr).map_err(|_| SgError::BadAddress)
    })?;
    Ok(done as u64)
}

/// Pairwise copy over two slice lists of possibly different cut points.
fn copy_slices(from: &[VolatileSlice<'_, ()>], to: &[VolatileSlice<'_, ()>]) -> u64 {
    let (mut fi, mut ti) = (from.iter(), to.iter());
    let (mut f, mut t) = (fi.next().copied(), ti.next().copied());
    let mut copied = 0u64;
    while let (Some(src), Some(dst)) = (f, t) {
        let n = src.len().min(dst.len());
        src.copy_to_volatile_slice(dst);
        copied = copied.saturating_add(n as u64);
        f = if n < src.len() {
            src.offset(n).ok()
        } else {
            fi.next().copied()
        };
        t = if n < dst.len() {
            dst.offset(n).ok()
        } else {
            ti.next().copied()
        };
    }
    copied
}

/// Total bytes of `spans`.
pub fn total(spans: &[Span]) -> u64 {
    spans
        .iter()
        .map(|s| u64::from(s.len))
        .fold(0u64, u64::saturating_add)
}

/// Copies stream bytes from `offset` into `dst` as far as the stream goes; returns how many.
pub fn read_at(
    mem: &GuestMemory,
    spans: &[Span],
    offset: u64,
    dst: &mut [u8],
) -> Result<usize, SgError> {
    let len = dst.len();
    walk(spans, offset, len, |addr, range| {
        let chunk = dst.get_mut(range).ok_or(SgError::BadAddress)?;
        mem.read_slice(chunk, addr).map_err(|_| SgError::BadAddress)
    })
}
