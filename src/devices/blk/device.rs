//! A block device's lifetime: its backing, its socket, and the thread that accepts one
//! front-end at a time.
//!
//! The device listens on its socket (server mode). Each accepted connection gets a fresh
//! [`BlkBackend`] (fresh workers and engines) over the device's shared state; when the
//! front-end goes away (guest reboot, QEMU restart) the workers finish what is in flight and
//! the device waits for the next front-end, without restarting the daemon. Counters and the
//! sticky flush-failure flag belong to the device and survive reconnects.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::backend::BlkBackend;
use super::config::{BackingSpec, BlkConfig, EngineKind};
use super::request::Limits;
use super::spec::{ConfigSpace, MAX_IOVECS, SECTOR_SHIFT};
use super::stats::{QueueSnapshot, QueueStats};
use crate::devices::runner::{BackendFactory, DeviceRunner, RunnerError};
use crate::qos::config::QosConfig;
use crate::qos::group::SharedLimiter;
use crate::qos::handle::QosHandle;
use crate::qos::limiter::LimitError;
use crate::storage::backing::{open_backing, open_log, BackingError, OpenRequest};
use crate::storage::null::NullEngine;
use crate::storage::sync::SyncEngine;
use crate::storage::uring::UringEngine;
use crate::storage::{uring_available, Engine, EngineError};
use crate::sys::poll::wait_readable_for;
use crate::tier::engine::TierEngine;
use crate::tier::store::{TierError, TierStore};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors starting a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The backing could not be opened.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// The tier store could not be opened (metadata corrupt or for another geometry, ...).
    #[error(transparent)]
    Tier(#[from] TierError),
    /// The tier policy thread could not start.
    #[error("cannot start the tier policy thread")]
    Policy(#[source] std::io::Error),
    /// The socket or its thread could not be set up.
    #[error(transparent)]
    Runner(#[from] RunnerError),
}

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
    /// What validation checks against.
    pub limits: Limits,
    /// Logical block size.
    pub logical_block_size: u32,
    /// Set by the first failed flush; every later flush fails.
    pub flush_failed: AtomicBool,
    /// How long workers poll for more work after the ring runs dry.
    pub poll: std::time::Duration,
    /// Whether a front-end is connected now.
    pub connected: Arc<AtomicBool>,
    /// The device's rate limits (own and group), shared by its queues.
    pub qos: QosHandle,
    file: Option<Arc<File>>,
    engine: EngineKind,
    /// The tier store of a tiered disk.
    pub tier: Option<Arc<TierStore>>,
    stats: Vec<Arc<QueueStats>>,
}

impl DeviceShared {
    /// A new engine for one queue worker.
    pub fn new_engine(&self) -> Result<Box<dyn Engine>, EngineError> {
        let Some(file) = &self.file else {
            return Ok(Box::new(NullEngine::default()));
        };
        let inner: Box<dyn Engine> = match self.engine {
            EngineKind::Uring => {
                let entries = u32::from(self.queue_size).saturating_mul(2);
                Box::new(UringEngine::new(Arc::clone(file), entries)?)
            }
            EngineKind::Sync => Box::new(SyncEngine::new(Arc::clone(file))),
        };
        Ok(match &self.tier {
            Some(store) => Box::new(TierEngine::new(inner, Arc::clone(store))),
            None => inner,
        })
    }

    /// Replaces the rate limits; takes effect for the next request on every queue.
    pub fn set_qos(&self, config: &QosConfig) -> Result<(), LimitError> {
        self.qos.set_limits(config)
    }

    /// Joins `group` (or leaves the current one with `None`).
    pub fn set_group(&self, group: Option<Arc<SharedLimiter>>) {
        self.qos.set_group(group);
    }

    /// The device's own current tokens, by limit name.
    pub fn qos_tokens(&self) -> Vec<(String, i64)> {
        self.qos.tokens()
    }

    /// The current rate-limit settings.
    pub fn qos_config(&self) -> QosConfig {
        self.qos.config()
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
        match (&self.file, self.engine) {
            (None, _) => "null",
            (Some(_), EngineKind::Uring) => "uring",
            (Some(_), EngineKind::Sync) => "sync",
        }
    }

    /// The virtio-blk config space.
    pub fn config_space(&self) -> ConfigSpace {
        // Linux sizes scatter lists from seg_max; leave room for header and status and stay
        // within what one preadv/pwritev accepts.
        let seg_max = u32::from(self.queue_size)
            .saturating_sub(2)
            .clamp(1, MAX_IOVECS_U32.saturating_sub(2));
        ConfigSpace {
            capacity_sectors: self.limits.capacity >> SECTOR_SHIFT,
            seg_max,
            logical_block_size: self.logical_block_size,
            num_queues: self.queues,
        }
    }
}

const MAX_IOVECS_U32: u32 = MAX_IOVECS as u32;

/// Runs a tiered disk's automatic policy once a second until `stop` is signalled.
fn start_policy_thread(
    id: &str,
    store: Arc<TierStore>,
) -> Result<(std::thread::JoinHandle<()>, Arc<EventFd>), DeviceError> {
    let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(DeviceError::Policy)?);
    let thread = {
        let stop = Arc::clone(&stop);
        let id = id.to_string();
        std::thread::Builder::new()
            .name(format!("tier-policy-{id}"))
            .spawn(move || loop {
                match wait_readable_for(stop.as_raw_fd(), std::time::Duration::from_secs(1)) {
                    Ok(false) => {}
                    Ok(true) => break,
                    Err(e) => {
                        log::error!("{id}: tier policy: {e}");
                        break;
                    }
                }
                let (down, up) = store.apply_policy();
                if down > 0 || up > 0 {
                    log::info!("{id}: tier policy demoted {down} and promoted {up} extent(s)");
                }
            })
            .map_err(DeviceError::Policy)?
    };
    Ok((thread, stop))
}

