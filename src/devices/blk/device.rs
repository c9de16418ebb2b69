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

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::config::{BackingSpec, BlkConfig, ColdSpec};
use super::info::{BlkInfo, BlkStats, BlkTotals};
use super::request::Limits;
use super::shared::DeviceShared;
use crate::devices::shell::runner::{DeviceRunner, RunnerError};
use crate::storage::backing::{open_backing, open_log, BackingError, OpenRequest};
use crate::storage::image_lock::ImageLock;
use crate::storage::rbd::image::RbdImage;
use crate::storage::rbd::objects::ObjectStore;
use crate::storage::rbd::RbdError;
use crate::storage::tier::cold::ColdTier;
use crate::storage::tier::store::{journal_path, TierError, TierStore};
use crate::storage::EngineSource;
use crate::sys::poll::wait_readable_for;
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
    /// `tier-cold` names a file (or objects) with data that no journal of this disk describes.
    #[error(
        "{0} holds data but is not this disk's cold tier (no tier journal); refusing to reuse it"
    )]
    ForeignColdFile(String),
    /// A RADOS cold tier needs its journal beside a hot file.
    #[error("a rados: cold tier needs a hot tier that is a file (its journal goes beside it)")]
    RadosNeedsHotFile,
    /// The tier policy thread could not start.
    #[error("cannot start the tier policy thread")]
    Policy(#[source] std::io::Error),
    /// The socket or its thread could not be set up.
    #[error(transparent)]
    Runner(#[from] RunnerError),
    /// The RBD image could not be opened or resized.
    #[error(transparent)]
    Rbd(#[from] RbdError),
    /// A resize this disk cannot take.
    #[error("{0}")]
    Resize(String),
    /// Growing the backing file failed.
    #[error("cannot grow the backing file")]
    Grow(#[source] std::io::Error),
}

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
                store.fence_if_lost();
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
        let mut rbd = None;
        let (file, capacity) = match &config.backing {
            BackingSpec::Null => (None, config.size.unwrap_or(0)),
            BackingSpec::Rbd(spec) => {
                let image = RbdImage::open(spec, config.readonly)?;
                let size = image.size()?;
                rbd = Some(Arc::new(image));
                (None, size)
            }
            BackingSpec::File(path) => {
                let backing = open_backing(&OpenRequest {
                    path,
                    size: config.size,
                    readonly: config.readonly,
                    direct: config.direct,
                    lock: !config.incoming,
                })?;
                if config.incoming {
                    log::info!(
                        "{}: incoming migration: {} is taken when the front-end starts",
                        config.id,
                        path.display()
                    );
                }
                (Some(Arc::new(backing.file)), backing.size)
            }
        };
        let tier = match (&config.tier, &file) {
            (Some(spec), Some(hot)) => {
                let hot_path = match &config.backing {
                    BackingSpec::File(path) => path.clone(),
                    BackingSpec::Null | BackingSpec::Rbd(_) => PathBuf::new(),
                };
                let (cold, journal, cold_name) = open_cold(&spec.cold, &hot_path, config.incoming)?;
                if !config.incoming {
                    adopt_legacy_journal(&hot_path, &journal);
                    // A cold tier with data but no journal of ours is someone else's: the
                    // start-up check would free every record the (empty) journal does not
                    // name. Refuse it instead.
                    let holds_data = cold.end().map_err(|e| {
                        DeviceError::Tier(TierError::Io {
                            action: "cannot list the cold tier",
                            source: e,
                        })
                    })? > 0;
                    if holds_data && !journal.exists() {
                        return Err(DeviceError::ForeignColdFile(cold_name));
                    }
                }
                let (hot, extent, level) = (Arc::clone(hot), spec.extent_size, spec.zstd_level);
                // An incoming migration's source serves (and moves) it now: touch nothing
                // until the image is ours (`storage::tier::handover`).
                let store = if config.incoming {
                    TierStore::open_inactive(hot, &journal, cold, capacity, extent, level)
                } else {
                    TierStore::open(hot, &journal, cold, capacity, extent, level)?
                };
                Some(Arc::new(store))
            }
            _ => None,
        };
        let engine = config.engine.available();
        if engine != config.engine && file.is_some() {
            log::warn!(
                "{}: io_uring unavailable, falling back to the sync engine",
                config.id
            );
        }
        let limits = Limits {
            capacity: capacity & !511,
            readonly: config.readonly,
        };
        let volatile = (crate::storage::volatile::enabled()
            && !config.direct
            && config.tier.is_none())
        .then(|| {
            log::warn!(
                "{}: test mode: modelling a volatile write cache ({})",
                config.id,
                crate::storage::volatile::ENV
            );
            crate::storage::volatile::Cache::default()
        });
        let image = file.as_ref().map(|file| {
            Arc::new(ImageLock::new(
                Arc::clone(file),
                config.readonly,
                !config.incoming,
                tier.clone(),
            ))
        });
        let source = EngineSource {
            kind: file.is_some().then_some(engine),
            file,
            tier,
            volatile,
            rbd,
        };
        let shared = Arc::new(DeviceShared {
            direct_align: config
                .direct
                .then(|| usize::try_from(config.logical_block_size).unwrap_or(4096)),
            serial: config.serial.clone(),
            logical_block_size: config.logical_block_size,
            poll: config.poll,
            memory_max: config.memory_max,
            image,
            ..DeviceShared::new(&config.id, config.queues, config.queue_size, limits, source)
        });
        if let Err(e) = shared.set_qos(&config.qos) {
            // Validated when the options were parsed; unreachable unless that changes.
            log::error!("{}: rate limits ignored: {e}", config.id);
        }
        let runner = DeviceRunner::start(
            &config.socket,
            Arc::clone(&shared.connected),
            Arc::clone(&shared),
        )?;
        log::info!(
            "{}: serving {} ({} bytes, {} queue(s), engine {}) on {}",
            config.id,
            config.backing.display(),
            capacity,
            config.queues,
            shared.engine_name(),
            config.socket.display()
        );
        let policy = match (shared.tier(), &config.tier) {
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

    /// A copy of the listening socket for a live upgrade's successor (see `DeviceRunner`).
    pub fn hand_over(&self) -> std::io::Result<(std::path::PathBuf, std::os::fd::OwnedFd)> {
        self.runner.hand_over()
    }

    /// A successor takes over: the socket's path is its now.
    pub fn keep_socket(&self) {
        self.runner.keep_socket();
    }

    /// Whether a front-end is connected.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    /// The device's shared state (stats, engine).
    pub fn shared(&self) -> &Arc<DeviceShared> {
        &self.shared
    }

    /// Grows the disk to `size` bytes (a multiple of the logical block size) and tells the
    /// guest through its front-end. Shrinking is refused: the guest may have data there.
    /// RBD images, plain image files and the null device can grow; block devices, tiered
    /// and read-only disks cannot.
    pub fn resize(&self, size: u64) -> Result<(), DeviceError> {
        let refuse = |why: &str| Err(DeviceError::Resize(format!("{}: {why}", self.config.id)));
        let current = self.shared.capacity();
        if size < current {
            return refuse("shrinking a disk under a guest is refused");
        }
        if size.checked_rem(u64::from(self.config.logical_block_size)) != Some(0) {
            return refuse("the size must be a multiple of the logical block size");
        }
        if self.config.readonly || self.config.tier.is_some() {
            return refuse("read-only and tiered disks cannot be resized");
        }
        // Checked against the backing's own size too: another client (a migration peer,
        // an administrator) may have grown it beyond what this device knows.
        match (&self.config.backing, &self.shared.engine) {
            (
                BackingSpec::Rbd(_),
                EngineSource {
                    rbd: Some(image), ..
                },
            ) => {
                if size < image.size()? {
                    return refuse("the image is already larger");
                }
                image.grow(size)?;
            }
            (
                BackingSpec::File(_),
                EngineSource {
                    file: Some(file), ..
                },
            ) => {
                let metadata = file.metadata().map_err(DeviceError::Grow)?;
                if !metadata.file_type().is_file() {
                    return refuse("a block device's size is the device's own");
                }
                if size < metadata.len() {
                    return refuse("the image file is already larger");
                }
                file.set_len(size).map_err(DeviceError::Grow)?;
                file.sync_all().map_err(DeviceError::Grow)?;
            }
            _ => {}
        }
        if !self.shared.set_capacity(size) {
            log::info!(
                "{}: no front-end channel; the guest sees {size} bytes at its next start",
                self.config.id
            );
        }
        Ok(())
    }

    /// The device's description.
    pub fn info(&self) -> BlkInfo {
        let config = &self.config;
        let shared = &self.shared;
        BlkInfo {
            id: config.id.clone(),
            socket: config.socket.clone(),
            path: config.backing.display(),
            size: shared.capacity(),
            readonly: config.readonly,
            direct: config.direct,
            queues: config.queues,
            queue_size: config.queue_size,
            serial: config.serial.clone(),
            engine: shared.engine_name(),
            logical_block_size: config.logical_block_size,
            poll_us: u32::try_from(config.poll.max.as_micros()).unwrap_or(u32::MAX),
            connected: self.is_connected(),
            flush_failed: shared.flush_failed.load(Ordering::Acquire),
        }
    }

    /// The device's counters.
    pub fn stats(&self) -> BlkStats {
        let queues = self.shared.stats();
        BlkStats {
            id: self.config.id.clone(),
            connected: self.is_connected(),
            total: BlkTotals::of(&queues),
            queues,
        }
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
        if let Some(tier) = self.shared.tier() {
            if let Err(e) = tier.close() {
                log::error!(
                    "{}: cannot mark the tier metadata clean: {e}",
                    self.config.id
                );
            }
        }
    }
}

/// Opens a tiered disk's cold tier; returns it, its journal's path and its name for errors.
fn open_cold(
    spec: &ColdSpec,
    hot: &std::path::Path,
    incoming: bool,
) -> Result<(ColdTier, PathBuf, String), DeviceError> {
    match spec {
        ColdSpec::File(path) => {
            let cold = open_log(path, !incoming)?;
            Ok((
                ColdTier::File(cold),
                journal_path(hot, path),
                path.display().to_string(),
            ))
        }
        ColdSpec::Rados(objects) => {
            if !std::fs::metadata(hot).is_ok_and(|m| m.is_file()) {
                return Err(DeviceError::RadosNeedsHotFile);
            }
            let store = ObjectStore::open(objects, hot)?;
            Ok((
                ColdTier::Rados(store),
                journal_path(hot, hot),
                objects.display(),
            ))
        }
    }
}

/// Before this release a tier whose hot side is a block device kept its journal beside the
/// device (`/dev/sdX.tiermap`, on devtmpfs: gone at reboot). If that journal is still there
/// and the new place (beside the cold file) is empty, it moves.
fn adopt_legacy_journal(hot: &std::path::Path, journal: &std::path::Path) {
    let mut legacy = hot.as_os_str().to_os_string();
    legacy.push(".tiermap");
    let legacy = PathBuf::from(legacy);
    // Anything at the journal's place, a link included, stays; only a regular file moves,
    // read without following a link or waiting on a FIFO.
    if legacy == journal || journal.symlink_metadata().is_ok() {
        return;
    }
    match crate::sys::private_file::copy_into_new(&legacy, journal) {
        Ok(false) => {}
        Ok(true) => {
            let _ = std::fs::remove_file(&legacy);
            log::info!(
                "tier journal moved from {} to {}",
                legacy.display(),
                journal.display()
            );
        }
        Err(e) => log::error!(
            "cannot move the tier journal {} to {}: {e}",
            legacy.display(),
            journal.display()
        ),
    }
}
