//! Quality of service: token buckets ([`bucket`]) and limiters built from them ([`limiter`]).
//! Plain library code with an injectable clock, independent of vhost-user; the device
//! workers consult a limiter before starting a request and arm a timer for the returned wait.

pub mod bucket;
pub mod config;
pub mod credit;
pub mod device;
pub mod gate;
pub mod group;
pub mod handle;
pub mod info;
pub mod limiter;
pub mod metrics;
pub mod timer;
