//! What a net device supplies to the vhost-user shell: [`Device`] for its shared state
//! (features, config space, one worker per queue pair over a tap queue or the switch port)
//! and [`Worker`] for the pair worker. Thin on purpose; the data path lives in `worker`,
//! `frame`, `rx` and `fabric`.
//!
//! Queue `2i` is pair i's rx queue, `2i+1` its tx queue; each pair has its own thread.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::os::fd::RawFd;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use super::rx::RxTarget;
use super::shared::NetShared;
use super::spec;
use super::worker::{PairBackend, PairWorker};
use crate::devices::shell::{Device, Event, Pass, SetupError, Worker, WorkerFd};
use crate::ring::dirty::DirtyLog;
use crate::vring::{AtomicGuestMemory, CheckedVring};

impl Device for NetShared {
    type Worker = PairWorker;

    fn id(&self) -> &str {
        &self.config.id
    }

    fn workers(&self) -> usize {
        usize::from(self.config.queue_pairs)
    }

    fn queues_per_worker(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> u16 {
        self.config.queue_size
    }

    fn memory_max(&self) -> u64 {
        self.config.memory_max
    }

    fn features(&self) -> u64 {
        spec::device_features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::RARP
    }

    fn announce(&self, mac: [u8; 6]) {
        NetShared::announce(self, mac);
    }

    fn acked_features(&self, features: u64) {
        self.set_acked_features(features);
    }

    fn config_space(&self) -> Vec<u8> {
        NetShared::config_space(self).to_bytes().to_vec()
    }

    /// Takes the device's tap queues, or connects its switch port's receive side.
    fn connect(
        self: &Arc<Self>,
        memory: AtomicGuestMemory,
        log: Arc<DirtyLog>,
    ) -> Result<Vec<Option<PairWorker>>, SetupError> {
        let rx_target = self.switch_port().map(|_| {
            Arc::new(RxTarget::new(
                memory.clone(),
                self.acked_features_cell(),
                Arc::clone(&log),
            ))
        });
        let mut workers = Vec::with_capacity(usize::from(self.config.queue_pairs));
        for pair in 0..self.config.queue_pairs {
            let backend = match (&rx_target, self.switch_port()) {
                (Some(rx), Some((hub, port))) => Some(PairBackend::Switch {
                    hub,
                    port,
                    rx: Arc::clone(rx),
                }),
                _ => self.take_tap(pair).map(PairBackend::Tap),
            };
            let worker = match backend {
                Some(backend) => Some(PairWorker::new(
                    pair,
                    Arc::clone(self),
                    memory.clone(),
                    Arc::clone(&log),
                    backend,
                )?),
                None => None,
            };
            workers.push(worker);
        }
        if let Some(rx) = rx_target {
            self.connect_port(Some(rx));
        }
        Ok(workers)
    }

    fn vrings_created(&self, vrings: &[CheckedVring]) {
        // Queue 2i is pair i's rx queue; senders on other threads need them from the start.
        if let Some(target) = self.port_target() {
            target.set_queues(vrings.iter().step_by(2).cloned().collect());
        }
    }

    fn backend_channel(&self, channel: std::os::unix::net::UnixStream) {
        self.set_backend_channel(Some(channel));
    }

    /// Hands the tap queues back for the next front-end and stops senders from writing into
    /// this connection's rings.
    fn disconnected(&self, workers: Vec<PairWorker>) {
        for worker in workers {
            let pair = worker.pair();
            if let Some(tap) = worker.into_tap() {
                self.return_tap(pair, tap);
            }
        }
        self.connect_port(None);
        self.set_backend_channel(None);
    }
}

impl Worker for PairWorker {
    fn handle(&mut self, event: Event, vrings: &[CheckedVring]) -> Result<(), SetupError> {
        let (Some(rx), Some(tx)) = (vrings.first(), vrings.get(1)) else {
            return Ok(());
        };
        match event {
            Event::Queue(0) => self.process_rx_kick(rx)?,
            Event::Queue(_) => self.process_tx(tx)?,
            Event::Fd(WorkerFd::Tap) => self.process_tap(rx)?,
            Event::Fd(WorkerFd::QosTimer) => self.process_timer(rx, tx)?,
            Event::Fd(WorkerFd::Repoll) => self.process_repoll(tx)?,
            Event::Fd(WorkerFd::Completion) => {}
        }
        Ok(())
    }

    fn fds(&self) -> Vec<(WorkerFd, RawFd)> {
        let mut fds = vec![
            (WorkerFd::QosTimer, self.timer_fd()),
            (WorkerFd::Repoll, self.repoll_fd()),
        ];
        if let Some(fd) = self.tap_poll_fd() {
            fds.push((WorkerFd::Tap, fd));
        }
        fds
    }

    fn wants_group(&mut self, vrings: &[CheckedVring]) -> bool {
        vrings
            .get(1)
            .is_some_and(|tx| PairWorker::wants_group(self, tx))
    }

    fn joined_group(&mut self) {
        PairWorker::joined_group(self);
    }

    fn group_pass(&mut self, vrings: &[CheckedVring]) -> Pass {
        match vrings.get(1) {
            Some(tx) => PairWorker::group_pass(self, tx),
            None => Pass::Leave,
        }
    }

    fn stop_queue(&mut self, position: usize) {
        PairWorker::stop_queue(self, position);
        // Nothing to drain: nothing is in flight between calls. Tx chains are returned to the
        // used ring before `handle` returns, and rx chains are taken and committed (or put
        // back) within one call; switch senders check the ring is ready under its lock.
    }
}
