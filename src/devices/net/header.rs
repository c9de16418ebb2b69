//! The virtio-net header (`struct virtio_net_hdr_v1`, 12 bytes) that precedes every frame,
//! and the checks and fix-ups the data path applies to it (issue 4).
//!
//! Everything here is guest-controlled. [`NetHeader::check`] refuses GSO without a segment
//! size, unknown GSO types, checksum offsets outside the frame, and frames longer than the
//! MTU (without GSO) or 64 KiB (with GSO). [`complete_checksum`] fills in a partial checksum
//! (`VIRTIO_NET_HDR_F_NEEDS_CSUM`) in software, for a receiver that did not negotiate
//! checksum offload.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

/// Size of `virtio_net_hdr_v1` (with `num_buffers`), the header used with VERSION_1.
pub const HEADER_LEN: usize = 12;
/// The checksum starting at `csum_start` must be completed by the receiver.
pub const F_NEEDS_CSUM: u8 = 1;
/// No segmentation offload.
pub const GSO_NONE: u8 = 0;
/// TCP over IPv4 segmentation.
pub const GSO_TCPV4: u8 = 1;
/// UDP fragmentation offload (legacy UFO).
pub const GSO_UDP: u8 = 3;
/// TCP over IPv6 segmentation.
pub const GSO_TCPV6: u8 = 4;
/// ECN bit that may be or-ed into the GSO type.
pub const GSO_ECN: u8 = 0x80;
/// Largest frame accepted with segmentation offload.
pub const MAX_GSO_FRAME: usize = 65_535 + 14;

/// Why a header or frame is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer than 12 header bytes.
    #[error("short header")]
    Short,
    /// A GSO type we do not know.
    #[error("unknown GSO type {0:#x}")]
    UnknownGso(u8),
    /// GSO requested with a segment size of 0.
    #[error("GSO without a segment size")]
    ZeroGsoSize,
    /// `csum_start + csum_offset + 2` is past the end of the frame.
    #[error("checksum offsets outside the frame")]
    ChecksumOutside,
    /// The frame is larger than the MTU allows (or 64 KiB with GSO).
    #[error("frame of {0} bytes too large")]
    TooLarge(usize),
}

/// A parsed virtio-net header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetHeader {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`, possibly with the ECN bit.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Segment size for GSO.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where, from `csum_start`, the checksum goes.
    pub csum_offset: u16,
    /// Receive buffers merged for this frame (MRG_RXBUF).
    pub num_buffers: u16,
}

impl NetHeader {
    /// Parses the first 12 bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, HeaderError> {
        let b: [u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(HeaderError::Short)?;
        Ok(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16::from_le_bytes([b[2], b[3]]),
            gso_size: u16::from_le_bytes([b[4], b[5]]),
            csum_start: u16::from_le_bytes([b[6], b[7]]),
            csum_offset: u16::from_le_bytes([b[8], b[9]]),
            num_buffers: u16::from_le_bytes([b[10], b[11]]),
        })
    }

    /// The 12 header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Whether segmentation offload is requested.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }

    /// Checks the header against a frame of `frame_len` bytes (Ethernet header included,
    /// virtio-net header excluded) on a link with `mtu`.
    pub fn check(&self, frame_len: usize, mtu: u16) -> Result<(), HeaderError> {
        match self.gso_type & !GSO_ECN {
            GSO_NONE | GSO_TCPV4 | GSO_UDP | GSO_TCPV6 => {}
            other => return Err(HeaderError::UnknownGso(other)),
        }
        let limit = if self.is_gso() {
            if self.gso_size == 0 {
                return Err(HeaderError::ZeroGsoSize);
            }
            MAX_GSO_FRAME
        } else {
            // MTU counts the payload; allow the Ethernet header and one VLAN tag on top.
            usize::from(mtu).saturating_add(14 + 4)
        };
        if frame_len > limit {
            return Err(HeaderError::TooLarge(frame_len));
        }
        if self.flags & F_NEEDS_CSUM != 0 {
            let end = usize::from(self.csum_start)
                .saturating_add(usize::from(self.csum_offset))
                .saturating_add(2);
            if end > frame_len {
                return Err(HeaderError::ChecksumOutside);
            }
        }
        Ok(())
    }
}

