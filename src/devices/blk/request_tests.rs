//! Unit tests of request validation, on chains built with `virtio_queue::mock`.

use super::*;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::Bytes;
use vm_memory::GuestMemoryMmap;

/// A chain walked by virtio-queue, as the parser takes it (the queue itself walks with
/// `ring::split`; `devices::desc::collect_buffers` is the shared reduction).
fn collect_buffers(
    chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
) -> Result<Buffers, Reason> {
    crate::devices::desc::collect_buffers(chain).map_err(|_| Reason::BrokenChain)
}

const LIMITS: Limits = Limits {
    capacity: 1 << 20,
    readonly: false,
};
const WRITE: u16 = 2; // VRING_DESC_F_WRITE

fn memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

fn header(mem: &GuestMemoryMmap<()>, at: u64, request_type: u32, sector: u64) {
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&request_type.to_le_bytes());
    raw[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(at)).unwrap();
}

/// Builds a chain from `(addr, len, writable)` and parses it.
fn parse_chain(
    mem: &GuestMemoryMmap<()>,
    descs: &[(u64, u32, bool)],
    limits: Limits,
) -> Result<Request, Rejection> {
    let queue = MockSplitQueue::new(mem, 16);
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, writable))| {
            let mut flags = if writable { WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= 1; // VRING_DESC_F_NEXT
            }
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, (i + 1) as u16))
        })
        .collect();
    queue.build_desc_chain(&raw).unwrap();
    let mut q: virtio_queue::Queue = queue.create_queue().unwrap();
    let chain = q.pop_descriptor_chain(mem).unwrap();
    let buffers = collect_buffers(chain).map_err(|reason| Rejection {
        status: None,
        code: VIRTIO_BLK_S_IOERR as u8,
        reason,
    })?;
    parse(mem, &buffers, limits)
}

#[test]
fn read_request_maps_data_and_status() {
    let mem = memory();
    header(&mem, 0x8000, VIRTIO_BLK_T_IN, 8);
    let req = parse_chain(
        &mem,
        &[(0x8000, 16, false), (0x9000, 4096, true), (0xa000, 1, true)],
        LIMITS,
    )
    .unwrap();
    assert_eq!(req.kind, RequestKind::Read { offset: 4096 });
    assert_eq!(req.data_len, 4096);
    assert_eq!(req.status, GuestAddress(0xa000));
    assert_eq!(req.used_len, 4097);
    assert_eq!(req.iovecs.len(), 1);
}

#[test]
fn any_layout_header_data_and_status_in_one_buffer_each_direction() {
    let mem = memory();
    // Header and data in one readable buffer; status in its own writable byte.
    header(&mem, 0x8000, VIRTIO_BLK_T_OUT, 0);
    let req = parse_chain(
        &mem,
        &[(0x8000, 16 + 512, false), (0xa000, 1, true)],
        LIMITS,
    )
    .unwrap();
    assert_eq!(req.kind, RequestKind::Write { offset: 0 });
    assert_eq!(req.data_len, 512);
    // Data and status in one writable buffer.
    header(&mem, 0x8000, VIRTIO_BLK_T_IN, 0);
    let req = parse_chain(&mem, &[(0x8000, 16, false), (0x9000, 513, true)], LIMITS).unwrap();
    assert_eq!(req.data_len, 512);
    assert_eq!(req.status, GuestAddress(0x9000 + 512));
}

#[test]
fn malformed_requests_are_refused_with_the_right_reason() {
    let mem = memory();
    let reason = |descs: &[(u64, u32, bool)], limits| parse_chain(&mem, descs, limits).unwrap_err();

    header(&mem, 0x8000, VIRTIO_BLK_T_IN, 0);
    // No writable byte at all: no status, head returned with length 0.
    let r = reason(&[(0x8000, 16, false), (0x9000, 512, false)], LIMITS);
    assert_eq!((r.status, r.reason), (None, Reason::NoStatus));
    // Short header.
    let r = reason(&[(0x8000, 8, false), (0xa000, 1, true)], LIMITS);
    assert_eq!(r.reason, Reason::ShortHeader);
    assert_eq!(r.status, Some(GuestAddress(0xa000)));
    // Readable after writable.
    let r = reason(
        &[
            (0x8000, 16, false),
            (0x9000, 512, true),
            (0x9800, 16, false),
            (0xa000, 1, true),
        ],
        LIMITS,
    );
    assert_eq!(r.reason, Reason::BadLayout);
    // Data not a multiple of 512.
    let r = reason(
        &[(0x8000, 16, false), (0x9000, 100, true), (0xa000, 1, true)],
        LIMITS,
    );
    assert_eq!(r.reason, Reason::BadLength);
    // Buffer outside guest memory.
    let r = reason(
        &[
            (0x8000, 16, false),
            (0xff_0000, 0x2_0000, true),
            (0xa000, 1, true),
        ],
        LIMITS,
    );
    assert_eq!(r.reason, Reason::BadAddress);
    // Beyond capacity and overflowing sectors.
    header(&mem, 0x8000, VIRTIO_BLK_T_IN, (1 << 20) / 512);
    let r = reason(
        &[(0x8000, 16, false), (0x9000, 512, true), (0xa000, 1, true)],
        LIMITS,
    );
    assert_eq!(r.reason, Reason::OutOfRange);
    header(&mem, 0x8000, VIRTIO_BLK_T_IN, u64::MAX);
    let r = reason(
        &[(0x8000, 16, false), (0x9000, 512, true), (0xa000, 1, true)],
        LIMITS,
    );
    assert_eq!(r.reason, Reason::OutOfRange);
    // Write on a read-only device.
    header(&mem, 0x8000, VIRTIO_BLK_T_OUT, 0);
    let ro = Limits {
        readonly: true,
        ..LIMITS
    };
    let r = reason(
        &[(0x8000, 16, false), (0x9000, 512, false), (0xa000, 1, true)],
        ro,
    );
    assert_eq!(r.reason, Reason::ReadOnly);
    // GET_ID with a small buffer.
    header(&mem, 0x8000, VIRTIO_BLK_T_GET_ID, 0);
    let r = reason(
        &[(0x8000, 16, false), (0x9000, 10, true), (0xa000, 1, true)],
        LIMITS,
    );
    assert_eq!(r.reason, Reason::IdBufferTooSmall);
    // Unknown type: UNSUPP.
    header(&mem, 0x8000, 0x1234, 0);
    let r = reason(&[(0x8000, 16, false), (0xa000, 1, true)], LIMITS);
    assert_eq!(
        (r.code, r.reason),
        (VIRTIO_BLK_S_UNSUPP as u8, Reason::Unsupported)
    );
}

