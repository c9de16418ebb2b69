//! virtio-blk wire facts: the features we offer, the config space layout and limits.
//!
//! The config space follows `struct virtio_blk_config` (virtio 1.2 §5.2.4), little-endian, up to
//! and including `write_zeroes_may_unmap` (60 bytes). Limits the guest driver obeys (`seg_max`,
//! `max_discard_seg`, ...) are the ones the request parser enforces.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use crate::devices::VHOST_USER_F_PROTOCOL_FEATURES;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// virtio-blk sectors are always 512 bytes, whatever the logical block size.
pub const SECTOR_SHIFT: u32 = 9;
/// Bytes per virtio-blk sector.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// The request header: type (le32), ioprio (le32), sector (le64).
pub const HEADER_LEN: usize = 16;
/// One discard / write-zeroes segment: sector (le64), num_sectors (le32), flags (le32).
pub const SEGMENT_LEN: usize = 16;
/// Largest single data segment the guest may send (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest discard / write-zeroes range in sectors: 1 GiB.
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) >> SECTOR_SHIFT;
/// Most segments in one discard / write-zeroes request.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
pub use crate::devices::sg::MAX_IOVECS;

/// Length of the config space we expose.
pub const CONFIG_LEN: usize = 60;

/// The virtio feature bits offered for a device. MQ is always offered (with `num_queues` in
/// the config space, possibly 1) because QEMU sizes its queues from it.
pub fn device_features(readonly: bool) -> u64 {
    let mut bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_MQ,
        VHOST_USER_F_PROTOCOL_FEATURES,
    ]
    .iter()
    .fold(0u64, |acc, bit| acc | 1 << bit);
    if readonly {
        bits |= 1 << VIRTIO_BLK_F_RO;
    }
    bits
}

/// What the config space describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigSpace {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Largest data segment.
    pub seg_max: u32,
    /// Logical block size (512 or 4096).
    pub logical_block_size: u32,
    /// Number of queues.
    pub num_queues: u16,
}

impl ConfigSpace {
    /// Serializes the config space, little-endian, `CONFIG_LEN` bytes.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut out = [0u8; CONFIG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            // Offsets are the constants below, all inside the 60 bytes.
            if let Some(dst) = out.get_mut(offset..offset.saturating_add(bytes.len())) {
                dst.copy_from_slice(bytes);
            }
        };
        put(0, &self.capacity_sectors.to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        // geometry (16..20) stays zero: no CHS emulation.
        put(20, &self.logical_block_size.to_le_bytes());
        // topology: physical_block_exp, alignment_offset, min_io_size (blocks), opt_io_size.
        put(24, &[0, 0]);
        put(26, &1u16.to_le_bytes());
        put(28, &0u32.to_le_bytes());
        // writeback (32) and unused0 (33) stay zero: no CONFIG_WCE.
        put(34, &self.num_queues.to_le_bytes());
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        let alignment = self.logical_block_size >> SECTOR_SHIFT;
        put(44, &alignment.to_le_bytes());
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(56, &[1]);
        out
    }

    /// The bytes a GET_CONFIG for `offset..offset+size` returns; out-of-range bytes read as 0.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        crate::devices::shell::read_config_window(&self.to_bytes(), offset, size)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn config_layout_matches_virtio_blk_config() {
        let space = ConfigSpace {
            capacity_sectors: 0x0102_0304_0506_0708,
            seg_max: 254,
            logical_block_size: 4096,
            num_queues: 3,
        };
        let bytes = space.to_bytes();
        assert_eq!(&bytes[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&bytes[12..16], &254u32.to_le_bytes());
        assert_eq!(&bytes[20..24], &4096u32.to_le_bytes());
        assert_eq!(&bytes[34..36], &3u16.to_le_bytes());
        assert_eq!(&bytes[44..48], &8u32.to_le_bytes());
        assert_eq!(space.read(34, 2), vec![3, 0]);
        assert_eq!(space.read(58, 4), vec![0, 0, 0, 0]);
        assert_eq!(space.read(u32::MAX, 2), vec![0, 0]);
    }

    #[test]
    fn features_follow_options() {
        let rw = device_features(false);
        assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
        let ro = device_features(true);
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(ro & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_ne!(ro & (1 << VIRTIO_F_VERSION_1), 0);
    }
}
