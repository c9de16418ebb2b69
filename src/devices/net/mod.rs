//! virtio-net over vhost-user.
//!
//! - [`config`]: the `--net` option list;
//! - [`spec`]: feature bits, config space;
//! - [`frame`]: tx chains → checked frames, rx chains → buffers, and the copies;
//! - [`stats`]: counters and drop reasons;
//! - [`header`]: the virtio-net header and its checks;
//! - [`switch`]: the L2 switch's forwarding decisions.

pub mod config;
pub mod frame;
pub mod header;
pub mod spec;
pub mod stats;
pub mod switch;
