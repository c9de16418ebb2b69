//! The one `VhostUserBackend` implementation: features, config space, memory updates, exit
//! events and event dispatch, written once for every device kind. A device supplies a
//! [`Device`] and its [`Worker`]s; this type does the vhost-user side.
//!
//! One backend object exists per front-end connection. Each worker thread (from
//! `vhost-user-backend`) owns one worker behind a mutex that only queue-stop requests from
//! the front-end's thread ever contend.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::device::{Device, Event, SetupError, Worker, WorkerFd};
use super::group::Pass;
use crate::lock::lock;
use crate::ring::dirty::{DirtyLog, VHOST_F_LOG_ALL};
use crate::vring::{AtomicGuestMemory, CheckedVring};

/// The most config bytes vhost-user lets a front-end ask for.
const VHOST_USER_CONFIG_SIZE: u32 = 0x1000;

/// The bytes a GET_CONFIG for `offset..offset+size` returns from a config space; bytes past
/// its end read as 0.
pub fn read_config_window(bytes: &[u8], offset: u32, size: u32) -> Vec<u8> {
    // vhost validates offset + size <= 4 KiB; cap here too so no front-end can make us
    // allocate more than that.
    let size = size.min(VHOST_USER_CONFIG_SIZE);
    (u64::from(offset)..u64::from(offset).saturating_add(u64::from(size)))
        .map(|i| {
            usize::try_from(i)
                .ok()
                .and_then(|i| bytes.get(i))
                .copied()
                .unwrap_or(0)
        })
        .collect()
}

/// One exit event per worker thread of a connection: `vhost-user-backend` watches each in its
/// thread's event loop and leaves the loop when it fires.
///
/// Why the handed-out fds are recorded: `vhost-user-backend` (0.24, pinned in Cargo.toml)
/// turns the consumer we hand it into a raw fd (`into_raw_fd`) for its epoll set and never
/// closes it, which leaked one eventfd per worker thread per front-end connection. We
/// remember the numbers we handed out and close them when the backend is dropped, which is
/// after every handler of the crate (each holds an `Arc` of the backend) is gone. The
/// duplicates are made up front, so handing one out cannot fail (a thread without an exit
/// event could never be stopped).
struct ExitEvents {
    notifiers: Vec<EventNotifier>,
    unclaimed: Mutex<Vec<Option<(EventConsumer, EventNotifier)>>>,
    handed_out: Mutex<Vec<RawFd>>,
}

impl ExitEvents {
    fn new(threads: usize) -> std::io::Result<Self> {
        let mut notifiers = Vec::with_capacity(threads);
        let mut unclaimed = Vec::with_capacity(threads);
        for _ in 0..threads {
            let (consumer, notifier) =
                new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
            unclaimed.push(Some((consumer, notifier.try_clone()?)));
            notifiers.push(notifier);
        }
        Ok(Self {
            notifiers,
            unclaimed: Mutex::new(unclaimed),
            handed_out: Mutex::new(Vec::new()),
        })
    }

