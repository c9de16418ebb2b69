//! NovaCron data plane: `novacrond`, a vhost-user backend daemon that serves virtio devices to
//! VMs from shared guest memory.
//!
//! Layout: [`devices`] (one directory per device type), [`storage`] (I/O engines and backing
//! files, unaware of vhost-user), [`vring`] (our extensions to `vhost-user-backend`'s rings),
//! [`daemon`] (process lifecycle), [`registry`] (running devices), [`state`] (persistence),
//! [`control`] (the JSON-RPC control socket), [`sys`] (the few raw syscalls). Storage
//! tiering (formats, moves, policies) is an engine wrapper in [`storage::tier`].

#[cfg(test)]
pub(crate) mod alloc_count;
pub mod config;
pub mod control;
pub mod daemon;
pub mod devices;
#[doc(hidden)]
pub mod fuzz_support;
pub mod lock;
pub mod log_limit;
pub mod metrics;
pub mod qos;
pub mod registry;
pub mod ring;
pub mod sandbox;
pub mod state;
pub mod storage;
pub mod sys;
pub mod vring;
