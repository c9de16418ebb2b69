//! Net descriptor chains: a transmit chain becomes a checked frame, a receive chain becomes
//! room for one (or, with mergeable buffers, part of one); and the byte moves between them.
//!
//! Everything is guest-controlled. A tx chain must be device-readable only, hold at least the
//! 12-byte virtio-net header, pass [`NetHeader::check`], and map entirely into guest memory.
//! An rx chain must be device-writable only, map entirely, and hold at least the header. The
//! header is read once into our memory and used from there (the guest may rewrite its copy
//! while we work). Frames move without an intermediate copy (`crate::devices::sg`):
//! `host_iovecs` feeds `readv`/`writev` on a tap; `copy_between` copies guest to guest for
//! the switch.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use vm_memory::{Address, GuestMemoryBackend};

use super::header::{NetHeader, HEADER_LEN, MAX_GSO_FRAME};
use super::stats::Drop;
use crate::devices::desc::Buffer;
use crate::devices::sg::{read_stream, read_stream_in, SgError};
pub use crate::devices::sg::{Span, Spans, MAX_IOVECS};
use crate::ring::map::MemMap;
use crate::vring::GuestMemory;

impl From<SgError> for Drop {
    fn from(e: SgError) -> Self {
        match e {
            SgError::BadAddress => Drop::BadAddress,
            SgError::Short => Drop::ShortHeader,
            SgError::TooManySegments => Drop::TooManySegments,
        }
    }
}

/// A checked transmit chain.
#[derive(Debug, Clone, Default)]
pub struct TxFrame {
    /// The header as read once from the guest and checked.
    pub header: NetHeader,
    /// The whole chain, header first.
    pub spans: Spans,
    /// Frame length: the chain's bytes after the header.
    pub frame_len: u32,
    /// The frame's Ethernet header, read once with the virtio header (zeros past the end of
    /// a shorter frame): what the switch decides on and what leaves with the frame.
    pub eth: [u8; 14],
}

/// A checked receive chain.
#[derive(Debug, Clone, Default)]
pub struct RxBuffer {
    /// The descriptor head to return it with.
    pub head: u16,
    /// Its writable bytes.
    pub spans: Spans,
    /// Their total.
    pub capacity: u32,
}

/// A frame on its way through a switch.
#[derive(Debug, Clone, Copy)]
pub enum FrameRef<'a> {
    /// In a sending guest's tx buffers, as checked: the chain (header first), our copies of
    /// its virtio and Ethernet headers. Whatever leaves carries those copies, not a second
    /// read (the sender's other vCPUs could change the source MAC or add a VLAN tag in
    /// between).
    Guest {
        /// The sender's memory.
        memory: &'a GuestMemory,
        /// The sender's burst map of that memory, for copies without a region search.
        map: Option<&'a MemMap<'a>>,
        /// The checked chain.
        frame: &'a TxFrame,
    },
    /// In our memory (from an uplink tap, or after a software checksum).
    Bytes {
        /// The header.
        header: NetHeader,
        /// The Ethernet frame.
        frame: &'a [u8],
    },
}

