//! Turning a guest's descriptor chain into a validated virtio-blk request.
//!
//! Everything here is guest-controlled, so nothing is trusted: the chain is read as a stream
//! of device-readable bytes followed by device-writable bytes (VIRTIO_F_ANY_LAYOUT; no framing
//! assumed), the header is the first 16 readable bytes, the status is the last writable byte.
//! Each check failure becomes a [`Rejection`] that says whether a status byte can be written
//! (then the guest gets IOERR/UNSUPP) or not (then the head is returned with length 0), and
//! which [`Reason`] to count. Data buffers become iovecs into mapped guest memory, split where
//! a buffer crosses memory regions, and checked against the memory map.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use crate::devices::sg::{self, SgError, Span, Spans};
use crate::qos::limiter::{Cost, CostKind};
use crate::ring::map::MemMap;
use crate::storage::GuestIovecs;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::spec::{
    HEADER_LEN, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, SECTOR_SHIFT, SECTOR_SIZE, SEGMENT_LEN,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

/// Why a request was refused; each has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// The chain was cut short: a loop, too long, a bad or nested indirect table.
    BrokenChain,
    /// A device-readable descriptor after a device-writable one.
    BadLayout,
    /// No device-writable byte for the status.
    NoStatus,
    /// Fewer than 16 readable bytes.
    ShortHeader,
    /// A buffer outside guest memory, or wrapping around.
    BadAddress,
    /// Data length not a multiple of 512, or too many buffers.
    BadLength,
    /// Sector range beyond capacity or overflowing.
    OutOfRange,
    /// A write, discard or write-zeroes on a read-only device.
    ReadOnly,
    /// GET_ID with a buffer shorter than 20 bytes.
    IdBufferTooSmall,
    /// A discard/write-zeroes segment list that is empty, ragged, or too long.
    BadSegments,
    /// A request type or flag we do not implement.
    Unsupported,
}

impl Reason {
    /// Every reason, for stats.
    pub const ALL: [Reason; 11] = [
        Reason::BrokenChain,
        Reason::BadLayout,
        Reason::NoStatus,
        Reason::ShortHeader,
        Reason::BadAddress,
        Reason::BadLength,
        Reason::OutOfRange,
        Reason::ReadOnly,
        Reason::IdBufferTooSmall,
        Reason::BadSegments,
        Reason::Unsupported,
    ];

    /// Stable index into counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Stable kebab-case name for stats and logs.
    pub fn name(self) -> &'static str {
        match self {
            Reason::BrokenChain => "broken-chain",
            Reason::BadLayout => "bad-layout",
            Reason::NoStatus => "no-status",
            Reason::ShortHeader => "short-header",
            Reason::BadAddress => "bad-address",
            Reason::BadLength => "bad-length",
            Reason::OutOfRange => "out-of-range",
            Reason::ReadOnly => "read-only",
            Reason::IdBufferTooSmall => "id-buffer-too-small",
            Reason::BadSegments => "bad-segments",
            Reason::Unsupported => "unsupported",
        }
    }
}

/// A refused request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// Where to write the status, if the chain has a usable status byte.
    pub status: Option<GuestAddress>,
    /// `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP`.
    pub code: u8,
    /// What was wrong.
    pub reason: Reason,
}

/// One byte range of a discard or write-zeroes request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Whether the range may be deallocated.
    pub unmap: bool,
}

/// What a valid request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes at `offset` into the data iovecs.
    Read {
        /// Byte offset.
        offset: u64,
    },
    /// Write the data iovecs at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
    },
    /// Make completed writes durable.
    Flush,
    /// Write the serial number into the data buffer.
    GetId {
        /// Where the 20 serial bytes go.
        buffer: GuestAddress,
    },
    /// Deallocate ranges.
    Discard(Vec<ByteRange>),
    /// Zero ranges.
    WriteZeroes(Vec<ByteRange>),
}