    /// Thread `index`'s event, once.
    fn take(&self, index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = lock(&self.unclaimed).get_mut(index)?.take()?;
        lock(&self.handed_out).push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    fn signal(&self, id: &str) {
        for notifier in &self.notifiers {
            if let Err(e) = notifier.notify() {
                log::warn!("{id}: cannot signal worker exit: {e}");
            }
        }
    }
}

impl Drop for ExitEvents {
    fn drop(&mut self) {
        for fd in lock(&self.handed_out).drain(..) {
            // SAFETY: `fd` is a consumer we created and handed to vhost-user-backend, which
            // took it over with `into_raw_fd` and never closes it. Its only user, the crate's
            // epoll handler, holds an `Arc` of the backend that owns `self`, so it is gone by
            // now. Nothing else owns the number: it is closed exactly once, here.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

/// The vhost-user backend of one connection of device `D`.
pub struct DeviceBackend<D: Device> {
    device: Arc<D>,
    workers: Vec<Mutex<Option<D::Worker>>>,
    exit_events: ExitEvents,
    /// This connection's guest memory in the SIGBUS table (`sys::sigbus`).
    memory_owner: u64,
    /// The memory tables the handler installed for this connection, for the relay's memory
    /// cap (`shell::memory_cap`).
    tables: super::memory_cap::Tables,
    /// This connection's dirty-page log (live migration): mapped by the relay, switched on
    /// and off by the acked features, marked by the workers.
    log: Arc<DirtyLog>,
    /// The connection's vrings (for the used-ring mark at a queue stop, and the busy-poll
    /// group); emptied at [`DeviceBackend::close`].
    vrings: std::sync::RwLock<Vec<CheckedVring>>,
    /// This backend, for the busy-poll group's members (which must not keep it alive).
    this: std::sync::OnceLock<std::sync::Weak<Self>>,
    /// The connection ended ([`DeviceBackend::close`]).
    closed: std::sync::atomic::AtomicBool,
    /// Worker errors are the tenant's to repeat (a memory table that no longer covers a ring
    /// fails at every kick): one line a second.
    error_log: crate::log_limit::SharedLogLimiter,
}

impl<D: Device> DeviceBackend<D> {
    /// Builds the workers of a new connection over its guest memory.
    pub fn new(device: Arc<D>, memory: AtomicGuestMemory) -> Result<Self, SetupError> {
        // Exit events first: once `connect` has taken resources (taps), only our `Drop`
        // gives them back.
        let exit_events = ExitEvents::new(device.workers())?;
        let log = Arc::new(DirtyLog::default());
        let mut workers: Vec<_> = device
            .connect(memory, Arc::clone(&log))?
            .into_iter()
            .map(Mutex::new)
            .collect();
        // Exactly one slot per worker thread, whatever the device returned.
        workers.resize_with(device.workers(), || Mutex::new(None));
        Ok(Self {
            device,
            workers,
            exit_events,
            memory_owner: crate::sys::sigbus::new_owner(),
            tables: super::memory_cap::Tables::default(),
            log,
            vrings: std::sync::RwLock::new(Vec::new()),
            this: std::sync::OnceLock::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
            error_log: crate::log_limit::SharedLogLimiter::default(),
        })
    }

    /// Ends the connection, on the caller's thread: the workers (stopped, or taken from the
    /// busy-poll group between two passes) go back to the device, which may hand their taps
    /// and switch port to the next connection at once. Whoever still holds the backend (a
    /// group member in the middle of a pass) finds it closed and leaves; dropping it later
    /// releases nothing the next connection needs. Idempotent; `Drop` calls it too.
    pub fn close(&self) {
        if self.closed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        // Whatever this front-end was doing, the next one starts without a migration.
        self.device.logging(false);
        let workers = self.workers.iter().filter_map(|w| lock(w).take()).collect();
        self.device.disconnected(workers);
        // The vrings hold the guest memory: unmapped here, not on whichever thread drops the
        // last reference to the backend.
        std::mem::take(&mut *self.vrings_mut());
        let faults = crate::sys::sigbus::faults(self.memory_owner);
        crate::sys::sigbus::unregister(self.memory_owner);
        if faults > 0 {
            log::warn!(
                "{}: the front-end shrank its guest memory files under us: {faults} access(es) \
                 past their end read zeros instead of ending the daemon",
                self.device.id()
            );
        }
        let beyond = self.log.beyond();
        if beyond > 0 {
            log::warn!(
                "{}: the front-end's dirty log was smaller than guest memory: {beyond} write(s) \
                 could not be logged (a migration may have missed those pages)",
                self.device.id()
            );
        }
    }

    fn vrings(&self) -> std::sync::RwLockReadGuard<'_, Vec<CheckedVring>> {
        self.vrings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn vrings_mut(&self) -> std::sync::RwLockWriteGuard<'_, Vec<CheckedVring>> {
        self.vrings
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Gives the backend its own handle (once it is in an `Arc`), so workers can join the
    /// busy-poll group.
    pub fn set_this(self: &Arc<Self>) {
        let _ = self.this.set(Arc::downgrade(self));
    }

    /// Puts worker `thread` (locked: `worker`) in the busy-poll group if it asks to be.
    fn join_group(&self, thread: usize, worker: &mut D::Worker, vrings: &[CheckedVring]) {
        if !worker.wants_group(vrings) {
            return;
        }
        let Some(this) = self.this.get().cloned() else {
            return;
        };
        // The member holds the backend weakly, and a closed backend ([`Self::close`], on the
        // runner's thread) makes it leave: the group never tears a connection down.
        let joined = super::group::join(Box::new(move || match this.upgrade() {
            Some(backend) => backend.group_pass(thread),
            None => Pass::Leave,
        }));
        if joined {
            worker.joined_group();
        }
    }

    /// One pass of worker `thread` for the busy-poll group; skipped while its own thread
    /// (an event, a queue stop) holds it.
    fn group_pass(&self, thread: usize) -> Pass {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Pass::Leave;
        }
        let Some(slot) = self.workers.get(thread) else {
            return Pass::Leave;
        };
        let mut guard = match slot.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::WouldBlock) => return Pass::Idle,
            Err(std::sync::TryLockError::Poisoned(_)) => return Pass::Leave,
        };
        let Some(worker) = guard.as_mut() else {
            return Pass::Leave;
        };
        let vrings = self.vrings();
        let per = self.device.queues_per_worker();
        let first = thread.saturating_mul(per);
        match vrings.get(first..first.saturating_add(per)) {
            Some(own) => worker.group_pass(own),
            None => Pass::Leave,
        }
    }

