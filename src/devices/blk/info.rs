//! What a block device reports about itself, as typed structs: its description
//! (`device.get`), its counters (`device.stats`, `/metrics`). The control plane serializes
//! them and the metrics encoder reads their fields; neither looks values up by name.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::stats::{OpClass, QueueSnapshot};

/// A block device's description.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlkInfo {
    /// Device id.
    pub id: String,
    /// vhost-user socket.
    pub socket: PathBuf,
    /// Backing file, or `null`.
    pub path: String,
    /// Capacity in bytes.
    pub size: u64,
    /// Read-only device.
    pub readonly: bool,
    /// O_DIRECT backing.
    pub direct: bool,
    /// Queues.
    pub queues: u16,
    /// Largest queue size.
    pub queue_size: u16,
    /// GET_ID serial.
    pub serial: String,
    /// Engine in use.
    pub engine: &'static str,
    /// Logical block size.
    pub logical_block_size: u32,
    /// Poll window.
    pub poll_us: u32,
    /// A front-end is connected.
    pub connected: bool,
    /// A flush has failed (every later flush fails too).
    pub flush_failed: bool,
}

/// Totals over a device's queues.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlkTotals {
    /// Completed requests by type.
    pub requests: BTreeMap<&'static str, u64>,
    /// Bytes read by the guest.
    pub bytes_read: u64,
    /// Bytes written by the guest.
    pub bytes_written: u64,
    /// Requests the backing failed.
    pub io_errors: u64,
    /// Requests refused by validation.
    pub rejected: u64,
    /// Requests submitted and not completed.
    pub in_flight: u64,
    /// Requests held back by QoS.
    pub throttled: u64,
}

impl BlkTotals {
    /// Sums per-queue snapshots.
    pub fn of(queues: &[QueueSnapshot]) -> Self {
        let sum = |f: &dyn Fn(&QueueSnapshot) -> u64| {
            queues.iter().map(f).fold(0u64, u64::saturating_add)
        };
        Self {
            requests: OpClass::ALL
                .iter()
                .map(|c| (c.name(), sum(&|q| q.requests_of(*c))))
                .collect(),
            bytes_read: sum(&|q| q.bytes_read),
            bytes_written: sum(&|q| q.bytes_written),
            io_errors: sum(&|q| q.io_errors),
            rejected: sum(&|q| q.rejected.iter().map(|(_, n)| *n).sum()),
            in_flight: sum(&|q| q.in_flight),
            throttled: sum(&|q| q.throttled),
        }
    }
}

/// A block device's counters.
#[derive(Debug, Clone, Serialize)]
pub struct BlkStats {
    /// Device id.
    pub id: String,
    /// A front-end is connected.
    pub connected: bool,
    /// Totals over the queues.
    pub total: BlkTotals,
    /// Each queue's counters.
    pub queues: Vec<QueueSnapshot>,
}
