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
use crate::devices::blk::device::BlkDevice;
use crate::devices::blk::stats::{OpClass, QueueSnapshot};
use crate::devices::net::config::{NetConfig, NetConfigError};
use crate::devices::net::device::NetDevice;
use crate::devices::net::fabric::Fabric;
use crate::devices::net::stats::NetSnapshot;
use crate::qos::config::{QosConfig, GROUP_KEY};
use crate::qos::group::SharedLimiter;
use crate::qos::handle::QosHandle;
mod groups;
mod switches;
pub mod tiers;

use crate::state::{DeviceRecord, GroupRecord, Saved, StateError, StateStore, SwitchRecord};

/// Errors from registry changes; each maps to a stable control-plane error kind.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The device type is not one this daemon serves.
    #[error("unknown device type `{0}` (known: blk, net)")]
    UnknownType(String),
    /// The options were invalid.
    #[error(transparent)]
    Config(#[from] BlkConfigError),
    /// The net device options were invalid.
    #[error(transparent)]
    NetConfig(#[from] NetConfigError),
    /// An option that does not exist or does not fit.
    #[error("{0}")]
    InvalidOption(String),
    /// The device is not a tiered disk.
    #[error("device `{0}` is not a tiered disk")]
    NotTiered(String),
    /// A switch name or option that is not valid.
    #[error("{0}")]
    BadSwitch(String),
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
        source: Box<dyn std::error::Error + Send + Sync>,
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
            RegistryError::UnknownType(_)
            | RegistryError::Config(_)
            | RegistryError::NetConfig(_)
            | RegistryError::BadSwitch(_)
            | RegistryError::NotTiered(_)
            | RegistryError::InvalidOption(_)
            | RegistryError::NotQos(_) => "invalid-params",
            RegistryError::Exists(_) => "exists",
            RegistryError::NotFound(_) => "not-found",
            RegistryError::Busy(_) => "busy",
            RegistryError::Start { .. } | RegistryError::State(_) => "io",
        }
    }
}

/// A running device of either kind.
pub(super) enum Device {
    Blk(Box<BlkDevice>),
    Net(NetDevice),
}

impl Device {
    fn socket(&self) -> &std::path::Path {
        match self {
            Device::Blk(d) => &d.config().socket,
            Device::Net(d) => &d.config().socket,
        }
    }

    fn is_connected(&self) -> bool {
        match self {
            Device::Blk(d) => d.is_connected(),
            Device::Net(d) => d.is_connected(),
        }
    }

    fn stop(self) {
        self.qos().set_group(None);
        match self {
            Device::Blk(d) => d.stop(),
            Device::Net(d) => d.stop(),
        }
    }

    pub(super) fn qos(&self) -> &QosHandle {
        match self {
            Device::Blk(d) => &d.shared().qos,
            Device::Net(d) => &d.shared().qos,
        }
    }
}

pub(super) struct Entry {
    device: Device,
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
    fabric: Fabric,
    switches: BTreeMap<String, switches::SwitchEntry>,
    state: Option<StateStore>,
}