    /// Records the connection's vrings (once, when they are created) and tells the device.
    pub fn vrings_created(&self, vrings: &[CheckedVring]) {
        *self.vrings_mut() = vrings.to_vec();
        self.device.vrings_created(vrings);
    }

    /// The memory tables the handler installed for this connection.
    pub fn tables(&self) -> &super::memory_cap::Tables {
        &self.tables
    }

    /// The connection's dirty-page log.
    pub fn dirty_log(&self) -> &DirtyLog {
        &self.log
    }

    /// The device this connection serves.
    pub fn device(&self) -> &Arc<D> {
        &self.device
    }

    /// The fds each worker thread watches besides its queues: `(thread, fd, event id)`.
    pub fn listeners(&self) -> Vec<(usize, RawFd, u64)> {
        let queues = self.num_queues();
        let mut out = Vec::new();
        for (thread, worker) in self.workers.iter().enumerate() {
            if let Some(worker) = lock(worker).as_ref() {
                for (kind, fd) in worker.fds() {
                    out.push((thread, fd, kind.event_id(queues)));
                }
            }
        }
        out
    }

    /// Tells every worker thread to leave its event loop (after the front-end left).
    pub fn signal_exit(&self) {
        self.exit_events.signal(self.device.id());
    }

    fn worker(&self, thread: usize) -> Option<MutexGuard<'_, Option<D::Worker>>> {
        self.workers.get(thread).map(lock)
    }
}

impl<D: Device> Drop for DeviceBackend<D> {
    fn drop(&mut self) {
        self.close();
    }
}

impl<D: Device> VhostUserBackend for DeviceBackend<D> {
    type Bitmap = ();
    type Vring = CheckedVring;

