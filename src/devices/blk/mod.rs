//! virtio-blk over vhost-user.
//!
//! - [`config`]: the `--blk` option list;
//! - [`spec`]: feature bits, config space, limits;
//! - [`request`]: descriptor chain → validated request (all guest input checks);
//! - [`worker`]: one per queue: parse, run on the engine, complete;
//! - [`backend`]: the thin vhost-user backend;
//! - [`device`]: socket, reconnects, shared state;
//! - [`stats`]: per-queue counters;
//! - [`throttle`]: requests waiting for QoS tokens.

pub mod backend;
pub mod config;
pub mod device;
pub mod request;
pub mod spec;
pub mod stats;
pub mod throttle;
pub mod worker;
