//! The virtio devices the daemon serves: one directory per kind ([`blk`], [`net`]) over the
//! shared vhost-user [`shell`], plus descriptor-chain collection ([`desc`]).

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

pub mod blk;
pub mod desc;
pub mod kind;
pub mod net;
pub mod options;
pub mod poll;
pub mod sg;
pub mod shell;
#[cfg(test)]
pub mod testing;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: offered by every device (vhost-user, not virtio).
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
