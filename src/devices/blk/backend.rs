//! What a block device supplies to the vhost-user shell: [`Device`] for its shared state
//! (features, config space, one worker and engine per queue) and [`Worker`] for the queue
//! worker (kick, engine completion and QoS timer events; drain on queue stop). Thin on
//! purpose: everything that knows virtio-blk lives in `request`, `worker` and `spec`.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::os::fd::RawFd;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use super::shared::DeviceShared;
use super::spec;
use super::worker::QueueWorker;
use crate::devices::shell::{Device, Event, SetupError, Worker, WorkerFd};
use crate::ring::dirty::DirtyLog;
use crate::vring::{AtomicGuestMemory, CheckedVring};

/// Errors setting up a connection's workers.
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
    /// A worker's own events could not be created.
    #[error(transparent)]
    Worker(#[from] super::worker::WorkerSetupError),
}

/// Test builds only: `NOVACRON_TEST_NO_INFLIGHT=1` serves without inflight tracking, to show
/// what it prevents (a crash under out-of-order completions). Release builds never read it.
fn inflight_disabled() -> bool {
    static DISABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DISABLED.get_or_init(|| {
        cfg!(feature = "test-hooks") && std::env::var_os("NOVACRON_TEST_NO_INFLIGHT").is_some()
    })
}

/// Builds the workers of a connection: one per queue, each with its own engine.
pub fn connect_workers(
    shared: &Arc<DeviceShared>,
    memory: &AtomicGuestMemory,
    log: &Arc<DirtyLog>,
) -> Result<Vec<QueueWorker>, BackendError> {
    (0..shared.queues)
        .map(|queue| {
            let engine = shared
                .new_engine()
                .map_err(|source| BackendError::Engine { queue, source })?;
            Ok(QueueWorker::new(
                queue,
                Arc::clone(shared),
                engine,
                memory.clone(),
                Arc::clone(log),
            )?)
        })
        .collect()
}

impl Device for DeviceShared {
    type Worker = QueueWorker;

    fn id(&self) -> &str {
        &self.id
    }

    fn workers(&self) -> usize {
        usize::from(self.queues)
    }

    fn queues_per_worker(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn memory_max(&self) -> u64 {
        self.memory_max
    }

    fn features(&self) -> u64 {
        spec::device_features(self.readonly)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let features = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ;
        if inflight_disabled() {
            features
        } else {
            features | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        }
    }

    fn logging(&self, on: bool) {
        if let Some(image) = &self.image {
            image.set_migrating(on);
        }
    }

    fn inflight_slot(&self) -> Option<&crate::devices::shell::inflight::InflightSlot> {
        (!inflight_disabled()).then_some(&self.inflight)
    }

    fn config_space(&self) -> Vec<u8> {
        DeviceShared::config_space(self).to_bytes().to_vec()
    }

    fn connect(
        self: &Arc<Self>,
        memory: AtomicGuestMemory,
        log: Arc<DirtyLog>,
    ) -> Result<Vec<Option<QueueWorker>>, SetupError> {
        Ok(connect_workers(self, &memory, &log)?
            .into_iter()
            .map(Some)
            .collect())
    }

    fn backend_channel(&self, channel: std::os::unix::net::UnixStream) {
        self.backend_channel.set(&self.id, Some(channel));
    }

    fn disconnected(&self, _workers: Vec<QueueWorker>) {
        self.backend_channel.set(&self.id, None);
    }
}

impl Worker for QueueWorker {
    fn handle(&mut self, event: Event, vrings: &[CheckedVring]) -> Result<(), SetupError> {
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        self.remember_vring(vring);
        match event {
            Event::Queue(_) => self.process_queue(vring)?,
            Event::Fd(WorkerFd::Completion) => self.process_completions(vring)?,
            Event::Fd(WorkerFd::QosTimer) => self.process_timer(vring)?,
            Event::Fd(WorkerFd::Repoll) => self.process_repoll(vring)?,
            Event::Fd(WorkerFd::Tap) => {}
        }
        Ok(())
    }

    fn fds(&self) -> Vec<(WorkerFd, RawFd)> {
        let mut fds = vec![
            (WorkerFd::QosTimer, self.throttle_fd()),
            (WorkerFd::Repoll, self.repoll_fd()),
        ];
        if let Some(fd) = self.completion_fd() {
            fds.push((WorkerFd::Completion, fd));
        }
        fds
    }

    fn stop_queue(&mut self, _position: usize) {
        // GET_VRING_BASE: the front-end is about to read our last_avail_idx and may reuse the
        // ring; finish everything in flight first so no completion lands in a stopped ring.
        self.drain_detached();
    }
}
