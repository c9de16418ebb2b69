//! The vhost-user face of a net device: features, config space, and event dispatch to the
//! queue-pair workers. Thin on purpose; the data path lives in `worker`, `frame`, `rx` and
//! `fabric`.
//!
//! Queue `2i` is pair i's rx queue, `2i+1` its tx queue; each pair has its own thread (from
//! `vhost-user-backend`) and its own [`PairWorker`]. In each thread's event loop, id 0 is the
//! rx queue, 1 the tx queue, `2·pairs` the exit event, `2·pairs + 1` the tap and
//! `2·pairs + 2` the QoS timer.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::VhostUserBackend;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::devices::runner::ExitEvents;

use super::device::NetShared;
use super::fabric::RxTarget;
use super::spec;
use super::worker::{PairBackend, PairWorker};
use crate::lock::lock;
use crate::vring::{AtomicGuestMemory, CheckedVring};

/// Errors setting up a connection's backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// An exit eventfd could not be created.
    #[error("cannot create an exit event")]
    ExitEvent(#[source] std::io::Error),
    /// A worker could not be set up.
    #[error(transparent)]
    Worker(#[from] super::worker::WorkerError),
}

/// The vhost-user backend of one net device connection.
pub struct NetBackend {
    shared: Arc<NetShared>,
    workers: Vec<Mutex<Option<PairWorker>>>,
    exit_events: ExitEvents,
    rx_target: Option<Arc<RxTarget>>,
}

impl NetBackend {
    /// Builds the workers for a new connection (taking the device's tap queues, or
    /// connecting its switch port's receive side).
    pub fn new(shared: Arc<NetShared>, memory: AtomicGuestMemory) -> Result<Self, BackendError> {
        let pairs = shared.config.queue_pairs;
        let mut workers = Vec::with_capacity(usize::from(pairs));
        let rx_target = shared
            .switch_port()
            .map(|_| Arc::new(RxTarget::new(memory.clone(), shared.acked_features_cell())));
        for pair in 0..pairs {
            let backend = match (&rx_target, shared.switch_port()) {
                (Some(rx), Some((hub, port))) => Some(PairBackend::Switch {
                    hub,
                    port,
                    rx: Arc::clone(rx),
                }),
                _ => shared.take_tap(pair).map(PairBackend::Tap),
            };
            let worker = match backend {
                Some(backend) => Some(PairWorker::new(
                    pair,
                    Arc::clone(&shared),
                    memory.clone(),
                    backend,
                )?),
                None => None,
            };
            workers.push(Mutex::new(worker));
        }
        if let Some(rx) = &rx_target {
            shared.connect_port(Some(Arc::clone(rx)));
        }
        let exit_events = ExitEvents::new(usize::from(pairs)).map_err(BackendError::ExitEvent)?;
        Ok(Self {
            shared,
            workers,
            exit_events,
            rx_target,
        })
    }

    fn worker(&self, pair: usize) -> Option<MutexGuard<'_, Option<PairWorker>>> {
        self.workers.get(pair).map(lock)
    }

    fn tap_event_id(&self) -> u64 {
        u64::from(self.shared.config.queue_pairs)
            .saturating_mul(2)
            .saturating_add(1)
    }

    fn timer_event_id(&self) -> u64 {
        self.tap_event_id().saturating_add(1)
    }
}

impl Drop for NetBackend {
    fn drop(&mut self) {
        // Hand the tap queues back to the device for the next front-end, and stop senders
        // from writing into this connection's rings.
        for (pair, worker) in self.workers.iter().enumerate() {
            let worker = lock(worker).take();
            if let Some(tap) = worker.and_then(PairWorker::into_tap) {
                self.shared
                    .return_tap(u16::try_from(pair).unwrap_or(u16::MAX), tap);
            }
        }
        if self.rx_target.is_some() {
            self.shared.connect_port(None);
        }
        self.shared.set_backend_channel(None);
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = CheckedVring;

    fn num_queues(&self) -> usize {
        usize::from(self.shared.config.queue_pairs).saturating_mul(2)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.shared.config.queue_size)
    }

    fn features(&self) -> u64 {
        spec::device_features()
    }

    fn acked_features(&self, features: u64) {
        log::debug!(
            "{}: front-end acked features {features:#x}",
            self.shared.config.id
        );
        self.shared.set_acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.shared.config_space().read(offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "virtio-net config space is read-only",
        ))
    }

    fn update_memory(
        &self,
        _memory: GuestMemoryAtomic<vm_memory::GuestMemoryMmap<()>>,
    ) -> std::io::Result<()> {
        // The handler swaps the mapping inside the atomic the workers hold.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.workers.len())
            .map(|pair| 0b11u64 << pair.saturating_mul(2))
            .collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit_events.get(thread_index)
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[CheckedVring],
        thread_id: usize,
    ) -> std::io::Result<()> {
        let (Some(rx), Some(tx)) = (vrings.first(), vrings.get(1)) else {
            return Ok(());
        };
        let Some(mut guard) = self.worker(thread_id) else {
            return Ok(());
        };
        let Some(worker) = guard.as_mut() else {
            return Ok(());
        };
        let result = match u64::from(device_event) {
            0 => worker.process_rx_kick(rx),
            1 => worker.process_tx(tx),
            id if id == self.tap_event_id() => worker.process_tap(rx),
            id if id == self.timer_event_id() => worker.process_timer(rx, tx),
            other => {
                log::warn!("{}: unexpected event id {other}", self.shared.config.id);
                Ok(())
            }
        };
        // A broken ring is the guest's doing: log it and keep the thread.
        if let Err(e) = result {
            log::error!("{}: pair {thread_id}: {e}", self.shared.config.id);
        }
        Ok(())
    }
}

impl crate::devices::runner::SessionBackend for NetBackend {
    fn listeners(&self) -> Vec<(usize, std::os::fd::RawFd, u64)> {
        let (tap, timer) = (self.tap_event_id(), self.timer_event_id());
        let mut out = Vec::new();
        for (thread, worker) in self.workers.iter().enumerate() {
            if let Some(worker) = lock(worker).as_ref() {
                if let Some(fd) = worker.tap_poll_fd() {
                    out.push((thread, fd, tap));
                }
                out.push((thread, worker.timer_fd(), timer));
            }
        }
        out
    }

    fn backend_channel(&self, channel: std::os::unix::net::UnixStream) {
        self.shared.set_backend_channel(Some(channel));
    }

    fn vrings_created(&self, vrings: &[CheckedVring]) {
        // Queue 2i is pair i's rx queue.
        if let Some(target) = &self.rx_target {
            target.set_queues(vrings.iter().step_by(2).cloned().collect());
        }
    }

    fn signal_exit(&self) {
        self.exit_events.signal(&self.shared.config.id);
    }
}
