//! A tiered disk's status as one typed struct: what `tier.status` answers and what
//! `/metrics` encodes, from the same fields.

use std::sync::atomic::Ordering;

use serde::Serialize;

use super::policy::TierPolicy;
use super::store::{Progress, TierStore};

/// Extents in one heat band, per tier.
#[derive(Debug, Clone, Serialize)]
pub struct HeatBand {
    /// The band (`0`, `<1`, `<4`, `<16`, `<64`, `>=64` decayed accesses).
    pub heat: &'static str,
    /// Hot extents holding data in the band.
    pub hot: u64,
    /// Cold extents in the band.
    pub cold: u64,
}

/// A tiered disk's status.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TierStatus {
    /// Device id.
    pub id: String,
    /// Extent size in bytes.
    pub extent_size: u64,
    /// Extents in the disk.
    pub extents: u64,
    /// Extents on the cold tier.
    pub cold_extents: u64,
    /// Extents on the hot tier.
    pub hot_extents: u64,
    /// Bytes the hot file has allocated.
    pub hot_bytes_allocated: u64,
    /// Bytes of cold records.
    pub cold_bytes: u64,
    /// Raw bytes per compressed byte over every demotion (0 before the first).
    pub compression_ratio: f64,
    /// Extents demoted.
    pub demoted: u64,
    /// Extents promoted.
    pub promoted: u64,
    /// Moves that failed.
    pub moves_failed: u64,
    /// Reads served from the cold tier.
    pub cold_reads: u64,
    /// Corrupt cold records found.
    pub corrupt_records: u64,
    /// The latest batch.
    pub progress: Progress,
    /// The automatic policy.
    pub policy: TierPolicy,
    /// Extents by heat band.
    pub heat_histogram: Vec<HeatBand>,
}

impl TierStore {
    /// The store's status, reported as device `id`.
    pub fn status(&self, id: &str) -> TierStatus {
        let (cold_extents, cold_bytes) = self.cold_usage();
        let stats = &self.stats;
        let raw = stats.raw_bytes.load(Ordering::Relaxed);
        let compressed = stats.compressed_bytes.load(Ordering::Relaxed);
        TierStatus {
            id: id.to_string(),
            extent_size: self.extent_size(),
            extents: self.extents(),
            cold_extents,
            hot_extents: self.extents().saturating_sub(cold_extents),
            hot_bytes_allocated: self.hot_allocated(),
            cold_bytes,
            compression_ratio: if compressed > 0 {
                raw as f64 / compressed as f64
            } else {
                0.0
            },
            demoted: stats.demoted.load(Ordering::Relaxed),
            promoted: stats.promoted.load(Ordering::Relaxed),
            moves_failed: stats.failed.load(Ordering::Relaxed),
            cold_reads: stats.cold_reads.load(Ordering::Relaxed),
            corrupt_records: stats.corrupt.load(Ordering::Relaxed),
            progress: self.progress(),
            policy: self.policy(),
            heat_histogram: self
                .heat_histogram()
                .into_iter()
                .map(|(heat, hot, cold)| HeatBand { heat, hot, cold })
                .collect(),
        }
    }
}