/// Completes a partial checksum in software: the Internet checksum of `frame[csum_start..]`
/// (which already holds the pseudo-header sum at the checksum field, as Linux leaves it),
/// stored at `csum_start + csum_offset`.
pub fn complete_checksum(frame: &mut [u8], header: &NetHeader) -> Result<(), HeaderError> {
    let start = usize::from(header.csum_start);
    let at = start.saturating_add(usize::from(header.csum_offset));
    let covered = frame.get(start..).ok_or(HeaderError::ChecksumOutside)?;
    let end = at
        .checked_add(2)
        .filter(|&end| end <= frame.len())
        .ok_or(HeaderError::ChecksumOutside)?;
    // A u64 accumulator cannot overflow for any frame that fits in memory.
    let mut chunks = covered.chunks_exact(2);
    let mut sum: u64 = chunks
        .by_ref()
        .map(|pair| <[u8; 2]>::try_from(pair).map_or(0, |p| u64::from(u16::from_be_bytes(p))))
        .fold(0u64, u64::wrapping_add);
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u64::from(*last) << 8);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff).wrapping_add(sum >> 16);
    }
    let checksum = !(sum as u16);
    if let Some(field) = frame.get_mut(at..end) {
        field.copy_from_slice(&checksum.to_be_bytes());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_short_headers() {
        let h = NetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_ECN,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        assert_eq!(NetHeader::parse(&h.to_bytes()), Ok(h));
        assert_eq!(NetHeader::parse(&[0u8; 11]), Err(HeaderError::Short));
        assert!(h.is_gso());
    }

    #[test]
    fn hostile_headers_are_refused() {
        let plain = NetHeader::default();
        assert_eq!(plain.check(1514, 1500), Ok(()));
        assert_eq!(plain.check(1519, 1500), Err(HeaderError::TooLarge(1519)));
        let gso = NetHeader {
            gso_type: GSO_TCPV6,
            gso_size: 0,
            ..plain
        };
        assert_eq!(gso.check(9000, 1500), Err(HeaderError::ZeroGsoSize));
        let gso = NetHeader {
            gso_size: 1440,
            ..gso
        };
        assert_eq!(gso.check(65_000, 1500), Ok(()));
        assert_eq!(gso.check(70_000, 1500), Err(HeaderError::TooLarge(70_000)));
        let weird = NetHeader {
            gso_type: 0x42,
            ..plain
        };
        assert_eq!(weird.check(100, 1500), Err(HeaderError::UnknownGso(0x42)));
        let csum = NetHeader {
            flags: F_NEEDS_CSUM,
            csum_start: 90,
            csum_offset: 9,
            ..plain
        };
        assert_eq!(csum.check(100, 1500), Err(HeaderError::ChecksumOutside));
        assert_eq!(csum.check(101, 1500), Ok(()));
        let huge = NetHeader {
            flags: F_NEEDS_CSUM,
            csum_start: u16::MAX,
            csum_offset: u16::MAX,
            ..plain
        };
        assert_eq!(huge.check(1500, 1500), Err(HeaderError::ChecksumOutside));
    }

    #[test]
    fn software_checksum_matches_rfc1071() {
        // RFC 1071's example words 0001 f203 f4f5 f6f7: sum 0xddf2 (folded), checksum 0x220d.
        let mut frame = vec![0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7, 0x00, 0x00];
        let h = NetHeader {
            flags: F_NEEDS_CSUM,
            csum_start: 0,
            csum_offset: 8,
            ..Default::default()
        };
        complete_checksum(&mut frame, &h).unwrap();
        assert_eq!(&frame[8..10], &[0x22, 0x0d]);
        // Verifying: the sum over the data including the checksum folds to 0xffff.
        let mut sum: u32 = frame
            .chunks(2)
            .map(|p| u32::from(u16::from_be_bytes([p[0], p[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
        // Odd length and out-of-range offsets.
        let mut odd = vec![0x12, 0x34, 0x56, 0, 0];
        let h = NetHeader {
            flags: F_NEEDS_CSUM,
            csum_start: 0,
            csum_offset: 3,
            ..Default::default()
        };
        assert_eq!(complete_checksum(&mut odd, &h), Ok(()));
        let h = NetHeader {
            flags: F_NEEDS_CSUM,
            csum_start: 4,
            csum_offset: 0,
            ..Default::default()
        };
        assert_eq!(
            complete_checksum(&mut odd, &h),
            Err(HeaderError::ChecksumOutside)
        );
    }
}
