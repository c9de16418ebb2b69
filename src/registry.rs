//! The set of running devices, shared by the command line, the state file and the control
//! socket.
//!
//! Changes are all-or-nothing: `add` starts the device and only then records it in the state
//! directory (stopping it again if the record cannot be written); `remove` records the
//! removal first and only then stops the device. So the state file never lists a device that
//! is not running, and a failed change leaves both as they were. Devices given on the command
//! line are not written to the state file (the command line recreates them).

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::config::options::OptionList;
use crate::devices::blk::config::{BackingSpec, BlkConfig, BlkConfigError};
use crate::devices::blk::device::{BlkDevice, DeviceError};
use crate::devices::blk::stats::{OpClass, QueueSnapshot};
use crate::devices::blk::throttle::now_ns;
use crate::qos::config::{QosConfig, GROUP_KEY};
use crate::qos::group::SharedLimiter;
use crate::state::{DeviceRecord, GroupRecord, Saved, StateError, StateStore};

/// Errors from registry changes; each maps to a stable control-plane error kind.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The device type is not one this daemon serves.
    #[error("unknown device type `{0}` (known: blk)")]
    UnknownType(String),
    /// The options were invalid.
    #[error(transparent)]
    Config(#[from] BlkConfigError),
    /// An id or socket is already in use.
    #[error("{0}")]
    Exists(String),
    /// No device with that id.
    #[error("no device `{0}`")]
    NotFound(String),
    /// A front-end is connected and `force` was not given.
    #[error("device `{0}` has a connected front-end; use force to disconnect it")]
    Busy(String),
    /// The device could not start.
    #[error("cannot start device `{id}`")]
    Start {
        /// The id.
        id: String,
        /// The cause.
        #[source]
        source: DeviceError,
    },
    /// A QoS setting that is not valid (unknown key, bad value, bad group name).
    #[error("invalid QoS setting: {0}")]
    NotQos(String),
    /// The state directory could not be updated; nothing changed.
    #[error("cannot record the change")]
    State(#[from] StateError),
}

impl RegistryError {
    /// The stable error kind for the control plane.
    pub fn kind(&self) -> &'static str {
        match self {
            RegistryError::UnknownType(_) | RegistryError::Config(_) | RegistryError::NotQos(_) => {
                "invalid-params"
            }
            RegistryError::Exists(_) => "exists",
            RegistryError::NotFound(_) => "not-found",
            RegistryError::Busy(_) => "busy",
            RegistryError::Start { .. } | RegistryError::State(_) => "io",
        }
    }
}

struct Entry {
    device: BlkDevice,
    record: DeviceRecord,
    persistent: bool,
}

struct Group {
    limiter: Arc<SharedLimiter>,
    options: BTreeMap<String, String>,
}

/// All running devices and QoS groups.
pub struct Registry {
    devices: BTreeMap<String, Entry>,
    groups: BTreeMap<String, Group>,
    state: Option<StateStore>,
}

impl Registry {
    /// An empty registry persisting to `state` (if any).
    pub fn new(state: Option<StateStore>) -> Self {
        Self {
            devices: BTreeMap::new(),
            groups: BTreeMap::new(),
            state,
        }
    }

    /// Starts a device of `kind` with `options`; `persistent` devices are recorded in the
    /// state directory.
    pub fn add(
        &mut self,
        kind: &str,
        options: BTreeMap<String, String>,
        persistent: bool,
    ) -> Result<String, RegistryError> {
        if kind != "blk" {
            return Err(RegistryError::UnknownType(kind.to_string()));
        }
        let config = BlkConfig::from_options(OptionList::from_pairs(options.clone()))?;
        if self.devices.contains_key(&config.id) {
            return Err(RegistryError::Exists(format!(
                "device `{}` exists",
                config.id
            )));
        }
        if let Some(other) = self
            .devices
            .values()
            .find(|e| e.device.config().socket == config.socket)
        {
            return Err(RegistryError::Exists(format!(
                "socket {} is used by device `{}`",
                config.socket.display(),
                other.device.config().id
            )));
        }
        let group = self.resolve_group(config.qos_group.as_deref())?;
        let id = config.id.clone();
        let device = BlkDevice::start(config).map_err(|source| RegistryError::Start {
            id: id.clone(),
            source,
        })?;
        device.shared().set_group(group);
        let record = DeviceRecord {
            kind: kind.to_string(),
            options,
        };
        self.devices.insert(
            id.clone(),
            Entry {
                device,
                record,
                persistent,
            },
        );
        if persistent {
            if let Err(e) = self.save() {
                if let Some(entry) = self.devices.remove(&id) {
                    entry.device.stop();
                }
                return Err(e);
            }
        }
        Ok(id)
    }

