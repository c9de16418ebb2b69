//! State shared by a block device's connections and queue workers: identity, limits, the
//! sticky flush-failure flag, QoS, the engine source and per-queue counters. Imports nothing
//! else of the device, so every file of `blk` can depend on it and none on each other.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::request::Limits;
use super::spec::{ConfigSpace, MAX_IOVECS, SECTOR_SHIFT};
use super::stats::{QueueSnapshot, QueueStats};
use crate::devices::poll::PollConfig;
use crate::qos::config::QosConfig;
use crate::qos::group::SharedLimiter;
use crate::qos::handle::QosHandle;
use crate::qos::limiter::LimitError;
use crate::storage::tier::store::TierStore;
use crate::storage::{open_engine, Engine, EngineError, EngineSource};

/// State shared by a device's connections and workers.
pub struct DeviceShared {
    /// Device id, for logs and stats.
    pub id: String,
    /// GET_ID serial.
    pub serial: String,
    /// Number of queues.
    pub queues: u16,
    /// Largest queue size.
    pub queue_size: u16,
    /// Capacity in bytes (a multiple of 512); changes on a resize ([`Self::set_capacity`]).
    pub capacity: AtomicU64,
    /// Writes, discards and write-zeroes are refused.
    pub readonly: bool,
    /// Logical block size.
    pub logical_block_size: u32,
    /// Set by the first failed flush; every later flush fails.
    pub flush_failed: AtomicBool,
    /// How long workers poll for more work after the ring runs dry.
    pub poll: PollConfig,
    /// Most guest memory a front-end may have mapped (`mem-max`).
    pub memory_max: u64,
    /// Whether a front-end is connected now.
    pub connected: Arc<AtomicBool>,
    /// The device's rate limits (own and group), shared by its queues.
    pub qos: QosHandle,
    /// What each queue's engine is built over.
    pub engine: EngineSource,
    /// On a `direct` disk, the alignment O_DIRECT needs (the logical block size): unaligned
    /// guest buffers go through a bounce buffer.
    pub direct_align: Option<usize>,
    /// Counters, one per queue (they outlive connections).
    pub stats: Vec<Arc<QueueStats>>,
    /// The front-end's inflight region (`INFLIGHT_SHMFD`), read by each queue worker when its
    /// queue starts.
    pub inflight: crate::devices::shell::inflight::InflightSlot,
    /// The image's lock, which follows the running side of a live migration (`None`: the
    /// null device).
    pub image: Option<Arc<crate::storage::image_lock::ImageLock>>,
    /// The front-end's backend-request channel (capacity-change notifications).
    pub backend_channel: crate::devices::shell::channel::BackendChannel,
}

impl DeviceShared {
    /// Shared state for a device `id` with `queues` queues of up to `queue_size` entries over
    /// `engine`: serial = id, 512-byte blocks, no polling, no limits, nothing connected. The
    /// fields are public for the few that differ.
    pub fn new(
        id: &str,
        queues: u16,
        queue_size: u16,
        limits: Limits,
        engine: EngineSource,
    ) -> Self {
        Self {
            id: id.to_string(),
            serial: id.to_string(),
            queues,
            queue_size,
            capacity: AtomicU64::new(limits.capacity),
            readonly: limits.readonly,
            logical_block_size: 512,
            flush_failed: AtomicBool::new(false),
            poll: PollConfig {
                mode: crate::devices::poll::PollMode::Off,
                ..PollConfig::default()
            },
            memory_max: crate::devices::options::DEFAULT_MEMORY_MAX,
            connected: Arc::new(AtomicBool::new(false)),
            qos: QosHandle::default(),
            engine,
            direct_align: None,
            stats: (0..queues).map(|_| Arc::default()).collect(),
            inflight: crate::devices::shell::inflight::InflightSlot::new(queues, queue_size),
            image: None,
            backend_channel: Default::default(),
        }
    }

    /// What validation checks against now.
    pub fn limits(&self) -> Limits {
        Limits {
            capacity: self.capacity(),
            readonly: self.readonly,
        }
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// A resize: requests are checked against `bytes` (rounded down to 512) from the next
    /// one on, and the front-end is told to re-read the config space (which tells the guest).
    /// Returns whether it was told (no channel: the guest sees the size at its next start).
    pub fn set_capacity(&self, bytes: u64) -> bool {
        let old = self.capacity.swap(bytes & !511, Ordering::AcqRel);
        if old == bytes & !511 {
            return true;
        }
        log::info!("{}: capacity {old} -> {} bytes", self.id, bytes & !511);
        self.backend_channel.config_changed(&self.id)
    }

    /// A new engine for one queue worker.
    pub fn new_engine(&self) -> Result<Box<dyn Engine>, EngineError> {
        open_engine(&self.engine, self.queue_size)
    }

    /// The tier store of a tiered disk.
    pub fn tier(&self) -> Option<&Arc<TierStore>> {
        self.engine.tier.as_ref()
    }

    /// Replaces the rate limits; takes effect for the next request on every queue.
    pub fn set_qos(&self, config: &QosConfig) -> Result<(), LimitError> {
        self.qos.set_limits(config)
    }

    /// Joins `group` (or leaves the current one with `None`).
    pub fn set_group(&self, group: Option<Arc<SharedLimiter>>) {
        self.qos.set_group(group);
    }

    /// The counters of queue `queue`.
    pub fn queue_stats(&self, queue: u16) -> Arc<QueueStats> {
        // Queue ids come from the worker set built from `queues`; a stray one gets fresh,
        // unreported counters rather than a panic.
        self.stats
            .get(usize::from(queue))
            .map_or_else(Arc::default, Arc::clone)
    }

    /// Snapshots of every queue's counters.
    pub fn stats(&self) -> Vec<QueueSnapshot> {
        self.stats.iter().map(|s| s.snapshot()).collect()
    }

    /// The engine actually in use ("null" for the null device).
    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// The virtio-blk config space.
    pub fn config_space(&self) -> ConfigSpace {
        // Linux sizes scatter lists from seg_max; leave room for header and status and stay
        // within what one preadv/pwritev accepts.
        let seg_max = u32::from(self.queue_size)
            .saturating_sub(2)
            .clamp(1, MAX_IOVECS_U32.saturating_sub(2));
        ConfigSpace {
            capacity_sectors: self.capacity() >> SECTOR_SHIFT,
            seg_max,
            logical_block_size: self.logical_block_size,
            num_queues: self.queues,
        }
    }
}

const MAX_IOVECS_U32: u32 = MAX_IOVECS as u32;
