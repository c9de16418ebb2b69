//! Switches in the registry: `switch.add NAME [uplink=TAP]`, `switch.remove`, `switch.list`,
//! `switch.ports`. Switches also come into being when a device names one (`switch=NAME`);
//! only those added explicitly are recorded in the state directory (with their uplink), the
//! others are recreated by their devices.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::BTreeMap;

use super::{Registry, RegistryError};
use crate::config::id;
use crate::devices::net::fabric::{mac_text, PortSink, SwitchHub};
use crate::devices::net::info::{PortInfo, SwitchInfo};
use crate::devices::net::uplink::Uplink;

/// A switch added with `switch.add`.
pub(super) struct SwitchEntry {
    pub(super) options: BTreeMap<String, String>,
    uplink: Option<Uplink>,
}

impl SwitchEntry {
    pub(super) fn stop(self) {
        if let Some(uplink) = self.uplink {
            uplink.stop();
        }
    }
}

impl Registry {
    /// Creates switch `name`, with a tap uplink if `options` has `uplink=TAP`.
    pub fn add_switch(
        &mut self,
        name: &str,
        mut options: BTreeMap<String, String>,
    ) -> Result<SwitchInfo, RegistryError> {
        id::validate(name).map_err(RegistryError::BadSwitch)?;
        let uplink_tap = options.remove("uplink");
        if let Some(key) = options.keys().next() {
            return Err(RegistryError::BadSwitch(format!(
                "unknown switch option `{key}` (known: uplink)"
            )));
        }
        if let Some(tap) = &uplink_tap {
            if tap.is_empty() || tap.len() >= libc::IFNAMSIZ || tap.contains('/') {
                return Err(RegistryError::BadSwitch(format!("bad tap name `{tap}`")));
            }
            options.insert("uplink".into(), tap.clone());
        }
        if self.switches.contains_key(name) || self.fabric.get(name).is_some() {
            return Err(RegistryError::Exists(format!("switch `{name}` exists")));
        }
        if let Some(user) = uplink_tap.as_deref().and_then(|tap| self.tap_user(tap)) {
            return Err(RegistryError::Exists(format!(
                "tap {} is used by {user}",
                uplink_tap.as_deref().unwrap_or_default()
            )));
        }
        let hub = self.fabric.switch(name);
        let uplink = match uplink_tap.as_deref().map(|tap| Uplink::start(&hub, tap)) {
            None => None,
            Some(Ok(uplink)) => Some(uplink),
            Some(Err(e)) => {
                let _ = self.fabric.remove(name);
                return Err(RegistryError::Start {
                    id: format!("switch {name}"),
                    source: e.into(),
                });
            }
        };
        self.switches
            .insert(name.to_string(), SwitchEntry { options, uplink });
        if let Err(e) = self.save() {
            if let Some(entry) = self.switches.remove(name) {
                entry.stop();
            }
            let _ = self.fabric.remove(name);
            return Err(e);
        }
        self.describe_switch(name)
    }