    /// Stops and forgets device `id`. With a connected front-end only when `force`.
    pub fn remove(&mut self, id: &str, force: bool) -> Result<(), RegistryError> {
        let entry = self.entry(id)?;
        if entry.device.is_connected() && !force {
            return Err(RegistryError::Busy(id.to_string()));
        }
        let persistent = entry.persistent;
        let Some(entry) = self.devices.remove(id) else {
            return Err(RegistryError::NotFound(id.to_string()));
        };
        if persistent {
            if let Err(e) = self.save() {
                self.devices.insert(id.to_string(), entry);
                return Err(e);
            }
        }
        entry.device.shared().set_group(None);
        entry.device.stop();
        Ok(())
    }

    fn resolve_group(
        &self,
        name: Option<&str>,
    ) -> Result<Option<Arc<SharedLimiter>>, RegistryError> {
        match name {
            None => Ok(None),
            Some(name) => self
                .groups
                .get(name)
                .map(|g| Some(Arc::clone(&g.limiter)))
                .ok_or_else(|| RegistryError::NotFound(format!("QoS group {name}"))),
        }
    }

    /// Creates a QoS group with the given limit options.
    pub fn add_group(
        &mut self,
        name: &str,
        options: BTreeMap<String, String>,
    ) -> Result<Value, RegistryError> {
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
    ) -> Result<Value, RegistryError> {
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

    /// Every group with its limits and members.
    pub fn list_groups(&self) -> Result<Value, RegistryError> {
        let groups: Result<Vec<Value>, _> =
            self.groups.keys().map(|n| self.describe_group(n)).collect();
        Ok(Value::Array(groups?))
    }

    fn group_members(&self, name: &str) -> Vec<String> {
        self.devices
            .iter()
            .filter(|(_, e)| e.record.options.get(GROUP_KEY).map(String::as_str) == Some(name))
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn describe_group(&self, name: &str) -> Result<Value, RegistryError> {
        let group = self
            .groups
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(format!("QoS group {name}")))?;
        let limits: serde_json::Map<String, Value> = group
            .limiter
            .config()
            .limits
            .iter()
            .map(|(key, rate)| (key.to_string(), json!(rate)))
            .collect();
        Ok(json!({
            "name": name,
            "limits": limits,
            "members": self.group_members(name),
            "tokens": group.limiter.tokens(now_ns()).into_iter().collect::<BTreeMap<_, _>>(),
            "waits": group.limiter.refusals(),
        }))
    }

    /// Changes a device's rate limits live: `Some(value)` sets a key, `None` removes it. The
    /// merged options are validated as a whole and recorded before the new limits apply.
    pub fn set_qos(
        &mut self,
        id: &str,
        changes: BTreeMap<String, Option<String>>,
    ) -> Result<Value, RegistryError> {
        if let Some(key) = changes.keys().find(|k| !QosConfig::is_qos_key(k)) {
            return Err(RegistryError::NotQos(key.clone()));
        }
        let options = with_changes(&self.entry(id)?.record.options, changes);
        let config = BlkConfig::from_options(OptionList::from_pairs(options.clone()))?;
        let group = self.resolve_group(config.qos_group.as_deref())?;
        let Some(entry) = self.devices.get_mut(id) else {
            return Err(RegistryError::NotFound(id.to_string()));
        };
        let previous = std::mem::replace(&mut entry.record.options, options);
        let persistent = entry.persistent;
        if persistent {
            if let Err(e) = self.save() {
                if let Some(entry) = self.devices.get_mut(id) {
                    entry.record.options = previous;
                }
                return Err(e);
            }
        }
        if let Some(entry) = self.devices.get(id) {
            // Validated above by from_options, which builds the same limiter.
            if let Err(e) = entry.device.shared().set_qos(&config.qos) {
                log::error!("{id}: cannot apply validated limits: {e}");
            }
            entry.device.shared().set_group(group);
        }
        self.qos(id)
    }

    /// A device's rate limits and how much they held it back.
    pub fn qos(&self, id: &str) -> Result<Value, RegistryError> {
        let entry = self.entry(id)?;
        let shared = entry.device.shared();
        let limits: serde_json::Map<String, Value> = shared
            .qos_config()
            .limits
            .iter()
            .map(|(key, rate)| (key.to_string(), json!(rate)))
            .collect();
        let queues = shared.stats();
        Ok(json!({
            "id": id,
            "group": entry.record.options.get(GROUP_KEY),
            "limits": limits,
            "tokens": shared.qos_tokens().into_iter().collect::<BTreeMap<_, _>>(),
            "throttled": queues.iter().map(|q| q.throttled).sum::<u64>(),
            "throttle-wait-ns": queues.iter().map(|q| q.throttle_wait_ns).sum::<u64>(),
        }))
    }

    /// Recreates the devices recorded in the state directory.
    pub fn restore(&mut self) -> Result<usize, RegistryError> {
        let Some(state) = &self.state else {
            return Ok(0);
        };
        let saved = state.load()?;
        for group in saved.groups {
            self.add_group(&group.name, group.options)?;
        }
        let count = saved.devices.len();
        for record in saved.devices {
            self.add(&record.kind, record.options, true)?;
        }
        Ok(count)
    }

    fn save(&self) -> Result<(), RegistryError> {
        if let Some(state) = &self.state {
            let saved = Saved {
                devices: self
                    .devices
                    .values()
                    .filter(|e| e.persistent)
                    .map(|e| e.record.clone())
                    .collect(),
                groups: self
                    .groups
                    .iter()
                    .map(|(name, g)| GroupRecord {
                        name: name.clone(),
                        options: g.options.clone(),
                    })
                    .collect(),
            };
            state.save(&saved)?;
        }
        Ok(())
    }

    fn entry(&self, id: &str) -> Result<&Entry, RegistryError> {
        self.devices
            .get(id)
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))
    }

    /// Ids of all devices.
    pub fn ids(&self) -> Vec<String> {
        self.devices.keys().cloned().collect()
    }

    /// A device's description.
    pub fn describe(&self, id: &str) -> Result<Value, RegistryError> {
        let entry = self.entry(id)?;
        let config = entry.device.config();
        let shared = entry.device.shared();
        Ok(json!({
            "id": config.id,
            "type": "blk",
            "socket": config.socket,
            "path": match &config.backing {
                BackingSpec::Null => "null".to_string(),
                BackingSpec::File(p) => p.display().to_string(),
            },
            "size": shared.limits.capacity,
            "readonly": config.readonly,
            "direct": config.direct,
            "queues": config.queues,
            "queue-size": config.queue_size,
            "serial": config.serial,
            "engine": shared.engine_name(),
            "logical-block-size": config.logical_block_size,
            "poll-us": config.poll_us,
            "connected": entry.device.is_connected(),
            "persistent": entry.persistent,
            "flush-failed": shared.flush_failed.load(std::sync::atomic::Ordering::Acquire),
        }))
    }

    /// A device's counters: totals and per queue.
    pub fn stats(&self, id: &str) -> Result<Value, RegistryError> {
        let entry = self.entry(id)?;
        let queues = entry.device.shared().stats();
        Ok(json!({
            "id": id,
            "total": total(&queues),
            "queues": queues,
        }))
    }

    /// Every device's id, connection state and counters, for metrics.
    pub fn metrics_snapshot(&self) -> Vec<(String, bool, Vec<QueueSnapshot>)> {
        self.devices
            .iter()
            .map(|(id, e)| {
                (
                    id.clone(),
                    e.device.is_connected(),
                    e.device.shared().stats(),
                )
            })
            .collect()
    }

    /// Stops every device (daemon shutdown); the state file is left as it is.
    pub fn stop_all(&mut self) {
        for (_, entry) in std::mem::take(&mut self.devices) {
            entry.device.stop();
        }
    }
}