impl Registry {
    /// An empty registry persisting to `state` (if any).
    pub fn new(state: Option<StateStore>) -> Self {
        Self {
            devices: BTreeMap::new(),
            groups: BTreeMap::new(),
            fabric: Fabric::default(),
            switches: BTreeMap::new(),
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
        let (id, socket) = match kind {
            "blk" => {
                let config = BlkConfig::from_options(OptionList::from_pairs(options.clone()))?;
                (config.id, config.socket)
            }
            "net" => {
                let config = NetConfig::from_options(OptionList::from_pairs(options.clone()))?;
                (config.id, config.socket)
            }
            other => return Err(RegistryError::UnknownType(other.to_string())),
        };
        if self.devices.contains_key(&id) {
            return Err(RegistryError::Exists(format!("device `{id}` exists")));
        }
        if let Some((other, _)) = self
            .devices
            .iter()
            .find(|(_, e)| e.device.socket() == socket)
        {
            return Err(RegistryError::Exists(format!(
                "socket {} is used by device `{other}`",
                socket.display(),
            )));
        }
        let device = self.start(kind, &options)?;
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
        entry.device.stop();
        Ok(())
    }

    /// Replaces device `id`'s recorded options (already validated) and saves them; on a save
    /// failure the previous options are put back and nothing changed.
    fn record_options(
        &mut self,
        id: &str,
        options: BTreeMap<String, String>,
    ) -> Result<(), RegistryError> {
        let Some(entry) = self.devices.get_mut(id) else {
            return Err(RegistryError::NotFound(id.to_string()));
        };
        let previous = std::mem::replace(&mut entry.record.options, options);
        if entry.persistent {
            if let Err(e) = self.save() {
                if let Some(entry) = self.devices.get_mut(id) {
                    entry.record.options = previous;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Starts a device from options already checked by `add`.
    fn start(
        &self,
        kind: &str,
        options: &BTreeMap<String, String>,
    ) -> Result<Device, RegistryError> {
        let list = OptionList::from_pairs(options.clone());
        if kind == "net" {
            let config = NetConfig::from_options(list)?;
            let group = self.resolve_group(config.qos_group.as_deref())?;
            let id = config.id.clone();
            let device =
                NetDevice::start(config, &self.fabric).map_err(|source| RegistryError::Start {
                    id,
                    source: source.into(),
                })?;
            device.shared().qos.set_group(group);
            return Ok(Device::Net(device));
        }
        let config = BlkConfig::from_options(list)?;
        let group = self.resolve_group(config.qos_group.as_deref())?;
        let id = config.id.clone();
        let device = BlkDevice::start(config).map_err(|source| RegistryError::Start {
            id,
            source: source.into(),
        })?;
        device.shared().set_group(group);
        Ok(Device::Blk(Box::new(device)))
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
        let entry = self.entry(id)?;
        let options = with_changes(&entry.record.options, changes);
        let list = OptionList::from_pairs(options.clone());
        // The whole option set is validated as the device kind's own parser sees it.
        let (qos, qos_group) = match &entry.device {
            Device::Blk(_) => {
                let config = BlkConfig::from_options(list)?;
                (config.qos, config.qos_group)
            }
            Device::Net(_) => {
                let config = NetConfig::from_options(list)?;
                (config.qos, config.qos_group)
            }
        };
        let group = self.resolve_group(qos_group.as_deref())?;
        self.record_options(id, options)?;
        if let Some(entry) = self.devices.get(id) {
            let handle = entry.device.qos();
            // Validated above by from_options, which builds the same limiter.
            if let Err(e) = handle.set_limits(&qos) {
                log::error!("{id}: cannot apply validated limits: {e}");
            }
            handle.set_group(group);
        }
        self.qos(id)
    }

    /// A device's rate limits and how much they held it back.
    pub fn qos(&self, id: &str) -> Result<Value, RegistryError> {
        let entry = self.entry(id)?;
        let handle = entry.device.qos();
        let limits: serde_json::Map<String, Value> = handle
            .config()
            .limits
            .iter()
            .map(|(key, rate)| (key.to_string(), json!(rate)))
            .collect();
        let (throttled, wait_ns) = match &entry.device {
            Device::Blk(device) => {
                let queues = device.shared().stats();
                (
                    queues.iter().map(|q| q.throttled).sum::<u64>(),
                    queues.iter().map(|q| q.throttle_wait_ns).sum::<u64>(),
                )
            }
            Device::Net(device) => {
                let stats = device.stats();
                (
                    stats.tx_throttled.saturating_add(stats.rx_throttled),
                    stats.throttle_wait_ns,
                )
            }
        };
        Ok(json!({
            "id": id,
            "group": entry.record.options.get(GROUP_KEY),
            "limits": limits,
            "tokens": handle.tokens().into_iter().collect::<BTreeMap<_, _>>(),
            "throttled": throttled,
            "throttle-wait-ns": wait_ns,
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
        for switch in saved.switches {
            self.add_switch(&switch.name, switch.options)?;
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
                switches: self
                    .switches
                    .iter()
                    .map(|(name, s)| SwitchRecord {
                        name: name.clone(),
                        options: s.options.clone(),
                    })
                    .collect(),
            };
            state.save(&saved)?;
        }
        Ok(())
    }

    pub(super) fn entry(&self, id: &str) -> Result<&Entry, RegistryError> {
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
        let device = match &entry.device {
            Device::Blk(device) => device,
            Device::Net(device) => {
                let config = device.config();
                return Ok(json!({
                    "id": config.id,
                    "type": "net",
                    "socket": config.socket,
                    "backend": config.backend,
                    "mac": crate::devices::net::config::format_mac(&config.mac),
                    "queues": config.queue_pairs,
                    "queue-size": config.queue_size,
                    "mtu": config.mtu,
                    "vlan": config.vlan,
                    "link-up": device.link_up(),
                    "connected": device.is_connected(),
                    "persistent": entry.persistent,
                }));
            }
        };
        let config = device.config();
        let shared = device.shared();
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
            "connected": device.is_connected(),
            "persistent": entry.persistent,
            "flush-failed": shared.flush_failed.load(std::sync::atomic::Ordering::Acquire),
        }))
    }

    /// A device's counters: totals and per queue.
    pub fn stats(&self, id: &str) -> Result<Value, RegistryError> {
        let entry = self.entry(id)?;
        let device = match &entry.device {
            Device::Blk(device) => device,
            Device::Net(device) => {
                let stats = device.stats();
                return Ok(json!({
                    "id": id,
                    "type": "net",
                    "link-up": device.link_up(),
                    "total": stats,
                    "drops": stats.total_drops(),
                }));
            }
        };
        let queues = device.shared().stats();
        Ok(json!({
            "id": id,
            "type": "blk",
            "total": total(&queues),
            "queues": queues,
        }))
    }

    /// Every device's id, connection state and counters, for metrics.
    pub fn metrics_snapshot(&self) -> Vec<(String, bool, Vec<QueueSnapshot>)> {
        self.devices
            .iter()
            .filter_map(|(id, e)| match &e.device {
                Device::Blk(d) => Some((id.clone(), d.is_connected(), d.shared().stats())),
                Device::Net(_) => None,
            })
            .collect()
    }

    /// Net devices' counters for `/metrics`: (id, connected, link up, counters).
    pub fn net_metrics_snapshot(&self) -> Vec<(String, bool, bool, NetSnapshot)> {
        self.devices
            .iter()
            .filter_map(|(id, e)| match &e.device {
                Device::Net(d) => Some((id.clone(), d.is_connected(), d.link_up(), d.stats())),
                Device::Blk(_) => None,
            })
            .collect()
    }

    /// Stops every device (daemon shutdown); the state file is left as it is.
    pub fn stop_all(&mut self) {
        for (_, entry) in std::mem::take(&mut self.devices) {
            entry.device.stop();
        }
        for (_, entry) in std::mem::take(&mut self.switches) {
            entry.stop();
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
