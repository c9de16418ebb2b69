//! Storage tiering (issue 6): a virtual disk whose extents live on a hot tier (the hot file,
//! uncompressed, at the extent's own offset, served zero-copy by the plain engines) or a cold
//! tier (zstd records appended to the cold file), moved live and crash-safe.
//!
//! - [`record`]: the cold record format (checksummed header + zstd frame, bounded decode);
//! - [`journal`]: the metadata journal (which extents are cold, where), replay, compaction;
//! - [`store`]: the extent map, moves with their crash ordering, the start-up check, the
//!   lock-free in-flight accounting the I/O path uses;
//! - [`engine`]: the I/O engine wrapping the hot file's engine;
//! - [`mover`]: move batches with progress, the policy's periodic check;
//! - [`policy`]: heat and the automatic policy (byte budget, idle time, repeated reads);
//! - [`status`]: the typed status `tier.status` and `/metrics` report;
//! - [`handover`]: handing the disk between the two sides of a live migration.
//!
//! The on-disk format and the durability rules are in the README ("Tiered disks").

pub mod cold;
pub mod engine;
pub mod handover;
pub mod journal;
pub mod metrics;
pub mod mover;
pub mod policy;
pub mod record;
pub mod status;
pub mod store;
