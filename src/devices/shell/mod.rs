//! The vhost-user shell every device kind plugs into, written once.
//!
//! ```text
//!  socket ─▶ runner (listen, accept, one connection at a time)
//!              └─▶ relay (fixes what vhost-user-backend gets wrong) ─▶ vhost-user-backend
//!                    └─▶ DeviceBackend<D> (the one VhostUserBackend impl)
//!                          ├─▶ D: Device (features, config space, connect/disconnect)
//!                          └─▶ D::Worker per thread (typed events: queue kicks, WorkerFd)
//! ```
//!
//! - [`device`]: the [`device::Device`] and [`device::Worker`] traits a device implements;
//! - [`backend`]: [`backend::DeviceBackend`], the `VhostUserBackend` over them;
//! - [`runner`]: the socket's life (listen, accept, reconnect, stop);
//! - [`relay`]: the vhost-user message relay in front of the crate's handler;
//! - [`channel`]: the backend-request channel a device sends its own messages on;
//! - [`group`]: the busy-poll thread that polls every `poll=busy` queue in turn;
//! - [`checks`]: what the relay checks in a front-end's messages (memory files, eventfds).

pub mod backend;
pub mod channel;
pub mod checks;
pub mod device;
pub mod group;
pub mod inflight;
pub mod memory_cap;
pub mod relay;
pub mod runner;

pub use backend::read_config_window;
pub use device::{Device, Event, SetupError, Worker, WorkerFd};
pub use group::Pass;
