//! The integration tests, as one binary: the real `novacrond` driven through the vhost-user
//! protocol (our harness in [`common`], third-party front-ends), the control socket, real
//! QEMU guests and the C client. One binary means the harness is compiled once and the
//! guest image is built once per run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly by design

mod common;

mod blk_durability;
mod blk_hostile;
mod blk_io;
mod blkio_frontend;
mod control;
mod dpdk_frontend;
mod ffi_c;
mod fuzz_replay;
pub(crate) mod guest_blk;
mod guest_migrate;
mod guest_net;
mod guest_restart;
mod guest_tier;
mod isolation;
mod libvirt;
mod net_control;
mod net_hostile;
mod net_qos;
mod net_switch;
mod net_tap;
mod packaging;
mod polling;
mod prometheus;
mod qos;
mod rbd;
mod resources;
mod restart;
mod sandbox;
mod systemd;
mod tap;
pub(crate) mod tier;
mod tier_full;