    fn num_queues(&self) -> usize {
        self.device
            .workers()
            .saturating_mul(self.device.queues_per_worker())
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.max_queue_size())
    }

    fn features(&self) -> u64 {
        // Every device logs its writes for live migration (`ring::dirty`).
        self.device.features() | VHOST_F_LOG_ALL
    }

    fn acked_features(&self, features: u64) {
        log::debug!(
            "{}: front-end acked features {features:#x}",
            self.device.id()
        );
        let logging = features & VHOST_F_LOG_ALL != 0;
        self.log.set_logging(logging);
        self.device.acked_features(features & !VHOST_F_LOG_ALL);
        // A migration is running only with a log to fill (QEMU hands it over first); a
        // front-end that merely acks every feature offered is not migrating.
        self.device.logging(logging && self.log.has_map());
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.device.protocol_features() | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        // virtio-queue's `Queue` records it: its disable/enable-notification calls write
        // avail_event or the used flags, and `ring::split` reads it for the interrupt decision.
        log::debug!("{}: EVENT_IDX {}", self.device.id(), enabled);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        read_config_window(&self.device.config_space(), offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> std::io::Result<()> {
        // No device has writable config fields: refuse rather than pretend.
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "the config space is read-only",
        ))
    }

    fn update_memory(
        &self,
        memory: GuestMemoryAtomic<vm_memory::GuestMemoryMmap<()>>,
    ) -> std::io::Result<()> {
        // The handler swaps the mapping inside the atomic the workers were built with; we
        // only tell the SIGBUS handler where this front-end's memory now lies, so a file it
        // shrinks later cannot end the daemon.
        use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};
        let table = memory.memory().into_inner();
        self.tables
            .installed(&table)
            .map_err(std::io::Error::other)?;
        for region in table.iter() {
            let len = usize::try_from(region.len()).unwrap_or(usize::MAX);
            crate::sys::sigbus::register(self.memory_owner, region.as_ptr() as usize, len)
                .map_err(std::io::Error::other)?;
        }
        log::debug!("{}: guest memory table updated", self.device.id());
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let per = self.device.queues_per_worker();
        let mask = u32::try_from(per)
            .ok()
            .and_then(|per| 1u64.checked_shl(per))
            .map_or(u64::MAX, |bit| bit.wrapping_sub(1));
        (0..self.workers.len())
            .map(|thread| {
                u32::try_from(thread.saturating_mul(per))
                    .ok()
                    .and_then(|shift| mask.checked_shl(shift))
                    .unwrap_or(0)
            })
            .collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit_events.take(thread_index)
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        let per = self.device.queues_per_worker();
        let Ok(queue) = usize::try_from(queue_index) else {
            return Ok(());
        };
        let (Some(thread), Some(position)) = (queue.checked_div(per), queue.checked_rem(per))
        else {
            return Ok(());
        };
        if let Some(mut guard) = self.worker(thread) {
            if let Some(worker) = guard.as_mut() {
                worker.stop_queue(position);
            }
        }
        // The worker has returned everything; nothing is written into this ring until it
        // starts again. Mark the whole used ring (the last `avail_event` writes included)
        // before the front-end's final log sync, which follows this stop.
        let vrings = self.vrings();
        if let Some(vring) = vrings.get(queue) {
            let state = vring.get_ref();
            let queue = state.get_queue();
            self.log.mark_used_ring(queue.used_ring(), queue.size());
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
        // This is a queue worker thread: guest-facing, so it runs under the narrower filter.
        crate::sandbox::enter_worker();
        let id = u64::from(device_event);
        let position = usize::from(device_event);
        let event = if position < vrings.len() {
            Event::Queue(position)
        } else if let Some(kind) = WorkerFd::from_event_id(id, self.num_queues()) {
            Event::Fd(kind)
        } else {
            log::warn!("{}: unexpected event id {id}", self.device.id());
            return Ok(());
        };
        let Some(mut guard) = self.worker(thread_id) else {
            return Ok(());
        };
        let Some(worker) = guard.as_mut() else {
            return Ok(());
        };
        // A broken ring is the guest's (or front-end's) doing: log it and keep the thread,
        // since an error here would end the worker's event loop for good.
        if let Err(e) = worker.handle(event, vrings) {
            if let Some(suppressed) = self.error_log.allow() {
                log::error!(
                    "{}: worker {thread_id}: {e} ({suppressed} similar errors not logged)",
                    self.device.id()
                );
            }
        }
        self.join_group(thread_id, worker, vrings);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_window_pads_and_caps() {
        assert_eq!(read_config_window(&[1, 2, 3], 1, 4), vec![2, 3, 0, 0]);
        assert_eq!(read_config_window(&[1], u32::MAX, 2), vec![0, 0]);
        assert_eq!(read_config_window(&[], 0, u32::MAX).len(), 0x1000);
    }
}
