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

use crate::config::options::OptionList;
use crate::devices::blk::device::BlkDevice;
use crate::devices::kind::{DeviceConfig, KindError};
use crate::devices::net::device::NetDevice;
use crate::devices::net::fabric::Fabric;
use crate::qos::config::QosConfig;
use crate::qos::group::SharedLimiter;
use crate::qos::handle::QosHandle;
mod groups;
mod switches;
pub mod tiers;
pub mod views;

use crate::state::{DeviceRecord, GroupRecord, Saved, StateError, StateStore, SwitchRecord};

/// Errors from registry changes; each maps to a stable control-plane error kind.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The device type or options were invalid.
    #[error(transparent)]
    Config(Box<KindError>),
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
            RegistryError::Config(_)
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

impl From<KindError> for RegistryError {
    fn from(e: KindError) -> Self {
        RegistryError::Config(Box::new(e))
    }
}

impl From<crate::devices::blk::config::BlkConfigError> for RegistryError {
    fn from(e: crate::devices::blk::config::BlkConfigError) -> Self {
        KindError::from(e).into()
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

    /// Stops the device for good (`device.remove`): resources it made for itself (a
    /// persistent tap) go too.
    fn remove(self) {
        self.qos().set_group(None);
        match self {
            Device::Blk(d) => d.stop(),
            Device::Net(d) => d.remove(),
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
    /// Recorded devices that could not start (restore): kept, listed, retried on request.
    failed: BTreeMap<String, Failed>,
    groups: BTreeMap<String, Group>,
    fabric: Fabric,
    switches: BTreeMap<String, switches::SwitchEntry>,
    state: Option<StateStore>,
    /// While the state directory is being replayed nothing is written back: the file stays
    /// exactly as loaded until every record has been tried.
    restoring: bool,
}

/// A recorded device that failed to start, and why.
pub(super) struct Failed {
    pub(super) record: DeviceRecord,
    pub(super) reason: String,
}

impl Registry {
    /// An empty registry persisting to `state` (if any).
    pub fn new(state: Option<StateStore>) -> Self {
        Self {
            devices: BTreeMap::new(),
            failed: BTreeMap::new(),
            restoring: false,
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
        let config = DeviceConfig::parse(kind, OptionList::from_pairs(options.clone()))?;
        let (id, socket) = (config.id().to_string(), config.socket().to_path_buf());
        if let DeviceConfig::Net(net) = &config {
            self.check_net_unique(net)?;
        }
        if let DeviceConfig::Blk(blk) = &config {
            self.check_rbd_unique(blk)?;
        }
        if self.devices.contains_key(&id) || self.failed.contains_key(&id) {
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
        let record = DeviceRecord {
            kind: config.kind().to_string(),
            options,
        };
        let device = self.start(config)?;
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
        if let Some(failed) = self.failed.remove(id) {
            if let Err(e) = self.save() {
                self.failed.insert(id.to_string(), failed);
                return Err(e);
            }
            return Ok(());
        }
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
        entry.device.remove();
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

    /// Starts a device from its parsed configuration.
    fn start(&self, config: DeviceConfig) -> Result<Device, RegistryError> {
        let group = self.resolve_group(config.qos_group())?;
        let id = config.id().to_string();
        let start_error = |source: Box<dyn std::error::Error + Send + Sync>| RegistryError::Start {
            id: id.clone(),
            source,
        };
        let device = match config {
            DeviceConfig::Blk(config) => Device::Blk(Box::new(
                BlkDevice::start(config).map_err(|e| start_error(e.into()))?,
            )),
            DeviceConfig::Net(config) => Device::Net(
                NetDevice::start(config, &self.fabric).map_err(|e| start_error(e.into()))?,
            ),
        };
        device.qos().set_group(group);
        Ok(device)
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
    ) -> Result<crate::qos::info::QosInfo, RegistryError> {
        if let Some(key) = changes.keys().find(|k| !QosConfig::is_qos_key(k)) {
            return Err(RegistryError::NotQos(key.clone()));
        }
        let entry = self.entry(id)?;
        let options = with_changes(&entry.record.options, changes);
        // The whole option set is validated as the device kind's own parser sees it.
        let config =
            DeviceConfig::parse(&entry.record.kind, OptionList::from_pairs(options.clone()))?;
        let (qos, group) = (config.qos(), self.resolve_group(config.qos_group())?);
        self.record_options(id, options)?;
        if let Some(entry) = self.devices.get(id) {
            let handle = entry.device.qos();
            // Validated above by from_options, which builds the same limiter.
            if let Err(e) = handle.set_limits(qos) {
                log::error!("{id}: cannot apply validated limits: {e}");
            }
            handle.set_group(group);
        }
        self.qos(id)
    }

    /// Recreates the groups, switches and devices recorded in the state directory. A device
    /// that cannot start (missing image, locked file, corrupt tier metadata, ...) does not stop
    /// the others: it is kept as `failed` with its reason, listed, written back unchanged, and
    /// can be retried with [`Registry::retry`]. Nothing is written while replaying. Returns
    /// how many devices started.
    pub fn restore(&mut self) -> Result<usize, RegistryError> {
        let Some(state) = &self.state else {
            return Ok(0);
        };
        let saved = state.load()?;
        self.restoring = true;
        let result = self.replay(saved);
        self.restoring = false;
        result
    }

    fn replay(&mut self, saved: Saved) -> Result<usize, RegistryError> {
        for group in saved.groups {
            self.add_group(&group.name, group.options)?;
        }
        for switch in saved.switches {
            self.add_switch(&switch.name, switch.options)?;
        }
        let mut started = 0usize;
        for (n, record) in saved.devices.into_iter().enumerate() {
            match self.add(&record.kind, record.options.clone(), true) {
                Ok(_) => started = started.saturating_add(1),
                Err(e) => {
                    let id = record_id(&record, n);
                    let reason = error_chain(&e);
                    log::error!(
                        "device {id} recorded in the state directory failed to start: {reason}"
                    );
                    self.failed.insert(id, Failed { record, reason });
                }
            }
        }
        Ok(started)
    }

    /// Tries a failed device again (after the operator fixed its backing).
    pub fn retry(&mut self, id: &str) -> Result<(), RegistryError> {
        let Some(failed) = self.failed.remove(id) else {
            return Err(RegistryError::NotFound(format!("failed device {id}")));
        };
        match self.add(&failed.record.kind, failed.record.options.clone(), true) {
            Ok(_) => Ok(()),
            Err(e) => {
                self.failed.insert(
                    id.to_string(),
                    Failed {
                        reason: error_chain(&e),
                        record: failed.record,
                    },
                );
                Err(e)
            }
        }
    }

    /// Refuses a second device on an RBD image this daemon already serves (files are
    /// refused by their lock; an RBD image's exclusive lock is cooperative and would let two
    /// guests write it in turn). A migration's destination (`incoming=on`) is the exception.
    fn check_rbd_unique(
        &self,
        config: &crate::devices::blk::config::BlkConfig,
    ) -> Result<(), RegistryError> {
        use crate::devices::blk::config::BackingSpec;
        // A destination and a snapshot (read-only) may share the image.
        let BackingSpec::Rbd(spec) = &config.backing else {
            return Ok(());
        };
        if config.incoming || spec.snapshot.is_some() {
            return Ok(());
        }
        let serving = self.devices.iter().find(|(_, entry)| match &entry.device {
            Device::Blk(device) => match &device.config().backing {
                BackingSpec::Rbd(theirs) => {
                    !device.config().incoming
                        && theirs.snapshot.is_none()
                        && (
                            &theirs.pool,
                            &theirs.namespace,
                            &theirs.image,
                            &theirs.client.conf,
                        ) == (&spec.pool, &spec.namespace, &spec.image, &spec.client.conf)
                }
                _ => false,
            },
            Device::Net(_) => false,
        });
        match serving {
            Some((other, _)) => Err(RegistryError::Exists(format!(
                "{} is served by device `{other}`",
                spec.display()
            ))),
            None => Ok(()),
        }
    }

    /// Grows disk `id` to `size` bytes. A `size=` option follows: recorded before the disk
    /// grows (and put back if it cannot), so a restart finds the image as it is. A disk
    /// given `size=` on the command line is refused: the restart would ask for the old size.
    pub fn resize(&mut self, id: &str, size: u64) -> Result<(), RegistryError> {
        let entry = self.entry(id)?;
        if !matches!(entry.device, Device::Blk(_)) {
            return Err(RegistryError::InvalidOption(format!(
                "device `{id}` is not a disk"
            )));
        }
        let previous = entry.record.options.clone();
        if previous.contains_key("size") {
            if !entry.persistent {
                return Err(RegistryError::InvalidOption(format!(
                    "{id} was given size= on the command line; change it there and restart"
                )));
            }
            let options = with_changes(
                &previous,
                BTreeMap::from([("size".to_string(), Some(size.to_string()))]),
            );
            self.record_options(id, options)?;
        }
        let entry = self.entry(id)?;
        let Device::Blk(device) = &entry.device else {
            return Ok(());
        };
        if let Err(e) = device.resize(size) {
            let message = error_chain(&e);
            if previous.contains_key("size") {
                self.record_options(id, previous)?;
            }
            return Err(RegistryError::InvalidOption(message));
        }
        Ok(())
    }

    fn save(&self) -> Result<(), RegistryError> {
        if self.restoring {
            return Ok(());
        }
        if let Some(state) = &self.state {
            let saved = Saved {
                devices: self
                    .devices
                    .values()
                    .filter(|e| e.persistent)
                    .map(|e| e.record.clone())
                    .chain(self.failed.values().map(|f| f.record.clone()))
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

    /// How many recorded devices failed to start (kept for `device.retry`).
    pub fn failed_count(&self) -> usize {
        self.failed.len()
    }

    /// The ids of the running devices.
    pub fn ids(&self) -> Vec<String> {
        self.devices.keys().cloned().collect()
    }

    /// A live upgrade's successor takes over: the devices' socket paths are its now.
    pub fn keep_sockets(&self) {
        for entry in self.devices.values() {
            match &entry.device {
                Device::Blk(d) => d.keep_socket(),
                Device::Net(d) => d.keep_socket(),
            }
        }
    }

    /// Copies of every running device's listening socket, by path, for a live upgrade's
    /// successor.
    pub fn hand_over_sockets(&self) -> Vec<(std::path::PathBuf, std::os::fd::OwnedFd)> {
        self.devices
            .iter()
            .filter_map(|(id, entry)| {
                let handed = match &entry.device {
                    Device::Blk(d) => d.hand_over(),
                    Device::Net(d) => d.hand_over(),
                };
                handed
                    .map_err(|e| log::warn!("{id}: cannot hand its socket over: {e}"))
                    .ok()
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

/// The id a recorded device goes by: its own, its socket's stem, or its place in the file.
fn record_id(record: &DeviceRecord, n: usize) -> String {
    record
        .options
        .get("id")
        .cloned()
        .or_else(|| {
            record
                .options
                .get("socket")
                .and_then(|s| crate::config::id::from_socket(std::path::Path::new(s)).ok())
        })
        .unwrap_or_else(|| format!("record-{n}"))
}

/// An error and its causes, one line.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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
