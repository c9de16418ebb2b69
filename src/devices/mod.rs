//! The virtio devices the daemon serves, and the little they share.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

pub mod blk;
pub mod desc;
pub mod net;
pub mod relay;
pub mod runner;

/// The most config bytes vhost-user lets a front-end ask for.
const VHOST_USER_CONFIG_SIZE: u32 = 0x1000;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: offered by every device (vhost-user, not virtio).
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// The bytes a GET_CONFIG for `offset..offset+size` returns from a config space; bytes past
/// its end read as 0.
pub fn read_config_window(bytes: &[u8], offset: u32, size: u32) -> Vec<u8> {
    // vhost validates offset + size <= 4 KiB; cap here too so no front-end can make us
    // allocate more than that.
    let size = size.min(VHOST_USER_CONFIG_SIZE);
    (u64::from(offset)..u64::from(offset).saturating_add(u64::from(size)))
        .map(|i| {
            usize::try_from(i)
                .ok()
                .and_then(|i| bytes.get(i))
                .copied()
                .unwrap_or(0)
        })
        .collect()
}
