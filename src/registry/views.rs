//! Typed views of what the registry holds, for the control plane (which serializes them) and
//! `/metrics` (which encodes their fields): devices, QoS, groups, switches and tiered disks.
//! [`Snapshot`] is everything one scrape needs, taken under the registry lock once and
//! encoded after it is released.

use serde::Serialize;

use super::{Device, Registry, RegistryError};
use crate::devices::blk::info::{BlkInfo, BlkStats};
use crate::devices::net::info::{NetInfo, NetStatsView, SwitchInfo};
use crate::qos::config::GROUP_KEY;
use crate::qos::info::{GroupInfo, QosInfo};
use crate::storage::tier::status::TierStatus;

/// A device's description, tagged with its kind.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum DeviceInfo {
    /// A block device.
    Blk(BlkInfo),
    /// A net device.
    Net(NetInfo),
    /// A recorded device that could not start (`device.retry` tries again).
    Failed(FailedInfo),
}

/// A recorded device that could not start.
#[derive(Debug, Clone, Serialize)]
pub struct FailedInfo {
    /// Device id.
    pub id: String,
    /// Its kind (`blk`, `net`).
    pub kind: String,
    /// Why it could not start.
    pub reason: String,
}

/// A device's description and whether the state directory records it.
#[derive(Debug, Clone, Serialize)]
pub struct Described {
    /// The device.
    #[serde(flatten)]
    pub info: DeviceInfo,
    /// Recorded in the state directory (added at run time).
    pub persistent: bool,
}

/// A device's counters, tagged with its kind.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum DeviceStats {
    /// A block device.
    Blk(BlkStats),
    /// A net device.
    Net(NetStatsView),
}

/// Everything one `/metrics` scrape encodes.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Block devices' counters.
    pub blk: Vec<BlkStats>,
    /// Net devices' counters.
    pub net: Vec<NetStatsView>,
    /// Switches.
    pub switches: Vec<SwitchInfo>,
    /// Devices' own QoS state (those with limits).
    pub qos: Vec<QosInfo>,
    /// QoS groups.
    pub groups: Vec<GroupInfo>,
    /// Tiered disks.
    pub tiers: Vec<TierStatus>,
    /// Recorded devices that failed to start.
    pub failed: Vec<FailedInfo>,
}

impl Device {
    fn info(&self) -> DeviceInfo {
        match self {
            Device::Blk(d) => DeviceInfo::Blk(d.info()),
            Device::Net(d) => DeviceInfo::Net(d.info()),
        }
    }

    fn stats(&self) -> DeviceStats {
        match self {
            Device::Blk(d) => DeviceStats::Blk(d.stats()),
            Device::Net(d) => DeviceStats::Net(d.stats()),
        }
    }
}

impl Registry {
    /// A device's description.
    pub fn describe(&self, id: &str) -> Result<Described, RegistryError> {
        if let Some(failed) = self.failed.get(id) {
            return Ok(failed_described(id, failed));
        }
        let entry = self.entry(id)?;
        Ok(Described {
            info: entry.device.info(),
            persistent: entry.persistent,
        })
    }

    /// Every device's description, in id order; failed ones after the running ones.
    pub fn list(&self) -> Vec<Described> {
        self.devices
            .values()
            .map(|entry| Described {
                info: entry.device.info(),
                persistent: entry.persistent,
            })
            .chain(self.failed.iter().map(|(id, f)| failed_described(id, f)))
            .collect()
    }

    /// A device's counters.
    pub fn stats(&self, id: &str) -> Result<DeviceStats, RegistryError> {
        Ok(self.entry(id)?.device.stats())
    }

    /// A device's rate limits and how much they held it back.
    pub fn qos(&self, id: &str) -> Result<QosInfo, RegistryError> {
        let entry = self.entry(id)?;
        Ok(qos_info(id, entry, &entry.device.stats()))
    }

    /// Everything `/metrics` reports, in one pass under the caller's lock.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for (id, entry) in &self.devices {
            let stats = entry.device.stats();
            let qos = qos_info(id, entry, &stats);
            if !qos.tokens.is_empty() {
                snapshot.qos.push(qos);
            }
            match stats {
                DeviceStats::Blk(stats) => snapshot.blk.push(stats),
                DeviceStats::Net(stats) => snapshot.net.push(stats),
            }
            if let Device::Blk(device) = &entry.device {
                if let Some(store) = device.shared().tier() {
                    snapshot.tiers.push(store.status(id));
                }
            }
        }
        snapshot.switches = self.list_switches();
        snapshot.groups = self.list_groups();
        snapshot.failed = self
            .failed
            .iter()
            .map(|(id, failed)| FailedInfo {
                id: id.clone(),
                kind: failed.record.kind.clone(),
                reason: failed.reason.clone(),
            })
            .collect();
        snapshot
    }
}

fn failed_described(id: &str, failed: &super::Failed) -> Described {
    Described {
        info: DeviceInfo::Failed(FailedInfo {
            id: id.to_string(),
            kind: failed.record.kind.clone(),
            reason: failed.reason.clone(),
        }),
        persistent: true,
    }
}

/// A device's QoS state, from counters already read.
fn qos_info(id: &str, entry: &super::Entry, stats: &DeviceStats) -> QosInfo {
    let handle = entry.device.qos();
    let (throttled, throttle_wait_ns) = match stats {
        DeviceStats::Blk(stats) => (
            stats.total.throttled,
            stats
                .queues
                .iter()
                .map(|q| q.throttle_wait_ns)
                .fold(0u64, u64::saturating_add),
        ),
        DeviceStats::Net(stats) => (
            stats
                .total
                .tx_throttled
                .saturating_add(stats.total.rx_throttled),
            stats.total.throttle_wait_ns,
        ),
    };
    QosInfo {
        id: id.to_string(),
        group: entry.record.options.get(GROUP_KEY).cloned(),
        limits: handle.config().limits.into_iter().collect(),
        tokens: handle.tokens().into_iter().collect(),
        throttled,
        throttle_wait_ns,
    }
}
