//! The vhost-user face of a block device: features, config space, and event dispatch to the
//! queue workers. Deliberately thin; everything that knows virtio-blk lives in `request`,
//! `worker` and `spec`.
//!
//! One backend object exists per front-end connection. Each queue gets its own epoll thread
//! (from `vhost-user-backend`), its own [`QueueWorker`] and its own engine; the worker's
//! mutex is only ever contended by queue-stop requests from the front-end.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::{Arc, Mutex, MutexGuard};

use crate::lock::lock;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::VhostUserBackend;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::devices::runner::ExitEvents;

use super::device::DeviceShared;
use super::spec;
use super::worker::QueueWorker;
use crate::vring::{AtomicGuestMemory, CheckedVring};

/// Errors setting up a connection's backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// An engine could not be created.
    #[error("cannot create the I/O engine for queue {queue}")]
    Engine {
        /// The queue.
        queue: u16,
        /// The cause.
        #[source]
        source: crate::storage::EngineError,
    },
    /// A QoS timer could not be created.
    #[error(transparent)]
    Throttle(#[from] super::throttle::TimerError),
    /// An exit eventfd could not be created.
    #[error("cannot create an exit event")]
    ExitEvent(#[source] std::io::Error),
}

/// The vhost-user backend of one block device connection.
pub struct BlkBackend {
    shared: Arc<DeviceShared>,
    workers: Vec<Mutex<QueueWorker>>,
    exit_events: ExitEvents,
}

/// Event id of the engine's completion eventfd in each worker thread's epoll set. Ids
/// `0..num_queues` are the queues, `num_queues` is the exit event.
pub fn completion_event_id(num_queues: u16) -> u64 {
    u64::from(num_queues) + 1
}

/// Event id of the QoS timer in each worker thread's epoll set.
pub fn throttle_event_id(num_queues: u16) -> u64 {
    u64::from(num_queues) + 2
}

impl BlkBackend {
    /// Builds the workers (one engine each) for a new connection.
    pub fn new(shared: Arc<DeviceShared>, memory: AtomicGuestMemory) -> Result<Self, BackendError> {
        let mut workers = Vec::with_capacity(usize::from(shared.queues));
        for queue in 0..shared.queues {
            let engine = shared
                .new_engine()
                .map_err(|source| BackendError::Engine { queue, source })?;
            workers.push(Mutex::new(QueueWorker::new(
                queue,
                Arc::clone(&shared),
                engine,
                memory.clone(),
            )?));
        }
        let exit_events =
            ExitEvents::new(usize::from(shared.queues)).map_err(BackendError::ExitEvent)?;
        Ok(Self {
            shared,
            workers,
            exit_events,
        })
    }

    /// The completion eventfd of each queue's worker.
    pub fn completion_fds(&self) -> Vec<Option<std::os::fd::RawFd>> {
        self.workers
            .iter()
            .map(|w| lock(w).completion_fd())
            .collect()
    }

    /// The QoS timer fd of each queue's worker.
    pub fn throttle_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.workers.iter().map(|w| lock(w).throttle_fd()).collect()
    }

    /// Tells every worker thread to leave its event loop.
    pub fn signal_exit(&self) {
        self.exit_events.signal(&self.shared.id);
    }

    /// The worker of queue `index`, if there is such a queue.
    fn worker(&self, index: usize) -> Option<MutexGuard<'_, QueueWorker>> {
        self.workers.get(index).map(lock)
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = CheckedVring;

    fn num_queues(&self) -> usize {
        usize::from(self.shared.queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.shared.queue_size)
    }

    fn features(&self) -> u64 {
        spec::device_features(self.shared.limits.readonly)
    }

    fn acked_features(&self, features: u64) {
        log::debug!("{}: front-end acked features {features:#x}", self.shared.id);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        // virtio-queue applies EVENT_IDX inside the rings; workers use the same
        // disable/enable-notification calls either way.
        log::debug!(
            "{}: EVENT_IDX {}",
            self.shared.id,
            if enabled { "on" } else { "off" }
        );
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.shared.config_space().read(offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> std::io::Result<()> {
        // No writable config fields (no CONFIG_WCE): refuse rather than pretend.
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "virtio-blk config space is read-only",
        ))
    }

    fn update_memory(
        &self,
        memory: GuestMemoryAtomic<vm_memory::GuestMemoryMmap<()>>,
    ) -> std::io::Result<()> {
        // The handler swaps the mapping inside the atomic it was created with, which is the
        // one the workers hold (`self.memory`); nothing to copy here.
        let _ = memory;
        log::debug!("{}: guest memory table updated", self.shared.id);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.workers.len()).map(|queue| 1u64 << queue).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit_events.get(thread_index)
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        // GET_VRING_BASE: the front-end is about to read our last_avail_idx and may reuse the
        // ring; finish everything in flight first so no completion lands in a stopped ring.
        let worker = usize::try_from(queue_index)
            .ok()
            .and_then(|i| self.worker(i));
        if let Some(mut worker) = worker {
            worker.drain_detached();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[CheckedVring],
        thread_id: usize,
    ) -> std::io::Result<()> {
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        let Some(mut worker) = self.worker(thread_id) else {
            return Ok(());
        };
        worker.remember_vring(vring);
        let result = match u64::from(device_event) {
            0 => worker.process_queue(vring),
            id if id == completion_event_id(self.shared.queues) => {
                worker.process_completions(vring)
            }
            id if id == throttle_event_id(self.shared.queues) => worker.process_timer(vring),
            other => {
                log::warn!("{}: unexpected event id {other}", self.shared.id);
                Ok(())
            }
        };
        // A broken ring is the guest's (or front-end's) doing: log it and keep the thread,
        // since an error here would end the queue's event loop for good.
        if let Err(e) = result {
            log::error!("{}: queue {thread_id}: {e}", self.shared.id);
        }
        Ok(())
    }
}

impl crate::devices::runner::SessionBackend for BlkBackend {
    fn listeners(&self) -> Vec<(usize, std::os::fd::RawFd, u64)> {
        let completion = completion_event_id(self.shared.queues);
        let throttle = throttle_event_id(self.shared.queues);
        let mut out = Vec::new();
        for (thread, fd) in self.completion_fds().into_iter().enumerate() {
            if let Some(fd) = fd {
                out.push((thread, fd, completion));
            }
        }
        for (thread, fd) in self.throttle_fds().into_iter().enumerate() {
            out.push((thread, fd, throttle));
        }
        out
    }

    fn signal_exit(&self) {
        BlkBackend::signal_exit(self);
    }
}
