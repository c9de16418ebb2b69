//! Storage tiering (issue 6), plain library code: the cold tier's record format ([`record`]).
//! The extent map, journal, heat policy and the tiered engine build on it.

pub mod engine;
pub mod journal;
pub mod policy;
pub mod record;
pub mod store;