/// A running block device.
pub struct BlkDevice {
    config: BlkConfig,
    shared: Arc<DeviceShared>,
    runner: DeviceRunner,
    /// A tiered disk's policy thread and its stop event.
    policy: Option<(std::thread::JoinHandle<()>, Arc<EventFd>)>,
}

impl BlkDevice {
    /// Opens the backing, listens on the socket and starts accepting front-ends.
    pub fn start(config: BlkConfig) -> Result<Self, DeviceError> {
        let (file, capacity) = match &config.backing {
            BackingSpec::Null => (None, config.size.unwrap_or(0)),
            BackingSpec::File(path) => {
                let backing = open_backing(&OpenRequest {
                    path,
                    size: config.size,
                    readonly: config.readonly,
                    direct: config.direct,
                })?;
                (Some(Arc::new(backing.file)), backing.size)
            }
        };
        let tier = match (&config.tier, &file) {
            (Some(spec), Some(hot)) => {
                let cold = open_log(&spec.cold)?;
                let hot_path = match &config.backing {
                    BackingSpec::File(path) => path.clone(),
                    BackingSpec::Null => PathBuf::new(),
                };
                Some(Arc::new(TierStore::open(
                    Arc::clone(hot),
                    &hot_path,
                    cold,
                    capacity,
                    spec.extent_size,
                    spec.zstd_level,
                )?))
            }
            _ => None,
        };
        let mut engine = config.engine;
        if engine == EngineKind::Uring && file.is_some() && !uring_available() {
            log::warn!(
                "{}: io_uring unavailable, falling back to the sync engine",
                config.id
            );
            engine = EngineKind::Sync;
        }
        let shared = Arc::new(DeviceShared {
            id: config.id.clone(),
            serial: config.serial.clone(),
            queues: config.queues,
            queue_size: config.queue_size,
            limits: Limits {
                capacity: capacity & !511,
                readonly: config.readonly,
            },
            logical_block_size: config.logical_block_size,
            flush_failed: AtomicBool::new(false),
            poll: std::time::Duration::from_micros(u64::from(config.poll_us)),
            connected: Arc::new(AtomicBool::new(false)),
            qos: QosHandle::default(),
            file,
            engine,
            tier,
            stats: (0..config.queues).map(|_| Arc::default()).collect(),
        });
        if let Err(e) = shared.set_qos(&config.qos) {
            // Validated when the options were parsed; unreachable unless that changes.
            log::error!("{}: rate limits ignored: {e}", config.id);
        }
        let factory: BackendFactory<BlkBackend> = {
            let shared = Arc::clone(&shared);
            Box::new(move |memory| Ok(Arc::new(BlkBackend::new(Arc::clone(&shared), memory)?)))
        };
        let runner = DeviceRunner::start(
            &config.id,
            &config.socket,
            Arc::clone(&shared.connected),
            factory,
        )?;
        log::info!(
            "{}: serving {} ({} bytes, {} queue(s), engine {}) on {}",
            config.id,
            match &config.backing {
                BackingSpec::Null => "null".to_string(),
                BackingSpec::File(p) => p.display().to_string(),
            },
            capacity,
            config.queues,
            shared.engine_name(),
            config.socket.display()
        );
        let policy = match (&shared.tier, &config.tier) {
            (Some(store), Some(spec)) => {
                store.set_policy(spec.policy);
                Some(start_policy_thread(&config.id, Arc::clone(store))?)
            }
            _ => None,
        };
        Ok(Self {
            config,
            shared,
            runner,
            policy,
        })
    }

    /// The device's configuration.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Whether a front-end is connected.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    /// The device's shared state (stats, engine).
    pub fn shared(&self) -> &Arc<DeviceShared> {
        &self.shared
    }

    /// Disconnects the front-end (in-flight I/O completes first), stops listening and removes
    /// the socket; a tiered disk's metadata is then marked clean.
    pub fn stop(self) {
        if let Some((thread, stop)) = self.policy {
            let _ = stop.write(1);
            if thread.join().is_err() {
                log::error!("{}: tier policy thread panicked", self.config.id);
            }
        }
        self.runner.stop();
        if let Some(tier) = &self.shared.tier {
            if let Err(e) = tier.close() {
                log::error!(
                    "{}: cannot mark the tier metadata clean: {e}",
                    self.config.id
                );
            }
        }
    }
}
