//! Command-line and control-plane configuration parsing shared by all devices.

pub mod id;
pub mod options;