/// Sums per-queue snapshots.
fn total(queues: &[QueueSnapshot]) -> Value {
    let sum = |f: &dyn Fn(&QueueSnapshot) -> u64| queues.iter().map(f).sum::<u64>();
    let requests: BTreeMap<&str, u64> = OpClass::ALL
        .iter()
        .map(|c| (c.name(), sum(&|q| q.requests_of(*c))))
        .collect();
    let rejected: u64 = queues
        .iter()
        .flat_map(|q| q.rejected.iter().map(|(_, n)| *n))
        .sum();
    json!({
        "requests": requests,
        "bytes-read": sum(&|q| q.bytes_read),
        "bytes-written": sum(&|q| q.bytes_written),
        "io-errors": sum(&|q| q.io_errors),
        "rejected": rejected,
        "in-flight": sum(&|q| q.in_flight),
        "throttled": sum(&|q| q.throttled),
    })
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
    let config =
        QosConfig::from_options(&mut list).map_err(|e| RegistryError::NotQos(e.to_string()))?;
    if config.is_empty() {
        return Err(RegistryError::NotQos(
            "a group needs at least one limit".into(),
        ));
    }
    Ok(config)
}

fn validate_group_name(name: &str) -> Result<(), RegistryError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::NotQos(format!(
            "group name `{name}` must be 1..=64 of [A-Za-z0-9._-]"
        )))
    }
}

/// `options` with `changes` applied: `Some` sets a key, `None` removes it.
fn with_changes(
    options: &BTreeMap<String, String>,
    changes: BTreeMap<String, Option<String>>,
) -> BTreeMap<String, String> {
    let mut options = options.clone();
    for (key, value) in changes {
        match value {
            Some(value) => options.insert(key, value),
            None => options.remove(&key),
        };
    }
    options
}
