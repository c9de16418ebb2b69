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
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::{completion_event_id, throttle_event_id, BlkBackend};
use super::config::{BackingSpec, BlkConfig, EngineKind};
use super::request::Limits;
use super::spec::{ConfigSpace, MAX_IOVECS, SECTOR_SHIFT};
use super::stats::{QueueSnapshot, QueueStats};
use super::throttle::now_ns;
use crate::lock::lock;
use crate::qos::config::QosConfig;
use crate::qos::device::DeviceQos;
use crate::qos::group::SharedLimiter;
use crate::qos::limiter::LimitError;
use crate::storage::backing::{open_backing, BackingError, OpenRequest};
use crate::storage::null::NullEngine;
use crate::storage::sync::SyncEngine;
use crate::storage::uring::UringEngine;
use crate::storage::{uring_available, Engine, EngineError};
use crate::sys::poll::{wait_readable, Readable};

/// Errors starting a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The backing could not be opened.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// The socket could not be created.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The device thread could not be started.
    #[error("cannot start the device thread")]
    Thread(#[source] std::io::Error),
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
    pub connected: AtomicBool,
    /// The device's rate limits (own and group), shared by its queues.
    pub qos: Mutex<DeviceQos>,
    /// Fast path: false when nothing limits the device (`qos` is never locked then).
    pub qos_enabled: AtomicBool,
    /// This device's identity inside QoS groups.
    pub member_id: u64,
    file: Option<Arc<File>>,
    engine: EngineKind,
    stats: Vec<Arc<QueueStats>>,
}

impl DeviceShared {
    /// A new engine for one queue worker.
    pub fn new_engine(&self) -> Result<Box<dyn Engine>, EngineError> {
        let Some(file) = &self.file else {
            return Ok(Box::new(NullEngine::default()));
        };
        Ok(match self.engine {
            EngineKind::Uring => {
                let entries = u32::from(self.queue_size).saturating_mul(2);
                Box::new(UringEngine::new(Arc::clone(file), entries)?)
            }
            EngineKind::Sync => Box::new(SyncEngine::new(Arc::clone(file))),
        })
    }

    /// Replaces the rate limits; takes effect for the next request on every queue.
    pub fn set_qos(&self, config: &QosConfig) -> Result<(), LimitError> {
        let mut qos = lock(&self.qos);
        qos.set_limits(config, now_ns())?;
        self.qos_enabled.store(qos.is_limited(), Ordering::Release);
        Ok(())
    }

    /// Joins `group` (or leaves the current one with `None`).
    pub fn set_group(&self, group: Option<Arc<SharedLimiter>>) {
        let mut qos = lock(&self.qos);
        qos.set_group(group, self.member_id);
        self.qos_enabled.store(qos.is_limited(), Ordering::Release);
    }

    /// The device's own current tokens, by limit name.
    pub fn qos_tokens(&self) -> Vec<(String, i64)> {
        lock(&self.qos).tokens(now_ns())
    }

