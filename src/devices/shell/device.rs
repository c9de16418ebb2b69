//! What a device kind supplies to the shared vhost-user shell: a [`Device`] (features, config
//! space, how to build a connection's workers) and its [`Worker`]s (one per worker thread,
//! each serving a fixed set of queues and watching its own fds, named by [`WorkerFd`]).
//!
//! A new device kind (virtio-scsi, vsock, fs) implements these two traits in its own
//! `devices/<kind>/` directory; [`super::backend::DeviceBackend`] turns them into a
//! `VhostUserBackend`, and [`super::runner::DeviceRunner`] serves its socket.
//!
//! Event ids are the core's business alone: `vhost-user-backend` reserves `0..n` for the
//! queues of a thread (by position in the thread) and `n` (the device's queue count) for the
//! exit event; the core puts each [`WorkerFd`] at `n + 1 + kind` and hands workers typed
//! [`Event`]s, never numbers.

use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use super::group::Pass;
use crate::ring::dirty::DirtyLog;
use crate::vring::{AtomicGuestMemory, CheckedVring};

/// The kinds of fds a worker thread watches besides its queues' kick fds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerFd {
    /// An I/O engine's completion eventfd.
    Completion,
    /// The QoS timer (tokens are back).
    QosTimer,
    /// A tap device (readable, or its link changed).
    Tap,
    /// The worker's own "call me again" eventfd (busy polling yields to its event loop
    /// between spells and is woken at once through it).
    Repoll,
}

impl WorkerFd {
    /// Every kind, in event-id order.
    pub const ALL: [WorkerFd; 4] = [
        WorkerFd::Completion,
        WorkerFd::QosTimer,
        WorkerFd::Tap,
        WorkerFd::Repoll,
    ];

    /// The event id of this kind in a device with `num_queues` queues.
    pub fn event_id(self, num_queues: usize) -> u64 {
        let kind = match self {
            WorkerFd::Completion => 0u64,
            WorkerFd::QosTimer => 1,
            WorkerFd::Tap => 2,
            WorkerFd::Repoll => 3,
        };
        u64::try_from(num_queues)
            .unwrap_or(u64::MAX)
            .saturating_add(1)
            .saturating_add(kind)
    }

    /// The kind behind event id `id` in a device with `num_queues` queues.
    pub fn from_event_id(id: u64, num_queues: usize) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.event_id(num_queues) == id)
    }
}

/// What woke a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A kick on the worker's queue at this position (in the worker's own queue list).
    Queue(usize),
    /// One of the worker's own fds.
    Fd(WorkerFd),
}

/// Errors a device returns to the shell; they end the connection being set up.
pub type SetupError = Box<dyn std::error::Error + Send + Sync>;

/// Serves the queues of one worker thread for one connection.
pub trait Worker: Send + 'static {
    /// Handles one event. `vrings` are the worker's own queues, in queue order. An error is
    /// logged by the shell and the thread keeps serving (a broken ring is the guest's doing).
    fn handle(&mut self, event: Event, vrings: &[CheckedVring]) -> Result<(), SetupError>;

    /// The fds this worker's thread watches, by kind.
    fn fds(&self) -> Vec<(WorkerFd, RawFd)>;

    /// The front-end stops the worker's queue at `position` (GET_VRING_BASE): nothing may be
    /// written into that ring afterwards, so finish what is in flight.
    fn stop_queue(&mut self, _position: usize) {}

    /// Whether the busy-poll group ([`super::group`]) should poll this worker's queues
    /// (`vrings`) from now on: busy mode, not a member yet, and its queue started. Asked
    /// after each event, under the worker's lock.
    fn wants_group(&mut self, _vrings: &[CheckedVring]) -> bool {
        false
    }

    /// The group polls this worker now: leave notifications off and stop spinning alone.
    fn joined_group(&mut self) {}

    /// One pass for the busy-poll group: serve what the queues hold, without spinning or
    /// waiting for work (it takes the short ring and switch locks a delivery takes). It
    /// touches no queue that is stopped, disabled or refused. [`Pass::Leave`] hands a
    /// started queue back to kicks (notifications on, and the worker's own thread woken if
    /// work is already waiting).
    fn group_pass(&mut self, _vrings: &[CheckedVring]) -> Pass {
        Pass::Leave
    }
}

/// A device kind, as the vhost-user shell sees it.
pub trait Device: Send + Sync + 'static {
    /// The per-thread worker.
    type Worker: Worker;

    /// Device id, for logs.
    fn id(&self) -> &str;

    /// Worker threads per connection.
    fn workers(&self) -> usize;

    /// Queues each worker serves (consecutive: worker `w` serves queues
    /// `w·k .. w·k + k`).
    fn queues_per_worker(&self) -> usize;

    /// Largest queue size a front-end may set.
    fn max_queue_size(&self) -> u16;

    /// Most guest memory, in bytes, a front-end may have mapped for this device (`mem-max`).
    fn memory_max(&self) -> u64;

    /// Virtio feature bits offered (VHOST_USER_F_PROTOCOL_FEATURES included).
    fn features(&self) -> u64;

    /// vhost-user protocol features offered.
    fn protocol_features(&self) -> VhostUserProtocolFeatures;

    /// The front-end acked `features`.
    fn acked_features(&self, _features: u64) {}

    /// The whole config space as it reads now.
    fn config_space(&self) -> Vec<u8>;

    /// Builds a new connection's workers (`None`: a worker slot with nothing to serve).
    /// Every write they make into guest memory is marked in `log` while it is on
    /// (`ring::dirty`).
    fn connect(
        self: &Arc<Self>,
        memory: AtomicGuestMemory,
        log: Arc<DirtyLog>,
    ) -> Result<Vec<Option<Self::Worker>>, SetupError>;

    /// The front-end switched dirty logging on (a live migration started) or off.
    fn logging(&self, _on: bool) {}

    /// The front-end asks us to announce the guest's MAC (`VHOST_USER_SEND_RARP`, after a
    /// live migration; only offered by NICs).
    fn announce(&self, _mac: [u8; 6]) {}

    /// The connection's vrings, in queue order, as soon as they exist (before any message).
    fn vrings_created(&self, _vrings: &[CheckedVring]) {}

    /// The front-end set up the backend-request channel (a duplicate of its socket).
    fn backend_channel(&self, _channel: UnixStream) {}

    /// Where the front-end's inflight region goes, for a device that tracks requests in
    /// flight across restarts (`INFLIGHT_SHMFD`); `None` (the default) for the others.
    fn inflight_slot(&self) -> Option<&super::inflight::InflightSlot> {
        None
    }

    /// The connection ended; its workers (already stopped) are handed back.
    fn disconnected(&self, _workers: Vec<Self::Worker>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_round_trip_and_stay_clear_of_queues_and_exit() {
        for queues in [1usize, 2, 8, 64] {
            for kind in WorkerFd::ALL {
                let id = kind.event_id(queues);
                assert!(id > queues as u64, "{kind:?} collides with a queue or exit");
                assert_eq!(WorkerFd::from_event_id(id, queues), Some(kind));
            }
            assert_eq!(WorkerFd::from_event_id(queues as u64, queues), None);
            assert_eq!(WorkerFd::from_event_id(0, queues), None);
        }
    }
}
