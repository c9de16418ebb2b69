//! Tiered disks in the registry: finding a disk's store, the policy change (validated with
//! the device's options and recorded), and which extents a move names. The moves themselves
//! belong to the store's mover (`storage::tier::mover`: one background batch per disk at a
//! time, progress in `tier.status`).

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::Arc;
use std::time::Duration;

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
    /// Changes a tiered disk's automatic policy (`hot-budget`, `idle-for`, `promote-after`;
    /// `None` removes one): validated with the device's other options, recorded, then applied.
    pub fn set_tier_policy(
        &mut self,
        id: &str,
        changes: std::collections::BTreeMap<String, Option<String>>,
    ) -> Result<crate::storage::tier::policy::TierPolicy, RegistryError> {
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
        Ok(policy)
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
