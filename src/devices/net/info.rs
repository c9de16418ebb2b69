//! What a net device and a switch report about themselves, as typed structs: descriptions
//! (`device.get`, `switch.list`, `switch.ports`) and counters (`device.stats`, `/metrics`).

use std::path::PathBuf;

use serde::Serialize;

use super::config::NetBackendSpec;
use super::stats::NetSnapshot;

/// A net device's description.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NetInfo {
    /// Device id.
    pub id: String,
    /// vhost-user socket.
    pub socket: PathBuf,
    /// Tap or switch.
    pub backend: NetBackendSpec,
    /// MAC address.
    pub mac: String,
    /// Queue pairs.
    pub queues: u16,
    /// Largest queue size.
    pub queue_size: u16,
    /// MTU.
    pub mtu: u16,
    /// Access VLAN on a switch.
    pub vlan: Option<u16>,
    /// Link state.
    pub link_up: bool,
    /// A front-end is connected.
    pub connected: bool,
    /// The features the current (or last) front-end took that shape the data path.
    pub features: Vec<&'static str>,
}

/// A net device's counters.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NetStatsView {
    /// Device id.
    pub id: String,
    /// A front-end is connected.
    pub connected: bool,
    /// Link state.
    pub link_up: bool,
    /// Counters.
    pub total: NetSnapshot,
    /// All drops.
    pub drops: u64,
}

/// A switch.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SwitchInfo {
    /// Switch name.
    pub name: String,
    /// Ports attached.
    pub ports: usize,
    /// MACs learnt and alive.
    pub learnt_macs: usize,
    /// Uplink tap, if any.
    pub uplink: Option<String>,
    /// Recorded in the state directory.
    pub persistent: bool,
    /// Frames in and copies out, drops.
    pub stats: NetSnapshot,
}

/// A switch port.
#[derive(Debug, Clone, Serialize)]
pub struct PortInfo {
    /// Port number.
    pub port: u32,
    /// Device id or `uplink:TAP`.
    pub name: String,
    /// `device` or `uplink`.
    pub kind: &'static str,
    /// A device port's MAC.
    pub mac: Option<String>,
    /// Access VLAN.
    pub vlan: Option<u16>,
    /// Front-end connected (device) or tap up (uplink).
    pub connected: bool,
    /// The port's counters.
    pub stats: NetSnapshot,
}
