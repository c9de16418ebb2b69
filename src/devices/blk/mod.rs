//! virtio-blk over vhost-user.
//!
//! - [`config`]: the `--blk` option list;
//! - [`spec`]: feature bits, config space, limits;
//! - [`request`]: descriptor chain → validated request (all guest input checks);
//! - [`worker`]: one per queue: parse, run on the engine, complete;
//! - [`backend`]: the device and worker as the vhost-user shell sees them;
//! - [`shared`]: state shared by connections and workers (imports nothing of the device);
//! - [`device`]: socket, reconnects, shared state;
//! - [`stats`]: per-queue counters;
//! - [`info`]: typed description and counters (control plane and metrics);

pub mod backend;
pub mod bounce;
pub mod config;
pub mod device;
pub mod in_flight;
pub mod info;
pub mod metrics;
pub mod request;
pub mod shared;
pub mod spec;
pub mod stats;
pub mod worker;
