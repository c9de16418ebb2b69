//! Tiering Prometheus families, encoded from [`TierStatus`] (the struct `tier.status`
//! returns): renaming a status field cannot silently zero a series, it fails to compile.

use std::fmt;

use prometheus_client::encoding::DescriptorEncoder;

use super::status::TierStatus;
use crate::metrics::family::{counter, gauge, Labels};

fn device(d: &TierStatus) -> Labels {
    vec![("device", d.id.clone())]
}

fn by(d: &TierStatus, key: &'static str, value: &str) -> Labels {
    vec![("device", d.id.clone()), (key, value.to_string())]
}

/// Writes the tiering families.
pub fn encode(disks: &[TierStatus], encoder: &mut DescriptorEncoder) -> fmt::Result {
    gauge(
        encoder,
        "novacron_tier_extents",
        "Extents by tier.",
        disks.iter().flat_map(|d| {
            [
                (by(d, "tier", "hot"), d.hot_extents),
                (by(d, "tier", "cold"), d.cold_extents),
            ]
        }),
    )?;
    gauge(
        encoder,
        "novacron_tier_bytes",
        "Bytes used on each tier (hot: allocated; cold: records).",
        disks.iter().flat_map(|d| {
            [
                (by(d, "tier", "hot"), d.hot_bytes_allocated),
                (by(d, "tier", "cold"), d.cold_bytes),
            ]
        }),
    )?;
    counter(
        encoder,
        "novacron_tier_moves",
        "Extent moves by outcome.",
        disks.iter().flat_map(|d| {
            [
                (by(d, "kind", "demoted"), d.demoted),
                (by(d, "kind", "promoted"), d.promoted),
                (by(d, "kind", "failed"), d.moves_failed),
            ]
        }),
    )?;
    counter(
        encoder,
        "novacron_tier_cold_reads",
        "Reads served from the cold tier.",
        disks.iter().map(|d| (device(d), d.cold_reads)),
    )?;
    counter(
        encoder,
        "novacron_tier_corrupt_records",
        "Cold records found corrupt (those reads failed).",
        disks.iter().map(|d| (device(d), d.corrupt_records)),
    )
}