    /// Removes switch `name` (and its uplink); refused while devices are its ports.
    pub fn remove_switch(&mut self, name: &str) -> Result<(), RegistryError> {
        let hub = self
            .fabric
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(format!("switch {name}")))?;
        let devices: Vec<String> = hub
            .ports()
            .iter()
            .filter(|p| matches!(p.sink, PortSink::Guest(_)))
            .map(|p| p.name.clone())
            .collect();
        if !devices.is_empty() {
            return Err(RegistryError::Busy(format!(
                "switch {name} (ports: {})",
                devices.join(", ")
            )));
        }
        let entry = self.switches.remove(name);
        if entry.is_some() {
            if let Err(e) = self.save() {
                if let Some(entry) = entry {
                    self.switches.insert(name.to_string(), entry);
                }
                return Err(e);
            }
        }
        if let Some(entry) = entry {
            entry.stop();
        }
        let _ = self.fabric.remove(name);
        Ok(())
    }

    /// Every switch with its counters.
    pub fn list_switches(&self) -> Vec<SwitchInfo> {
        self.fabric
            .list()
            .iter()
            .filter_map(|hub| self.describe_switch(hub.name()).ok())
            .collect()
    }

    /// The ports of switch `name`.
    pub fn switch_ports(&self, name: &str) -> Result<Vec<PortInfo>, RegistryError> {
        let hub = self.hub(name)?;
        Ok(hub
            .ports()
            .iter()
            .map(|port| PortInfo {
                port: port.number,
                name: port.name.clone(),
                kind: if port.config.uplink {
                    "uplink"
                } else {
                    "device"
                },
                mac: (!port.config.uplink).then(|| mac_text(&port.config.mac)),
                vlan: port.config.vlan,
                connected: match &port.sink {
                    PortSink::Guest(target) => target
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .is_some(),
                    PortSink::Uplink(tap) => crate::lock::lock(tap).is_up(),
                },
                stats: port.stats.snapshot(),
            })
            .collect())
    }

    /// Refuses a net device whose tap is already used in this daemon, or whose MAC another
    /// port of its switch has (the switch checks the MAC again when the port attaches).
    pub(super) fn check_net_unique(
        &self,
        config: &crate::devices::net::config::NetConfig,
    ) -> Result<(), RegistryError> {
        use crate::devices::net::config::NetBackendSpec;
        match &config.backend {
            NetBackendSpec::Tap(tap) => match self.tap_user(tap) {
                Some(user) => Err(RegistryError::Exists(format!(
                    "tap {tap} is used by {user}"
                ))),
                None => Ok(()),
            },
            // A migration's destination port may share the source's MAC; the switch allows
            // exactly that one pair when the port attaches (`fabric::SwitchHub::attach`).
            NetBackendSpec::Switch(_) if config.incoming => Ok(()),
            NetBackendSpec::Switch(name) => {
                let taken = self.fabric.get(name).and_then(|hub| {
                    hub.ports()
                        .into_iter()
                        .find(|p| !p.config.uplink && p.config.mac == config.mac)
                });
                match taken {
                    Some(port) => Err(RegistryError::Exists(format!(
                        "MAC {} is used by port {} on switch {name}",
                        mac_text(&config.mac),
                        port.name
                    ))),
                    None => Ok(()),
                }
            }
        }
    }

    /// Who uses tap `name` in this daemon (a device, or a switch's uplink), if anyone: a tap
    /// serves one tenant, so a second device or uplink on it is refused.
    pub(super) fn tap_user(&self, name: &str) -> Option<String> {
        use crate::devices::net::config::NetBackendSpec;
        let device = self
            .devices
            .iter()
            .find_map(|(id, entry)| match &entry.device {
                super::Device::Net(d) => {
                    matches!(&d.config().backend, NetBackendSpec::Tap(t) if t == name)
                        .then(|| format!("device {id}"))
                }
                super::Device::Blk(_) => None,
            });
        device.or_else(|| {
            self.switches
                .iter()
                .find(|(_, s)| s.options.get("uplink").map(String::as_str) == Some(name))
                .map(|(switch, _)| format!("the uplink of switch {switch}"))
        })
    }

    fn hub(&self, name: &str) -> Result<std::sync::Arc<SwitchHub>, RegistryError> {
        self.fabric
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(format!("switch {name}")))
    }

    fn describe_switch(&self, name: &str) -> Result<SwitchInfo, RegistryError> {
        let hub = self.hub(name)?;
        let entry = self.switches.get(name);
        Ok(SwitchInfo {
            name: name.to_string(),
            ports: hub.ports().len(),
            learnt_macs: hub.learnt(),
            uplink: entry.and_then(|e| e.options.get("uplink").cloned()),
            persistent: entry.is_some(),
            stats: hub.stats.snapshot(),
        })
    }
}