impl FrameRef<'_> {
    /// The (checked) virtio-net header.
    pub fn header(&self) -> NetHeader {
        match self {
            FrameRef::Guest { frame, .. } => frame.header,
            FrameRef::Bytes { header, .. } => *header,
        }
    }

    /// Bytes after the header.
    #[allow(clippy::len_without_is_empty)] // a frame is never empty once checked
    pub fn len(&self) -> u32 {
        match self {
            FrameRef::Guest { frame, .. } => frame.frame_len,
            FrameRef::Bytes { frame, .. } => u32::try_from(frame.len()).unwrap_or(u32::MAX),
        }
    }

    /// The first bytes of the Ethernet frame (for the forwarding decision; zeros past the end
    /// of a shorter frame).
    pub fn ethernet_header(&self) -> [u8; 14] {
        match self {
            FrameRef::Guest { frame, .. } => frame.eth,
            FrameRef::Bytes { frame, .. } => {
                let mut eth = [0u8; 14];
                for (dst, src) in eth.iter_mut().zip(frame.iter()) {
                    *dst = *src;
                }
                eth
            }
        }
    }

    /// The checked Ethernet header a guest frame must leave the switch with (its first
    /// `min(len, 14)` bytes count); frames in our memory cannot change under us.
    pub fn checked_ethernet(&self) -> Option<&[u8; 14]> {
        match self {
            FrameRef::Guest { frame, .. } => Some(&frame.eth),
            FrameRef::Bytes { .. } => None,
        }
    }

    /// The frame linearised into `out` (replacing its contents; with the checked Ethernet
    /// header, if any). `out` is reused by its owner: no allocation once it is large enough.
    pub fn linearise_into(&self, out: &mut Vec<u8>) -> Result<(), Drop> {
        out.clear();
        match self {
            FrameRef::Guest { memory, frame, .. } => {
                out.resize(frame.frame_len as usize, 0);
                read_stream(memory, &frame.spans, HEADER_LEN as u64, out)?;
                for (dst, src) in out.iter_mut().zip(&frame.eth) {
                    *dst = *src;
                }
            }
            FrameRef::Bytes { frame, .. } => out.extend_from_slice(frame),
        }
        Ok(())
    }
}

/// The frames of a burst, by index, as [`SwitchHub::transmit_burst`] reads them: a slice
/// of frames, or a sender's checked tx slots seen as frames without building a list of them
/// per burst.
///
/// [`SwitchHub::transmit_burst`]: super::fabric::SwitchHub::transmit_burst
pub trait Frames {
    /// How many.
    fn count(&self) -> usize;
    /// Frame `i`.
    fn frame(&self, i: usize) -> Option<FrameRef<'_>>;
}

impl Frames for [FrameRef<'_>] {
    fn count(&self) -> usize {
        self.len()
    }

    fn frame(&self, i: usize) -> Option<FrameRef<'_>> {
        self.get(i).copied()
    }
}

/// Checks a transmit chain for a link with `mtu`.
pub fn tx_frame(mem: &GuestMemory, buffers: &[Buffer], mtu: u16) -> Result<TxFrame, Drop> {
    let mut frame = TxFrame::default();
    tx_frame_into(mem, &MemMap::new(mem), buffers, mtu, &mut frame)?;
    Ok(frame)
}

/// [`tx_frame`] through `map`, a burst's map of `mem` (no region search per buffer), into
/// `out` (a slot the caller reuses: the frame, its ~150 bytes of inline spans included, is
/// written in place, not moved through return values; on an error `out` holds garbage).
pub fn tx_frame_into(
    mem: &GuestMemory,
    map: &MemMap<'_>,
    buffers: &[Buffer],
    mtu: u16,
    out: &mut TxFrame,
) -> Result<(), Drop> {
    if buffers.iter().any(|b| b.writable) {
        return Err(Drop::BadLayout);
    }
    let total = mapped_spans(mem, map, buffers, &mut out.spans)?;
    let frame_len = total
        .checked_sub(HEADER_LEN as u64)
        .ok_or(Drop::ShortHeader)?;
    if frame_len > MAX_GSO_FRAME as u64 {
        return Err(Drop::TooLarge);
    }
    // The virtio header and the Ethernet header, read straight from the first buffer (where
    // most drivers put both) into their places: the Ethernet header into the slot, the
    // virtio header into registers. Not through one 26-byte array: a copy of its last 14
    // bytes out of it loads what two overlapping stores wrote, a load the CPU cannot serve
    // from its store buffer, and it waited each frame for the stores to reach the cache
    // (half of this function's time in a 64-byte drain). Otherwise the read walks the spans;
    // zeros stay past the end of a frame shorter than 14 bytes.
    const HEADERS: usize = HEADER_LEN + 14;
    let first = out
        .spans
        .first()
        .filter(|first| first.len as usize >= HEADERS)
        .map(|first| first.addr.0);
    let whole = first.and_then(|gpa| {
        let virtio = map.read_array::<HEADER_LEN>(gpa)?;
        let eth = map.read_array::<14>(gpa.checked_add(HEADER_LEN as u64)?)?;
        Some((virtio, eth))
    });
    let virtio = match whole {
        Some((virtio, eth)) => {
            out.eth = eth;
            virtio
        }
        None => {
            let mut raw = [0u8; HEADERS];
            let want = usize::try_from(total).map_or(raw.len(), |total| total.min(raw.len()));
            read_stream_in(
                mem,
                map,
                &out.spans,
                0,
                raw.get_mut(..want).unwrap_or_default(),
            )?;
            let (virtio, eth) = raw.split_at(HEADER_LEN);
            out.eth = eth.try_into().map_err(|_| Drop::ShortHeader)?;
            virtio.try_into().map_err(|_| Drop::ShortHeader)?
        }
    };
    let header = NetHeader::parse(&virtio).map_err(|_| Drop::ShortHeader)?;
    let frame_len = u32::try_from(frame_len).map_err(|_| Drop::TooLarge)?;
    header.check(frame_len as usize, mtu).map_err(|e| match e {
        super::header::HeaderError::TooLarge(_) => Drop::TooLarge,
        _ => Drop::BadHeader,
    })?;
    out.header = header;
    out.frame_len = frame_len;
    Ok(())
}

