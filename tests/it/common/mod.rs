//! Shared test harness: run the real `novacrond` binary and drive it as a vhost-user
//! front-end would (memfd guest memory, split virtqueues, the `vhost` crate's `Frontend`).
#![allow(dead_code, clippy::panic)] // helpers for many test crates; they fail loudly by design

pub mod blk;
pub mod control;
pub mod daemon;
pub mod guest;
pub mod memory;
pub mod net;
pub mod netns;
pub mod virtq;
