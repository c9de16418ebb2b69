//! Thin wrappers over the few raw syscalls the daemon needs. Unsafe code for them lives here.

pub mod clock;
pub mod inherited;
pub mod kick;
pub mod peer;
pub mod poll;
pub mod private_file;
pub mod random;
pub mod replace;
pub mod shared_map;
pub mod sigbus;
pub mod signals;
pub mod socket;
pub mod takeover;
pub mod tap;