    /// The current rate-limit settings.
    pub fn qos_config(&self) -> QosConfig {
        lock(&self.qos).config().clone()
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

/// A process-wide unique id for each device, for QoS group membership.
fn next_member_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Wakes the device thread and the connected front-end's handler for shutdown.
struct StopSignal {
    requested: AtomicBool,
    eventfd: EventFd,
    connection: Mutex<Option<vhost_user_backend::ShutdownHandle>>,
}

/// A running block device.
pub struct BlkDevice {
    config: BlkConfig,
    shared: Arc<DeviceShared>,
    stop: Arc<StopSignal>,
    thread: Option<JoinHandle<()>>,
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
            connected: AtomicBool::new(false),
            qos: Mutex::new(DeviceQos::default()),
            qos_enabled: AtomicBool::new(false),
            member_id: next_member_id(),
            file,
            engine,
            stats: (0..config.queues).map(|_| Arc::default()).collect(),
        });
        if let Err(e) = shared.set_qos(&config.qos) {
            // Validated when the options were parsed; unreachable unless that changes.
            log::error!("{}: rate limits ignored: {e}", config.id);
        }
        let listen_error = |source| DeviceError::Listen {
            path: config.socket.clone(),
            source,
        };
        if let Some(parent) = config.socket.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(listen_error)?;
        }
        let listener = Listener::new(&config.socket, true)
            .map_err(|e| listen_error(std::io::Error::other(e)))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| listen_error(std::io::Error::other(e)))?;
        let stop = Arc::new(StopSignal {
            requested: AtomicBool::new(false),
            eventfd: EventFd::new(EFD_NONBLOCK).map_err(DeviceError::Thread)?,
            connection: Mutex::new(None),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name(format!("blk-{}", config.id))
                .spawn(move || serve(shared, listener, stop))
                .map_err(DeviceError::Thread)?
        };
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
        Ok(Self {
            config,
            shared,
            stop,
            thread: Some(thread),
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
    /// the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.requested.store(true, Ordering::Release);
        if let Err(e) = self.stop.eventfd.write(1) {
            log::warn!("{}: cannot wake device thread: {e}", self.config.id);
        }
        if let Some(handle) = lock(&self.stop.connection).as_ref() {
            handle.shutdown();
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("{}: device thread panicked", self.config.id);
            }
        }
        let _ = std::fs::remove_file(&self.config.socket);
    }
}

impl Drop for BlkDevice {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

/// The device thread: accept a front-end, serve it until it leaves, repeat until stopped.
fn serve(shared: Arc<DeviceShared>, mut listener: Listener, stop: Arc<StopSignal>) {
    let id = shared.id.clone();
    loop {
        match wait_readable(listener.as_raw_fd(), stop.eventfd.as_raw_fd()) {
            Ok(Readable::First) => {}
            Ok(Readable::Second) => break,
            Err(e) => {
                log::error!("{id}: waiting for a front-end failed: {e}");
                break;
            }
        }
        if stop.requested.load(Ordering::Acquire) {
            break;
        }
        if let Err(e) = serve_connection(&shared, &mut listener, &stop) {
            log::error!("{id}: connection ended with an error: {e}");
        }
    }
    log::info!("{id}: stopped");
}

fn serve_connection(
    shared: &Arc<DeviceShared>,
    listener: &mut Listener,
    stop: &StopSignal,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let memory = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
    let backend = Arc::new(BlkBackend::new(Arc::clone(shared), memory.clone())?);
    let mut daemon = VhostUserDaemon::new(shared.id.clone(), Arc::clone(&backend), memory)
        .map_err(|e| format!("{e}"))?;
    let event_id = completion_event_id(shared.queues);
    let handlers = daemon.get_epoll_handlers();
    for (handler, fd) in handlers.iter().zip(backend.completion_fds()) {
        if let Some(fd) = fd {
            register(handler, fd, event_id)?;
        }
    }
    for (handler, fd) in handlers.iter().zip(backend.throttle_fds()) {
        register(handler, fd, throttle_event_id(shared.queues))?;
    }
    daemon.start(listener).map_err(|e| format!("{e}"))?;
    *lock(&stop.connection) = daemon.shutdown_handle();
    if stop.requested.load(Ordering::Acquire) {
        daemon.request_shutdown();
    }
    log::info!("{}: front-end connected", shared.id);
    shared.connected.store(true, Ordering::Release);
    let result = daemon.wait();
    shared.connected.store(false, Ordering::Release);
    *lock(&stop.connection) = None;
    backend.signal_exit();
    // Dropping the daemon joins its worker threads; dropping the last backend reference then
    // drains every engine, so no kernel I/O outlives the guest memory mapping.
    drop(daemon);
    drop(backend);
    log::info!("{}: front-end disconnected", shared.id);
    match result {
        // A front-end going away (guest shutdown, QEMU killed) is the normal end of a session.
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(format!("{e}").into()),
    }
}

fn register(
    handler: &vhost_user_backend::VringEpollHandler<Arc<BlkBackend>>,
    fd: RawFd,
    event_id: u64,
) -> Result<(), std::io::Error> {
    handler.register_listener(fd, EventSet::IN, event_id)
}
