//! virtio-net over vhost-user.
//!
//! - [`config`]: the `--net` option list;
//! - [`device`]: the device's lifetime: taps or switch port, socket;
//! - [`shared`]: state shared by connections and workers (imports nothing of the above);
//! - [`backend`]: the device and worker as the vhost-user shell sees them;
//! - [`worker`]: one per queue pair: tx to tap or switch, rx from the tap;
//! - [`spec`]: feature bits, config space;
//! - [`frame`]: tx chains → checked frames, rx chains → buffers, and the copies;
//! - [`rx`]: taking rx chains for a frame and returning them whole; a switch port's
//!   receive side;
//! - [`stats`]: counters and drop reasons;
//! - [`info`]: typed description and counters (control plane and metrics);
//! - [`tap_queue`]: one tap queue, readv/writev, loss and recovery;
//! - [`fabric`]: named switches, ports, guest-to-guest delivery, uplinks;
//! - [`uplink`]: a switch's tap uplink and its reader thread;
//! - [`header`]: the virtio-net header and its checks;
//! - [`switch`]: the L2 switch's forwarding decisions;
//! - [`announce`]: the RARP a migrated NIC announces its MAC with.

pub mod announce;
pub mod backend;
pub mod config;
pub mod device;
pub mod fabric;
pub mod frame;
pub mod header;
pub mod info;
pub mod metrics;
pub mod rx;
pub mod shared;
pub mod slots;
pub mod spec;
pub mod stats;
pub mod switch;
pub mod tap_queue;
pub mod uplink;
pub mod worker;