/// Checks a receive chain.
pub fn rx_buffer(mem: &GuestMemory, head: u16, buffers: &[Buffer]) -> Result<RxBuffer, Drop> {
    let mut buffer = RxBuffer::default();
    rx_buffer_into(mem, &MemMap::new(mem), head, buffers, &mut buffer)?;
    Ok(buffer)
}

/// [`rx_buffer`] through `map`, a burst's map of `mem`, into `out` (reused in place, as in
/// [`tx_frame_into`]).
pub fn rx_buffer_into(
    mem: &GuestMemory,
    map: &MemMap<'_>,
    head: u16,
    buffers: &[Buffer],
    out: &mut RxBuffer,
) -> Result<(), Drop> {
    if buffers.iter().any(|b| !b.writable) {
        return Err(Drop::BadLayout);
    }
    let total = mapped_spans(mem, map, buffers, &mut out.spans)?;
    if total < HEADER_LEN as u64 {
        return Err(Drop::ShortHeader);
    }
    out.head = head;
    // Every buffer length is a u32, but a chain can sum past it: cap, we never fill more.
    out.capacity = u32::try_from(total).unwrap_or(u32::MAX);
    Ok(())
}

/// The buffers as `spans` (cleared first), each checked to lie in guest memory (in one
/// region of `map`, or across adjacent regions as vm-memory sees them); returns their total
/// length.
fn mapped_spans(
    mem: &GuestMemory,
    map: &MemMap<'_>,
    buffers: &[Buffer],
    spans: &mut Spans,
) -> Result<u64, Drop> {
    if spans.spilled() {
        // A reused slot gives back what a long chain made it allocate: otherwise every slot
        // would keep the largest list a guest ever sent it (up to a 1026-entry indirect
        // table's worth each, in every queue's and every sender thread's slots).
        *spans = Spans::new();
    }
    spans.clear();
    let mut total = 0u64;
    for buffer in buffers.iter().filter(|b| b.len > 0) {
        let last = buffer
            .addr
            .checked_add(u64::from(buffer.len).saturating_sub(1))
            .ok_or(Drop::BadAddress)?;
        let inside = map
            .host(buffer.addr.raw_value(), u64::from(buffer.len))
            .is_some()
            || mem.check_range(buffer.addr, buffer.len as usize);
        if !inside || last < buffer.addr {
            return Err(Drop::BadAddress);
        }
        spans.push(Span {
            addr: buffer.addr,
            len: buffer.len,
        });
        total = total.saturating_add(u64::from(buffer.len));
    }
    Ok(total)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;
    use crate::devices::net::header::{F_NEEDS_CSUM, GSO_TCPV4};
    use crate::devices::sg::{copy_between, copy_in, host_iovecs, write_stream};
    use vm_memory::Bytes;
    use vm_memory::GuestAddress;

    fn memory() -> GuestMemory {
        // Two regions with a gap, so streams cross region boundaries.
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x10000), 0x10000)])
            .unwrap()
    }

    fn readable(addr: u64, len: u32) -> Buffer {
        Buffer {
            addr: GuestAddress(addr),
            len,
            writable: false,
        }
    }

    fn writable(addr: u64, len: u32) -> Buffer {
        Buffer {
            writable: true,
            ..readable(addr, len)
        }
    }

    fn put_header(mem: &GuestMemory, addr: u64, header: NetHeader) {
        mem.write_slice(&header.to_bytes(), GuestAddress(addr))
            .unwrap();
    }

    #[test]
    fn a_header_split_over_three_descriptors_is_read_whole() {
        let mem = memory();
        let header = NetHeader {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..NetHeader::default()
        };
        let bytes = header.to_bytes();
        mem.write_slice(&bytes[..3], GuestAddress(0x100)).unwrap();
        mem.write_slice(&bytes[3..7], GuestAddress(0x200)).unwrap();
        mem.write_slice(&bytes[7..], GuestAddress(0x300)).unwrap();
        let chain = [
            readable(0x100, 3),
            readable(0x200, 4),
            readable(0x300, 5 + 60),
        ];
        let eth: Vec<u8> = (1..=14).collect();
        mem.write_slice(&eth, GuestAddress(0x305)).unwrap();
        let frame = tx_frame(&mem, &chain, 1500).unwrap();
        assert_eq!(frame.header, header);
        assert_eq!(frame.frame_len, 60);
        assert_eq!(
            frame.eth[..],
            eth[..],
            "read with the header, across buffers"
        );
    }

    #[test]
    fn the_ethernet_header_is_read_with_the_virtio_header_and_zero_past_a_runt() {
        let mem = memory();
        put_header(&mem, 0x100, NetHeader::default());
        let eth: Vec<u8> = (1..=14).collect();
        mem.write_slice(&eth, GuestAddress(0x100 + HEADER_LEN as u64))
            .unwrap();
        let whole = tx_frame(&mem, &[readable(0x100, 12 + 60)], 1500).unwrap();
        assert_eq!(whole.eth[..], eth[..]);
        // A 5-byte runt: its bytes, then zeros (the switch refuses it by length).
        let runt = tx_frame(&mem, &[readable(0x100, 12 + 5)], 1500).unwrap();
        assert_eq!(runt.frame_len, 5);
        assert_eq!(runt.eth, [1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn stream_reads_and_writes_take_the_map_or_fall_back_to_the_spans() {
        use crate::devices::sg::{read_stream_in, write_stream_in};
        let mem = memory();
        let map = MemMap::new(&mem);
        let spans = [
            Span {
                addr: GuestAddress(0x100),
                len: 4,
            },
            Span {
                addr: GuestAddress(0x200),
                len: 8,
            },
        ];
        // Inside the first span (through the map), then across both (through vm-memory).
        write_stream_in(&mem, &map, &spans, 1, &[1, 2]).unwrap();
        write_stream_in(&mem, &map, &spans, 3, &[3, 4, 5]).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x101)).unwrap(), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x201)).unwrap(), 5);
        let mut got = [0u8; 5];
        read_stream_in(&mem, &map, &spans, 1, &mut got).unwrap();
        assert_eq!(got, [1, 2, 3, 4, 5]);
        assert_eq!(
            read_stream_in(&mem, &map, &spans, 10, &mut got),
            Err(SgError::Short)
        );
    }

    #[test]
    fn iovecs_and_reads_through_the_map_match_the_ones_through_vm_memory() {
        use crate::devices::sg::{host_iovecs_in, read_at, read_at_in, MAX_IOVECS};
        let mem = memory();
        let map = MemMap::new(&mem);
        let spans = [
            Span {
                addr: GuestAddress(0x100),
                len: 16,
            },
            // Crosses from the first region into the second: vm-memory splits it.
            Span {
                addr: GuestAddress(0xfff0),
                len: 0x20,
            },
        ];
        for (offset, len) in [(0, 48), (4, 40), (16, 32), (20, 1), (0, 100)] {
            let (mut through_map, mut through_mem) = (Vec::new(), Vec::new());
            host_iovecs_in(&mem, &map, &spans, offset, len, &mut through_map).unwrap();
            host_iovecs(&mem, &spans, offset, len, &mut through_mem).unwrap();
            let pairs = |v: &[libc::iovec]| -> Vec<(usize, usize)> {
                v.iter().map(|i| (i.iov_base as usize, i.iov_len)).collect()
            };
            assert_eq!(pairs(&through_map), pairs(&through_mem), "{offset}+{len}");
        }
        let mut out = vec![
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0
            };
            MAX_IOVECS
        ];
        assert_eq!(
            host_iovecs_in(&mem, &map, &spans, 0, 1, &mut out),
            Err(SgError::TooManySegments)
        );
        let outside = [Span {
            addr: GuestAddress(0x1f000),
            len: 0x2000,
        }];
        assert_eq!(
            host_iovecs_in(&mem, &map, &outside, 0, 0x2000, &mut Vec::new()),
            Err(SgError::BadAddress)
        );
        mem.write_slice(&[7; 48], GuestAddress(0x100)).unwrap();
        let (mut a, mut b) = ([0u8; 20], [0u8; 20]);
        assert_eq!(read_at_in(&mem, &map, &spans, 0, &mut a[..8]).unwrap(), 8);
        assert_eq!(
            read_at_in(&mem, &map, &spans, 30, &mut a).unwrap(),
            18,
            "short"
        );
        assert_eq!(read_at(&mem, &spans, 30, &mut b).unwrap(), 18);
        assert_eq!(a, b);
    }

    #[test]
    fn a_reused_slot_keeps_no_heap_from_a_long_chain() {
        let mem = memory();
        put_header(&mem, 0x100, NetHeader::default());
        let map = MemMap::new(&mem);
        let mut slot = TxFrame::default();
        // Header, then 20 one-byte buffers: more spans than a slot holds inline.
        let long: Vec<Buffer> = std::iter::once(readable(0x100, 12))
            .chain((0..20).map(|i| readable(0x1000 + i, 1)))
            .collect();
        tx_frame_into(&mem, &map, &long, 1500, &mut slot).unwrap();
        assert!(slot.spans.spilled());
        tx_frame_into(&mem, &map, &[readable(0x100, 12 + 60)], 1500, &mut slot).unwrap();
        assert!(
            !slot.spans.spilled(),
            "the long chain's list was given back"
        );
        assert_eq!(slot.frame_len, 60);
    }

    #[test]
    fn bad_tx_chains_are_refused_with_their_reason() {
        let mem = memory();
        put_header(&mem, 0x100, NetHeader::default());
        assert_eq!(
            tx_frame(&mem, &[readable(0x100, 11)], 1500).unwrap_err(),
            Drop::ShortHeader
        );
        assert_eq!(
            tx_frame(&mem, &[readable(0x100, 12), writable(0x200, 60)], 1500).unwrap_err(),
            Drop::BadLayout
        );
        assert_eq!(
            tx_frame(&mem, &[readable(0x100, 12), readable(0x30000, 60)], 1500).unwrap_err(),
            Drop::BadAddress
        );
        assert_eq!(
            tx_frame(
                &mem,
                &[readable(0x100, 12), readable(u64::MAX - 10, 60)],
                1500
            )
            .unwrap_err(),
            Drop::BadAddress
        );
        assert_eq!(
            tx_frame(&mem, &[readable(0x100, 12 + 1519)], 1500).unwrap_err(),
            Drop::TooLarge
        );
        put_header(
            &mem,
            0x100,
            NetHeader {
                gso_type: GSO_TCPV4,
                gso_size: 0,
                ..NetHeader::default()
            },
        );
        assert_eq!(
            tx_frame(&mem, &[readable(0x100, 12 + 60)], 1500).unwrap_err(),
            Drop::BadHeader
        );
        put_header(
            &mem,
            0x100,
            NetHeader {
                flags: F_NEEDS_CSUM,
                csum_start: 50,
                csum_offset: 16,
                ..NetHeader::default()
            },
        );
        assert_eq!(
            tx_frame(&mem, &[readable(0x100, 12 + 60)], 1500).unwrap_err(),
            Drop::BadHeader
        );
        // A huge GSO frame that the chain lengths claim: refused before any read.
        let many: Vec<Buffer> = (0..40)
            .map(|i| readable(0x100 + i * 0x800, 0x800))
            .collect();
        assert_eq!(tx_frame(&mem, &many, 1500).unwrap_err(), Drop::TooLarge);
    }

    #[test]
    fn rx_buffers_must_be_writable_mapped_and_hold_a_header() {
        let mem = memory();
        assert_eq!(
            rx_buffer(&mem, 0, &[writable(0x100, 11)]).unwrap_err(),
            Drop::ShortHeader
        );
        assert_eq!(
            rx_buffer(&mem, 0, &[readable(0x100, 1500)]).unwrap_err(),
            Drop::BadLayout
        );
        assert_eq!(
            rx_buffer(&mem, 0, &[writable(0x1ff00, 0x200)]).unwrap_err(),
            Drop::BadAddress
        );
        let ok = rx_buffer(&mem, 7, &[writable(0x100, 6), writable(0x200, 1520)]).unwrap();
        assert_eq!((ok.head, ok.capacity), (7, 1526));
    }

    #[test]
    fn guest_to_guest_copies_cross_spans_and_regions() {
        let a = memory();
        let b = memory();
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        // Source stream: 12 header bytes then data, crossing the region boundary.
        a.write_slice(&data[..1000], GuestAddress(0xfc18)).unwrap();
        a.write_slice(&data[1000..], GuestAddress(0x20)).unwrap();
        let src = [
            Span {
                addr: GuestAddress(0xfc0c),
                len: 12 + 1000,
            },
            Span {
                addr: GuestAddress(0x20),
                len: 2000,
            },
        ];
        let dst = [
            Span {
                addr: GuestAddress(0x100),
                len: 700,
            },
            Span {
                addr: GuestAddress(0xfe00),
                len: 0x1000,
            },
        ];
        let copied = copy_between(&a, &src, 12, &b, &dst, 12, 3000).unwrap();
        assert_eq!(copied, 3000);
        let mut back = vec![0u8; 3000];
        read_stream(&b, &dst, 12, &mut back).unwrap();
        assert_eq!(back, data);
        // A destination too small takes what fits.
        let small = [Span {
            addr: GuestAddress(0x5000),
            len: 100,
        }];
        assert_eq!(
            copy_between(&a, &src, 12, &b, &small, 0, 3000).unwrap(),
            100
        );
    }

    #[test]
    fn header_writes_and_iovecs_follow_the_stream() {
        let mem = memory();
        let spans = [
            Span {
                addr: GuestAddress(0x100),
                len: 5,
            },
            Span {
                addr: GuestAddress(0xfffe),
                len: 100,
            },
        ];
        write_stream(&mem, &spans, 3, &[1, 2, 3, 4, 5, 6]).unwrap();
        let mut back = [0u8; 6];
        read_stream(&mem, &spans, 3, &mut back).unwrap();
        assert_eq!(back, [1, 2, 3, 4, 5, 6]);
        assert!(
            write_stream(&mem, &spans, 100, &[0; 10]).is_err(),
            "past the end"
        );
        let mut iovecs = Vec::new();
        host_iovecs(&mem, &spans, 0, 105, &mut iovecs).unwrap();
        // 5 bytes, then 2 bytes up to the region end, then the rest in the next region.
        assert_eq!(
            iovecs.iter().map(|i| i.iov_len).collect::<Vec<_>>(),
            vec![5, 2, 98]
        );
        assert_eq!(copy_in(&mem, &spans, 0, &[9; 200]).unwrap(), 105);
    }
}
