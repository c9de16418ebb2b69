//! QoS groups in the registry: shared limits that several devices draw from. Changes follow
//! the registry's rule: validated first, recorded in the state directory, then applied.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{with_changes, Group, Registry, RegistryError};
use crate::config::options::OptionList;
use crate::qos::config::{QosConfig, GROUP_KEY};
use crate::qos::group::SharedLimiter;
use crate::qos::info::GroupInfo;
use crate::sys::clock::now_ns;

impl Registry {
    /// Creates a QoS group with the given limit options.
    pub fn add_group(
        &mut self,
        name: &str,
        options: BTreeMap<String, String>,
    ) -> Result<GroupInfo, RegistryError> {
        validate_group_name(name)?;
        if self.groups.contains_key(name) {
            return Err(RegistryError::Exists(format!("QoS group `{name}` exists")));
        }
        let config = group_config(&options)?;
        let limiter = SharedLimiter::new(&config, now_ns())
            .map_err(|e| RegistryError::NotQos(e.to_string()))?;
        self.groups.insert(
            name.to_string(),
            Group {
                limiter: Arc::new(limiter),
                options,
            },
        );
        if let Err(e) = self.save() {
            self.groups.remove(name);
            return Err(e);
        }
        self.describe_group(name)
    }

    /// Changes a group's limits live (`None` removes a key).
    pub fn set_group(
        &mut self,
        name: &str,
        changes: BTreeMap<String, Option<String>>,
    ) -> Result<GroupInfo, RegistryError> {
        let group = self
            .groups
            .get_mut(name)
            .ok_or_else(|| RegistryError::NotFound(format!("QoS group {name}")))?;
        let options = with_changes(&group.options, changes);
        let config = group_config(&options)?;
        let previous = std::mem::replace(&mut group.options, options);
        if let Err(e) = self.save() {
            if let Some(group) = self.groups.get_mut(name) {
                group.options = previous;
            }
            return Err(e);
        }
        if let Some(group) = self.groups.get(name) {
            if let Err(e) = group.limiter.reconfigure(&config, now_ns()) {
                log::error!("QoS group {name}: cannot apply validated limits: {e}");
            }
        }
        self.describe_group(name)
    }

    /// Deletes a group that no device uses.
    pub fn remove_group(&mut self, name: &str) -> Result<(), RegistryError> {
        let members = self.group_members(name);
        if !self.groups.contains_key(name) {
            return Err(RegistryError::NotFound(format!("QoS group {name}")));
        }
        if !members.is_empty() {
            return Err(RegistryError::Busy(format!(
                "QoS group {name} (used by {})",
                members.join(", ")
            )));
        }
        let Some(group) = self.groups.remove(name) else {
            return Err(RegistryError::NotFound(format!("QoS group {name}")));
        };
        if let Err(e) = self.save() {
            self.groups.insert(name.to_string(), group);
            return Err(e);
        }
        Ok(())
    }

    /// Every group, in name order.
    pub fn list_groups(&self) -> Vec<GroupInfo> {
        self.groups
            .keys()
            .filter_map(|n| self.describe_group(n).ok())
            .collect()
    }

    fn group_members(&self, name: &str) -> Vec<String> {
        self.devices
            .iter()
            .filter(|(_, e)| e.record.options.get(GROUP_KEY).map(String::as_str) == Some(name))
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn describe_group(&self, name: &str) -> Result<GroupInfo, RegistryError> {
        let group = self
            .groups
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(format!("QoS group {name}")))?;
        Ok(GroupInfo {
            name: name.to_string(),
            limits: group.limiter.config().limits.into_iter().collect(),
            members: self.group_members(name),
            tokens: group.limiter.tokens(now_ns()).into_iter().collect(),
            waits: group.limiter.refusals(),
        })
    }
}

/// Group limits from options: only limit keys, and at least one.
fn group_config(options: &BTreeMap<String, String>) -> Result<QosConfig, RegistryError> {
    if let Some(key) = options
        .keys()
        .find(|k| !QosConfig::is_qos_key(k) || *k == GROUP_KEY)
    {
        return Err(RegistryError::NotQos(key.clone()));
    }
    let mut list = OptionList::from_pairs(options.clone());
    let config = QosConfig::from_options_for(&mut list, crate::qos::config::Family::Any)
        .map_err(|e| RegistryError::NotQos(e.to_string()))?;
    if config.is_empty() {
        return Err(RegistryError::NotQos(
            "a group needs at least one limit".into(),
        ));
    }
    Ok(config)
}

fn validate_group_name(name: &str) -> Result<(), RegistryError> {
    crate::config::id::validate(name)
        .map_err(|reason| RegistryError::NotQos(format!("group name: {reason}")))
}