fn segment(mem: &GuestMemoryMmap<()>, at: u64, sector: u64, sectors: u32, flags: u32) {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&sector.to_le_bytes());
    raw[8..12].copy_from_slice(&sectors.to_le_bytes());
    raw[12..].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(at)).unwrap();
}

#[test]
fn discard_and_write_zeroes_segments() {
    let mem = memory();
    header(&mem, 0x8000, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    segment(&mem, 0x9000, 8, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    segment(&mem, 0x9010, 100, 1, 0);
    let req = parse_chain(
        &mem,
        &[(0x8000, 16, false), (0x9000, 32, false), (0xa000, 1, true)],
        LIMITS,
    )
    .unwrap();
    assert_eq!(
        req.kind,
        RequestKind::WriteZeroes(vec![
            ByteRange {
                offset: 4096,
                len: 4096,
                unmap: true
            },
            ByteRange {
                offset: 51200,
                len: 512,
                unmap: false
            },
        ])
    );
    // QoS charges the ranges' bytes, up to a cap (free zeroing would be a way around a byte
    // limit; a whole-disk discard must not cost minutes).
    assert_eq!(
        req.cost(),
        Some(Cost {
            kind: CostKind::Write,
            bytes: 4096 + 512
        })
    );
    header(&mem, 0x8000, VIRTIO_BLK_T_FLUSH, 0);
    let flush = parse_chain(&mem, &[(0x8000, 16, false), (0xa000, 1, true)], LIMITS).unwrap();
    assert_eq!(
        flush.cost(),
        Some(Cost {
            kind: CostKind::Write,
            bytes: 0
        }),
        "a flush is an operation against IOPS limits"
    );
    // Unmap flag on a discard is UNSUPP.
    header(&mem, 0x8000, VIRTIO_BLK_T_DISCARD, 0);
    let r = parse_chain(
        &mem,
        &[(0x8000, 16, false), (0x9000, 16, false), (0xa000, 1, true)],
        LIMITS,
    )
    .unwrap_err();
    assert_eq!(r.code, VIRTIO_BLK_S_UNSUPP as u8);
    // Ragged segment list, too many segments, range past the end.
    segment(&mem, 0x9000, 0, 1, 0);
    let r = parse_chain(
        &mem,
        &[(0x8000, 16, false), (0x9000, 20, false), (0xa000, 1, true)],
        LIMITS,
    )
    .unwrap_err();
    assert_eq!(r.reason, Reason::BadSegments);
    let r = parse_chain(
        &mem,
        &[
            (0x8000, 16, false),
            (0x9000, 16 * 33, false),
            (0xa000, 1, true),
        ],
        LIMITS,
    )
    .unwrap_err();
    assert_eq!(r.reason, Reason::BadSegments);
    segment(&mem, 0x9000, (1 << 20) / 512, 1, 0);
    let r = parse_chain(
        &mem,
        &[(0x8000, 16, false), (0x9000, 16, false), (0xa000, 1, true)],
        LIMITS,
    )
    .unwrap_err();
    assert_eq!(r.reason, Reason::OutOfRange);
}

#[test]
fn looping_chain_is_broken() {
    let mem = memory();
    let queue = MockSplitQueue::new(&mem, 4);
    // Two descriptors pointing at each other forever.
    let raw = [
        RawDescriptor::from(SplitDescriptor::new(0x8000, 16, 1, 1)),
        RawDescriptor::from(SplitDescriptor::new(0x9000, 16, 1, 0)),
    ];
    queue.build_desc_chain(&raw).unwrap();
    // build_desc_chain rewrites `next`; force the loop back.
    queue
        .desc_table()
        .store(
            1,
            RawDescriptor::from(SplitDescriptor::new(0x9000, 16, 1, 0)),
        )
        .unwrap();
    let mut q: virtio_queue::Queue = queue.create_queue().unwrap();
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    assert_eq!(collect_buffers(chain), Err(Reason::BrokenChain));
}