/// A validated request.
#[derive(Debug)]
pub struct Request {
    /// What to do.
    pub kind: RequestKind,
    /// Data buffers, pointing into guest memory (reads and writes only).
    pub iovecs: GuestIovecs,
    /// Total data bytes.
    pub data_len: u32,
    /// Where the status byte goes.
    pub status: GuestAddress,
    /// Bytes the device writes into the chain (the used-ring length).
    pub used_len: u32,
}

/// The device facts that validation needs.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Capacity in bytes (a multiple of 512).
    pub capacity: u64,
    /// Writes, discards and write-zeroes are refused.
    pub readonly: bool,
}

pub use crate::devices::desc::{Buffer, Buffers};

/// The tests' convenience form of [`parse_in`] (it maps the memory for this one request).
#[cfg(test)]
pub fn parse(
    mem: &GuestMemoryMmap<()>,
    buffers: &[Buffer],
    limits: Limits,
) -> Result<Request, Rejection> {
    parse_in(mem, &MemMap::new(mem), buffers, limits)
}

/// Validates a request. `serial_len`-independent: GET_ID only checks the buffer size here.
/// `map` is the pass's map of `mem`: the header, the status byte and the data buffers are
/// translated through it (no region search per request; `mem` where a buffer does not lie
/// in one mapped region).
pub fn parse_in(
    mem: &GuestMemoryMmap<()>,
    map: &MemMap<'_>,
    buffers: &[Buffer],
    limits: Limits,
) -> Result<Request, Rejection> {
    let mut readable = Spans::new();
    let mut writable = Spans::new();
    let mut misordered = false;
    for buffer in buffers {
        let span = Span {
            addr: buffer.addr,
            len: buffer.len,
        };
        if buffer.len == 0 {
            continue;
        }
        if buffer.writable {
            writable.push(span);
        } else {
            misordered |= !writable.is_empty();
            readable.push(span);
        }
    }
    let status = status_of(mem, map, &writable).ok_or(Rejection {
        status: None,
        code: VIRTIO_BLK_S_IOERR as u8,
        reason: Reason::NoStatus,
    })?;
    let fail = |reason| reject(Some(status), reason);
    if misordered {
        return Err(fail(Reason::BadLayout));
    }

    let mut header = [0u8; HEADER_LEN];
    let header_len = sg::read_at_in(mem, map, &readable, 0, &mut header)
        .map_err(|_| fail(Reason::BadAddress))?;
    if header_len < HEADER_LEN {
        return Err(fail(Reason::ShortHeader));
    }
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    // The data: the writable bytes before the status (reads), the readable bytes after the
    // header (writes). Cut as stream offsets, not copied into span lists of their own.
    let read_len = sg::total(&writable).saturating_sub(1);
    let write_len = sg::total(&readable).saturating_sub(HEADER_LEN as u64);

    let (kind, (spans, offset, len), used_data) = match request_type {
        VIRTIO_BLK_T_IN => {
            let offset = data_range(sector, read_len, limits).map_err(fail)?;
            let data = (writable.as_slice(), 0, read_len);
            (RequestKind::Read { offset }, data, true)
        }
        VIRTIO_BLK_T_OUT => {
            if limits.readonly {
                return Err(fail(Reason::ReadOnly));
            }
            let offset = data_range(sector, write_len, limits).map_err(fail)?;
            let data = (readable.as_slice(), HEADER_LEN as u64, write_len);
            (RequestKind::Write { offset }, data, false)
        }
        VIRTIO_BLK_T_FLUSH => (RequestKind::Flush, (&[] as &[Span], 0, 0), false),
        VIRTIO_BLK_T_GET_ID => {
            let writable_data = take(&writable, read_len).map_err(fail)?;
            if sg::total(&writable_data) < u64::from(VIRTIO_BLK_ID_BYTES) {
                return Err(fail(Reason::IdBufferTooSmall));
            }
            // The serial is written with one copy; demand it fits the first buffer.
            let buffer = match writable_data.first() {
                Some(first) if first.len >= VIRTIO_BLK_ID_BYTES => first.addr,
                _ => return Err(fail(Reason::IdBufferTooSmall)),
            };
            let request = Request {
                kind: RequestKind::GetId { buffer },
                iovecs: GuestIovecs::default(),
                data_len: VIRTIO_BLK_ID_BYTES,
                status,
                used_len: VIRTIO_BLK_ID_BYTES + 1,
            };
            return Ok(request);
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if limits.readonly {
                return Err(fail(Reason::ReadOnly));
            }
            let discard = request_type == VIRTIO_BLK_T_DISCARD;
            let readable_data = skip(&readable, HEADER_LEN as u64).map_err(fail)?;
            let ranges = parse_segments(mem, &readable_data, discard, limits).map_err(
                |(code, reason)| Rejection {
                    status: Some(status),
                    code,
                    reason,
                },
            )?;
            let kind = if discard {
                RequestKind::Discard(ranges)
            } else {
                RequestKind::WriteZeroes(ranges)
            };
            (kind, (&[] as &[Span], 0, 0), false)
        }
        _ => {
            return Err(Rejection {
                status: Some(status),
                code: VIRTIO_BLK_S_UNSUPP as u8,
                reason: Reason::Unsupported,
            })
        }
    };
    let data_len = u32::try_from(len).map_err(|_| fail(Reason::BadLength))?;
    let iovecs = to_iovecs(mem, map, spans, offset, len).map_err(fail)?;
    let used_len = if used_data {
        data_len.saturating_add(1)
    } else {
        1
    };
    Ok(Request {
        kind,
        iovecs,
        data_len,
        status,
        used_len,
    })
}

