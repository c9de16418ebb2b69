//! The virtio devices the daemon serves.

pub mod blk;
pub mod net;
