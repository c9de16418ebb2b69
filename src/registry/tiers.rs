//! Tiered disks in the registry: `tier.status`, `tier.demote`, `tier.promote`. Moves run on
//! the caller's thread when `wait` is set (the registry lock is not held while they run), or
//! on a background thread otherwise, with progress in `tier.status`.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::{Device, Registry, RegistryError};
use crate::storage::tier::store::TierStore;

/// Which extents a move request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every extent.
    All,
    /// These extents.
    Extents(Vec<u64>),
    /// Hot extents not accessed for this long (demotion).
    IdleFor(Duration),
}

impl Registry {
    /// The tier store of tiered disk `id`.
    pub fn tier_store(&self, id: &str) -> Result<Arc<TierStore>, RegistryError> {
        match &self.entry(id)?.device {
            Device::Blk(device) => device
                .shared()
                .tier()
                .cloned()
                .ok_or_else(|| RegistryError::NotTiered(id.to_string())),
            Device::Net(_) => Err(RegistryError::NotTiered(id.to_string())),
        }
    }
}

impl Registry {
    /// `tier.status` of every tiered disk, for `/metrics`.
    pub fn tier_metrics_snapshot(&self) -> Vec<(String, Value)> {
        self.devices
            .iter()
            .filter_map(|(id, entry)| match &entry.device {
                Device::Blk(device) => device.shared().tier().map(|t| (id.clone(), status(id, t))),
                Device::Net(_) => None,
            })
            .collect()
    }
}

impl Registry {
    /// Changes a tiered disk's automatic policy (`hot-budget`, `idle-for`, `promote-after`;
    /// `None` removes one): validated with the device's other options, recorded, then applied.
    pub fn set_tier_policy(
        &mut self,
        id: &str,
        changes: std::collections::BTreeMap<String, Option<String>>,
    ) -> Result<Value, RegistryError> {
        let store = self.tier_store(id)?;
        let mut renamed = std::collections::BTreeMap::new();
        for (key, value) in changes {
            if !matches!(key.as_str(), "hot-budget" | "idle-for" | "promote-after") {
                return Err(RegistryError::InvalidOption(format!(
                    "{id}: unknown policy key `{key}` (known: hot-budget, idle-for, promote-after)"
                )));
            }
            renamed.insert(format!("tier-{key}"), value);
        }
        let entry = self.entry(id)?;
        let options = super::with_changes(&entry.record.options, renamed);
        let config = crate::devices::blk::config::BlkConfig::from_options(
            crate::config::options::OptionList::from_pairs(options.clone()),
        )?;
        let policy = config.tier.map(|t| t.policy).unwrap_or_default();
        self.record_options(id, options)?;
        store.set_policy(policy);
        Ok(json!(policy))
    }
}

/// The extents `selection` names on `store`; refuses extents past the disk.
pub fn select(store: &TierStore, selection: &Selection, down: bool) -> Result<Vec<u64>, String> {
    Ok(match selection {
        Selection::All => {
            if down {
                (0..store.extents()).collect()
            } else {
                store.cold_extents()
            }
        }
        Selection::Extents(list) => {
            if let Some(bad) = list.iter().find(|&&e| e >= store.extents()) {
                return Err(format!(
                    "extent {bad} is past the disk ({} extents)",
                    store.extents()
                ));
            }
            list.clone()
        }
        Selection::IdleFor(idle) => {
            store.idle_extents(u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX))
        }
    })
}

/// `tier.status` of a store.
pub fn status(id: &str, store: &TierStore) -> Value {
    let (cold_extents, cold_bytes) = store.cold_usage();
    let stats = &store.stats;
    let raw = stats.raw_bytes.load(Ordering::Relaxed);
    let compressed = stats.compressed_bytes.load(Ordering::Relaxed);
    json!({
        "id": id,
        "extent-size": store.extent_size(),
        "extents": store.extents(),
        "cold-extents": cold_extents,
        "hot-extents": store.extents().saturating_sub(cold_extents),
        "hot-bytes-allocated": store.hot_allocated(),
        "cold-bytes": cold_bytes,
        "compression-ratio": if compressed > 0 { raw as f64 / compressed as f64 } else { 0.0 },
        "demoted": stats.demoted.load(Ordering::Relaxed),
        "promoted": stats.promoted.load(Ordering::Relaxed),
        "moves-failed": stats.failed.load(Ordering::Relaxed),
        "cold-reads": stats.cold_reads.load(Ordering::Relaxed),
        "corrupt-records": stats.corrupt.load(Ordering::Relaxed),
        "progress": store.progress(),
        "policy": store.policy(),
        "heat-histogram": store
            .heat_histogram()
            .into_iter()
            .map(|(band, hot, cold)| json!({"heat": band, "hot": hot, "cold": cold}))
            .collect::<Vec<_>>(),
    })
}