fn reject(status: Option<GuestAddress>, reason: Reason) -> Rejection {
    Rejection {
        status,
        code: VIRTIO_BLK_S_IOERR as u8,
        reason,
    }
}

/// The address of the last writable byte, if it lies in guest memory.
fn status_of(
    mem: &GuestMemoryMmap<()>,
    map: &MemMap<'_>,
    writable: &[Span],
) -> Option<GuestAddress> {
    let last = writable.last()?;
    let addr = last.addr.checked_add(u64::from(last.len.checked_sub(1)?))?;
    (map.host(addr.raw_value(), 1).is_some() || GuestMemoryBackend::address_in_range(mem, addr))
        .then_some(addr)
}

/// The spans after the first `n` bytes.
fn skip(spans: &[Span], n: u64) -> Result<Spans, Reason> {
    sg::split_spans(spans, n, u64::MAX).map_err(|_| Reason::BadAddress)
}

/// The first `n` bytes of the spans.
fn take(spans: &[Span], n: u64) -> Result<Spans, Reason> {
    sg::split_spans(spans, 0, n).map_err(|_| Reason::BadAddress)
}

/// Checks sector and length of a read or write; returns the byte offset.
fn data_range(sector: u64, len: u64, limits: Limits) -> Result<u64, Reason> {
    if len % SECTOR_SIZE != 0 {
        return Err(Reason::BadLength);
    }
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(Reason::OutOfRange)?;
    let end = offset.checked_add(len).ok_or(Reason::OutOfRange)?;
    if end > limits.capacity {
        return Err(Reason::OutOfRange);
    }
    Ok(offset)
}

