//! virtio-net over vhost-user.
//!
//! - [`config`]: the `--net` option list;
//! - [`spec`]: feature bits, config space;
//! - [`header`]: the virtio-net header and its checks;
//! - [`switch`]: the L2 switch's forwarding decisions.

pub mod config;
pub mod header;
pub mod spec;
pub mod switch;