fn parse_segments(
    mem: &GuestMemoryMmap<()>,
    spans: &[Span],
    discard: bool,
    limits: Limits,
) -> Result<Vec<ByteRange>, (u8, Reason)> {
    let ioerr = |reason| (VIRTIO_BLK_S_IOERR as u8, reason);
    // At most MAX_DISCARD_SEGMENTS segments: read them all with one copy.
    let mut raw = [0u8; SEGMENT_LEN * MAX_DISCARD_SEGMENTS as usize];
    let total = sg::total(spans);
    let fits =
        usize::try_from(total).is_ok_and(|t| t > 0 && t <= raw.len() && t % SEGMENT_LEN == 0);
    if !fits {
        return Err(ioerr(Reason::BadSegments));
    }
    let got = sg::read_at(mem, spans, 0, &mut raw).map_err(|_| ioerr(Reason::BadAddress))?;
    let mut ranges = Vec::with_capacity(got / SEGMENT_LEN);
    for chunk in raw.get(..got).unwrap_or_default().chunks_exact(SEGMENT_LEN) {
        let Ok::<[u8; SEGMENT_LEN], _>(raw) = chunk.try_into() else {
            return Err(ioerr(Reason::BadSegments));
        };
        let sector = u64::from_le_bytes([
            raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
        ]);
        let num_sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        let reserved = flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        // virtio 1.2 §5.2.6.2: unmap on a discard, or any reserved flag, is UNSUPP.
        if reserved || (discard && unmap) {
            return Err((VIRTIO_BLK_S_UNSUPP as u8, Reason::Unsupported));
        }
        if num_sectors == 0 || num_sectors > MAX_DISCARD_SECTORS {
            return Err(ioerr(Reason::BadSegments));
        }
        let len = u64::from(num_sectors) << SECTOR_SHIFT;
        let offset = data_range(sector, len, limits).map_err(ioerr)?;
        ranges.push(ByteRange { offset, len, unmap });
    }
    Ok(ranges)
}

/// Host iovecs for stream bytes `offset..offset+len` of the spans, split at memory-region
/// boundaries, every byte checked mapped.
fn to_iovecs(
    mem: &GuestMemoryMmap<()>,
    map: &MemMap<'_>,
    spans: &[Span],
    offset: u64,
    len: u64,
) -> Result<GuestIovecs, Reason> {
    // A list this thread freed before, when it has one: no allocation per request.
    let mut iovecs = GuestIovecs::with_capacity(spans.len());
    sg::host_iovecs_in(mem, map, spans, offset, len, &mut iovecs.0).map_err(|e| match e {
        SgError::TooManySegments => Reason::BadLength,
        SgError::BadAddress | SgError::Short => Reason::BadAddress,
    })?;
    Ok(iovecs)
}

/// Most bytes one discard or write-zeroes request is charged.
pub const ZEROING_BYTES_CAP: u64 = 1 << 20;

impl Request {
    /// What the request costs against QoS limits; `None` only for GET_ID (20 bytes from
    /// memory). A flush is a write operation of no bytes (it counts against operation
    /// limits: an fsync is the most expensive thing a guest can ask for); discard and
    /// write-zeroes are a write operation and the bytes of their ranges up to
    /// [`ZEROING_BYTES_CAP`]: the host's work is metadata (`fallocate`), not a copy of that
    /// length, and one `mkfs` discarding a whole disk must not put the device (or its QoS
    /// group) minutes into debt.
    pub fn cost(&self) -> Option<Cost> {
        match self.kind {
            RequestKind::Read { .. } => Some(Cost {
                kind: CostKind::Read,
                bytes: u64::from(self.data_len),
            }),
            RequestKind::Write { .. } => Some(Cost {
                kind: CostKind::Write,
                bytes: u64::from(self.data_len),
            }),
            RequestKind::Discard(ref ranges) | RequestKind::WriteZeroes(ref ranges) => Some(Cost {
                kind: CostKind::Write,
                bytes: ranges
                    .iter()
                    .fold(0u64, |sum, range| sum.saturating_add(range.len))
                    .min(ZEROING_BYTES_CAP),
            }),
            RequestKind::Flush => Some(Cost {
                kind: CostKind::Write,
                bytes: 0,
            }),
            RequestKind::GetId { .. } => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
#[path = "request_tests.rs"]
mod tests;
