//! The per-queue worker: takes requests off one virtqueue, runs them on its own engine, and
//! returns them to the guest.
//!
//! ```text
//!  kick ─▶ drain avail ring ─▶ parse/validate ─▶ engine.push ─┐   (batch)
//!                                      │ refused               ├─▶ engine.submit
//!                                      ▼                       │
//!                               status + used ring      ◀── completions (eventfd)
//! ```
//!
//! Every accepted request has a record in the queue's in-flight table (head, start time,
//! outstanding engine ops; `in_flight`) until its completion. The table pins the request's
//! guest memory snapshot, so the mappings its iovecs point into stay valid even if the
//! front-end replaces the memory table while the kernel is still transferring.
//!
//! The worker is one type in four files: this one (events, the pop pass, parsing, starting
//! requests), `worker_admit.rs` (QoS admission), `worker_complete.rs` (completions and the
//! return to the driver) and `worker_start.rs` (a queue's start: image lock, inflight
//! recovery).

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use super::bounce::{self, Bounce};
use super::in_flight::{Started, Table};
use super::request::{self, Rejection, Request, RequestKind};
use super::shared::DeviceShared;
use super::stats::{OpClass, QueueStats};
use crate::devices::desc::{Buffer, Buffers};
use crate::devices::poll::{spin, Look, PollMode, Poller, MAX_SPELL};
use crate::devices::shell::inflight::InflightRegion;
use crate::log_limit::LogLimiter;
use crate::qos::gate::{admit_batch, Gate};
use crate::qos::limiter::{Cost, CostKind};
use crate::qos::timer::TimerError;
use crate::ring::burst::{Burst, PREFETCH_AHEAD};
use crate::ring::dirty::DirtyLog;
use crate::ring::inflight::InflightQueue;
use crate::ring::map::MemMap;
use crate::ring::split::SplitRing;
use crate::storage::{Completion, Engine, GuestIovecs, IoOp, OpKind};
use crate::vring::{
    avail_index, has_available, AtomicGuestMemory, CheckedVring, EmptyPasses, GuestMemory, HeadSet,
};
use std::os::fd::AsRawFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors that stop a worker from serving its queue (guest mistakes never do).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The queue's rings could not be read or written.
    #[error("virtqueue access failed")]
    Queue(#[from] virtio_queue::Error),
    /// The engine could not submit.
    #[error(transparent)]
    Engine(#[from] crate::storage::EngineError),
}

/// Errors building a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerSetupError {
    /// The QoS timer could not be created.
    #[error(transparent)]
    Timer(#[from] TimerError),
    /// The repoll eventfd could not be created.
    #[error("cannot create the repoll event")]
    Repoll(#[source] std::io::Error),
}

/// The stats class of a request.
fn class_of(kind: &RequestKind) -> OpClass {
    match kind {
        RequestKind::Read { .. } => OpClass::Read,
        RequestKind::Write { .. } => OpClass::Write,
        RequestKind::Flush => OpClass::Flush,
        RequestKind::Discard(_) => OpClass::Discard,
        RequestKind::WriteZeroes(_) => OpClass::WriteZeroes,
        RequestKind::GetId { .. } => OpClass::GetId,
    }
}

/// A request ready to be returned to the guest.
#[derive(Debug, Clone, Copy)]
struct Finished {
    head: u16,
    status: Option<GuestAddress>,
    code: u8,
    used_len: u32,
}

/// Requests a pop pass parses before QoS admits them in one charge: at most this many are
/// taken off the ring beyond the first one the limits refuse (they wait held, in order).
const ADMIT_CHUNK: usize = 32;

/// Serves one virtqueue.
pub struct QueueWorker {
    queue_index: u16,
    shared: Arc<DeviceShared>,
    stats: Arc<QueueStats>,
    engine: Box<dyn Engine>,
    memory: AtomicGuestMemory,
    /// The connection's dirty-page log (live migration).
    log: Arc<DirtyLog>,
    in_flight: Table,
    completions: Vec<Completion>,
    finished: Vec<Finished>,
    /// The chain being parsed (reused: a pass allocates nothing for it).
    descs: Buffers,
    /// The requests a pop pass parsed, admitted by QoS together (`admit_pass`).
    pass: Vec<(u16, Request)>,
    /// Requests of a limited device started as they were parsed, paid from a credit (tests).
    #[cfg(test)]
    paid_from_credit: usize,
    /// When the current pop pass started: the start time of the requests it starts (one
    /// clock read per pass, not one per request).
    clock: Option<Instant>,
    /// The vring this worker serves, learnt at the first event, for queue-stop draining.
    vring: Option<CheckedVring>,
    /// When to poll instead of sleeping.
    poller: Poller,
    /// Wakes the worker's own event loop again between busy-polling spells.
    repoll: EventFd,
    /// Keeps a guest that floods bad requests from flooding the log.
    refusal_log: LogLimiter,
    /// The same for requests that fail in the backing (a failing disk fails them all).
    failure_log: LogLimiter,
    /// Requests waiting for QoS tokens.
    gate: Gate<Deferred>,
    /// Heads taken off the ring and not yet returned (at most the queue size).
    heads: HeadSet,
    /// The front-end's inflight record of this queue (`ring::inflight`), with the region
    /// that maps it; looked up when the queue starts.
    inflight: Option<(Arc<InflightRegion>, InflightQueue)>,
    /// Whether the queue's start was handled (image lock, inflight recovery) since it
    /// (re)started.
    started: bool,
    /// Interrupt the driver at the next return whatever EVENT_IDX says (see
    /// [`QueueWorker::start_queue`]).
    force_signal: bool,
}

impl QueueWorker {
    /// A worker for queue `queue_index`, serving with `engine`.
    pub fn new(
        queue_index: u16,
        shared: Arc<DeviceShared>,
        engine: Box<dyn Engine>,
        memory: AtomicGuestMemory,
        log: Arc<DirtyLog>,
    ) -> Result<Self, WorkerSetupError> {
        let stats = shared.queue_stats(queue_index);
        let poller = Poller::new(shared.poll);
        // Per-queue state sized for a full queue once: a new peak of requests in flight
        // allocates nothing on the request path.
        // Capped: the configured maximum (up to 32768, on up to 64 queues) is not what the
        // front-end sets, and reserving it all up front would cost address space (and, under
        // strict overcommit, an abort) for nothing; a deeper queue grows these once.
        let depth = usize::from(shared.queue_size).min(1024);
        Ok(Self {
            queue_index,
            shared,
            stats,
            engine,
            memory,
            log,
            clock: None,
            in_flight: Table::with_capacity(depth),
            completions: Vec::with_capacity(depth),
            finished: Vec::with_capacity(depth),
            descs: Buffers::new(),
            pass: Vec::with_capacity(depth),
            #[cfg(test)]
            paid_from_credit: 0,
            vring: None,
            poller,
            repoll: EventFd::new(EFD_NONBLOCK).map_err(WorkerSetupError::Repoll)?,
            refusal_log: LogLimiter::default(),
            failure_log: LogLimiter::default(),
            gate: Gate::new()?,
            heads: HeadSet::default(),
            inflight: None,
            started: false,
            force_signal: false,
        })
    }

    /// The QoS timer's fd, to be added to the worker thread's epoll set.
    pub fn throttle_fd(&self) -> std::os::fd::RawFd {
        self.gate.timer_fd()
    }

    /// Handles the QoS timer: tokens are back, start what waited, then serve the ring again.
    pub fn process_timer(&mut self, vring: &CheckedVring) -> Result<(), WorkerError> {
        // Always consume the expiry: the fd is level-triggered, and with nothing held (a
        // queue stop released it all) nobody else would.
        self.gate.clear_timer();
        self.release_throttled();
        self.process_queue(vring)
    }

    /// The engine's completion eventfd, to be added to the worker thread's epoll set.
    pub fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.engine.completion_fd()
    }

    /// The eventfd that calls the worker again between busy-polling spells.
    pub fn repoll_fd(&self) -> std::os::fd::RawFd {
        self.repoll.as_raw_fd()
    }

    /// The repoll event fired: consume it and serve the ring.
    pub fn process_repoll(&mut self, vring: &CheckedVring) -> Result<(), WorkerError> {
        let _ = self.repoll.read();
        self.process_queue(vring)
    }

    /// Handles a kick: drains the available ring, submits the batch, returns what is done.
    ///
    /// When the ring runs dry the worker may poll it and the engine's completions, guest
    /// notifications still suppressed, before sleeping (`devices::poll`: an adaptive window
    /// by default, busy polling, or none, within a CPU budget): under load the guest stops
    /// kicking and the worker stops sleeping; an idle queue stops polling and costs nothing.
    /// One call polls at most [`MAX_SPELL`], so queue-stop requests are never starved;
    /// busy polling then continues through the repoll event.
    pub fn process_queue(&mut self, vring: &CheckedVring) -> Result<(), WorkerError> {
        if vring.size_rejected() {
            self.stats.misconfigured();
            return Ok(());
        }
        if !self.started {
            if !vring.get_ref().get_queue().ready() {
                // Stopped (GET_VRING_BASE drained it) with an event still queued (a kick,
                // the QoS timer, a busy-poll repoll): the queue must not count as started
                // again (it would take a migrated image back). Checked only here, once per
                // start, not on every pass.
                return Ok(());
            }
            self.start_queue(vring);
        }
        let started = Instant::now();
        self.poller.woke(started);
        let mut empty_passes = EmptyPasses::default();
        loop {
            // Load the memory map on every pass: the front-end may add regions
            // (ADD_MEM_REG) while this worker polls, and a stale map would refuse
            // buffers in the new region.
            let memory = self.memory.memory().into_inner();
            vring.disable_notification()?;
            self.release_throttled();
            let popped = self.pop_available(vring);
            self.engine.submit()?;
            self.charge_extra_work();
            self.reap_and_complete(vring)?;
            if self.gate.is_holding() {
                // Over the limit: leave the rest in the ring (back-pressure) until the timer.
                vring.enable_notification()?;
                return Ok(());
            }
            if empty_passes.stalled(popped) {
                self.ring_unusable(vring);
                // Kicks back on (the driver's next publication brings the next look): a ring
                // left with kicks off would never be looked at again.
                let _ = vring.enable_notification();
                return Ok(());
            }
            let now = Instant::now();
            let window = self.poller.window(now);
            let spell_left = MAX_SPELL.saturating_sub(now.saturating_duration_since(started));
            let mut polled = Duration::ZERO;
            if !window.is_zero() && !spell_left.is_zero() {
                let window = window.min(spell_left);
                if self.poll_for_work(vring, &memory, window)? {
                    continue;
                }
                polled = now.elapsed();
                self.poller.missed(polled);
                if self.poller.mode() == PollMode::Busy && !self.poller.window(now).is_zero() {
                    // Keep busy polling, but through the event loop, so a queue stop gets in.
                    if let Err(e) = self.repoll.write(1) {
                        log::warn!(
                            "{}: queue {}: repoll: {e}",
                            self.shared.id,
                            self.queue_index
                        );
                    }
                    return Ok(());
                }
            }
            if !vring.enable_notification()? {
                self.poller.sleeping(Instant::now(), polled);
                return Ok(());
            }
        }
    }

    /// Records a ring that claims buffers that cannot be taken (a stopped ring is normal).
    fn ring_unusable(&mut self, vring: &CheckedVring) {
        if !vring.get_ref().get_queue().ready() {
            return;
        }
        self.stats.ring_error();
        if let Some(suppressed) = self.refusal_log.allow() {
            log::warn!(
                "{}: queue {}: available ring is corrupt (index beyond the ring); ignoring it \
                 until the next kick ({suppressed} similar events not logged)",
                self.shared.id,
                self.queue_index
            );
        }
    }

    /// Counts and (rate-limited) logs a head the driver should not have published.
    fn skip_head(&mut self, head: u16, why: &str) {
        self.stats.ring_error();
        if let Some(suppressed) = self.refusal_log.allow() {
            log::warn!(
                "{}: queue {}: head {head} {why}; skipped ({suppressed} similar events not logged)",
                self.shared.id,
                self.queue_index
            );
        }
    }

    /// Takes requests off the ring (under one vring lock) until it is empty or QoS holds, and
    /// starts them: at once on a device without limits, else admitted in chunks
    /// (`admit_pass`). Returns how many were taken.
    fn pop_available(&mut self, vring: &CheckedVring) -> usize {
        // The avail index first, then the memory map the requests are parsed with: a request
        // published up to that index has its buffers in this map (the front-end added their
        // region, got the reply, then published); one published later may need a newer map,
        // so it waits for the next pass (`Burst::up_to`).
        let mut state = vring.get_mut();
        let end = avail_index(state.get_queue(), &self.memory);
        let memory = self.memory.memory().into_inner();
        let map = MemMap::new(&memory);
        // A ring that cannot be served (unmapped, misaligned, an avail index more than a ring
        // ahead) takes nothing: the caller counts it once it stays that way.
        let Ok(mut burst) = Burst::bounded(state.get_queue_mut(), &map, end) else {
            return 0;
        };
        let mut descs = std::mem::take(&mut self.descs);
        let mut popped = 0usize;
        // One clock read for the requests this pass starts (their latency counts from it).
        let available = burst.available().unwrap_or(0);
        self.clock = (available > 0).then(Instant::now);
        // Limits that do not bind: tokens for a chunk taken ahead, so requests start as they
        // are parsed (`qos::credit`); else they are charged in chunks (`admit_pass`).
        let mut credit = self.take_credit();
        // The driver's core just wrote the ring entries and headers: ask for all of them at
        // once so the cross-core misses overlap (a chunk's descriptors and used lines, then
        // each request's header a few chains ahead).
        burst.prefetch_start(available.min(ADMIT_CHUNK as u16), false);
        while !self.gate.is_holding() {
            burst.prefetch(PREFETCH_AHEAD, false);
            let Ok(Some((head, walked))) = burst.pop(&mut descs) else {
                break;
            };
            popped = popped.saturating_add(1);
            let next_avail = burst.next_avail();
            if head >= burst.size() {
                // A head beyond the ring: nothing can be read or returned for it. Skip it and
                // serve what follows (the queue never stops silently behind one bad entry).
                self.skip_head(head, "is beyond the ring");
                self.record_popped(next_avail);
                continue;
            }
            if !self.heads.claim(head) {
                // The driver published a head we still hold: a broken ring. Serving it twice
                // would complete one request twice and let a guest pile up unbounded work;
                // skip it (the held request completes once) and keep serving the rest.
                self.skip_head(head, "was published again while in flight");
                self.record_popped(next_avail);
                continue;
            }
            // Recorded in flight before anything runs, then the avail position: a crash
            // anywhere after resubmits it, never loses it (`ring::inflight`).
            if let Some((_, inflight)) = &mut self.inflight {
                inflight.begin(head);
            }
            self.record_popped(next_avail);
            let buffers = walked
                .map(|()| descs.as_slice())
                .map_err(|_| request::Reason::BrokenChain);
            if let Some(request) = self.parse_or_refuse(head, buffers, &memory, &map) {
                // Start it now (in ring order: nothing of this pass waits before it) without
                // limits, or paid from the credit; else it waits for its chunk's charge.
                if self.pass.is_empty()
                    && (!self.shared.qos.is_enabled()
                        || self.spend_credit(&mut credit, request.cost()))
                {
                    #[cfg(test)]
                    if self.shared.qos.is_enabled() {
                        self.paid_from_credit = self.paid_from_credit.saturating_add(1);
                    }
                    self.execute(head, request, &memory);
                } else {
                    // Charged with its chunk (the credit has ended: `spend_credit`).
                    self.pass.push((head, request));
                }
            }
            if self.pass.len() >= ADMIT_CHUNK {
                // Admitted (or held) now: a queue at its QoS limit stops taking requests off
                // the ring within a chunk (back-pressure: the rest stay in the ring).
                self.admit_pass(&memory);
            }
        }
        // Nothing is used in a pop burst (completions go back in `return_finished`).
        let _ = burst.finish();
        drop(state);
        self.descs = descs;
        if let Some(credit) = credit {
            credit.give_back(&self.shared.qos);
        }
        self.admit_pass(&memory);
        self.clock = None;
        popped
    }

    /// Records in the inflight region that the ring was taken up to `next_avail`.
    fn record_popped(&self, next_avail: u16) {
        if let Some((_, inflight)) = &self.inflight {
            inflight.popped_to(next_avail);
        }
    }

    /// Spins until new buffers are available (true) or nothing happened for `window`.
    /// Completions found meanwhile are returned to the guest and restart the idle clock.
    fn poll_for_work(
        &mut self,
        vring: &CheckedVring,
        memory: &Arc<GuestMemory>,
        window: Duration,
    ) -> Result<bool, WorkerError> {
        spin(window, || {
            if has_available(vring, memory) {
                return Ok(Look::Work);
            }
            if self.engine.completions_pending() {
                self.reap_and_complete(vring)?;
                return Ok(Look::Progress);
            }
            Ok(Look::Nothing)
        })
    }

    /// Handles the engine's completion event.
    pub fn process_completions(&mut self, vring: &CheckedVring) -> Result<(), WorkerError> {
        // Reset the eventfd before reaping: a completion landing after this re-arms it.
        self.engine.acknowledge_notification();
        self.reap_and_complete(vring)
    }

    /// Records the vring this worker serves.
    pub fn remember_vring(&mut self, vring: &CheckedVring) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
    }

    /// Waits for every in-flight request and returns them to the guest (queue stop). Called
    /// from the front-end's thread, which has no vring at hand: uses the remembered one.
    pub fn drain_detached(&mut self) {
        // Nothing popped may stay unanswered: start what QoS held back, limits or not, and
        // charge it into debt (a guest resetting its device must not get work past its
        // limits).
        for held in self.gate.release_all() {
            if let Some(cost) = held.item.request.cost() {
                if self.shared.qos.is_enabled() {
                    self.shared.qos.charge_anyway(cost);
                }
            }
            self.execute_deferred(held.item);
        }
        if let Err(e) = self.engine.submit() {
            log::error!("{}: queue {}: {e}", self.shared.id, self.queue_index);
        }
        self.engine.drain(&mut self.completions);
        self.complete_engine_ops();
        match self.vring.clone() {
            Some(vring) => {
                if let Err(e) = self.return_finished(&vring) {
                    log::warn!("{}: queue {}: {e}", self.shared.id, self.queue_index);
                }
            }
            None => {
                self.finished.clear();
                self.heads.clear();
            }
        }
        // The queue stops; at its next start the region is looked up again (a reset brings
        // a new one).
        self.inflight = None;
        if std::mem::take(&mut self.started) {
            if let Some(image) = &self.shared.image {
                if image.queue_stopped() {
                    log::info!(
                        "{}: migration switchover: every queue stopped, the image is released \
                         for the destination",
                        self.shared.id
                    );
                }
            }
        }
    }

    /// The request `buffers` hold, or `None` once it is refused (counted, logged within
    /// limits, and queued to go back with its status).
    fn parse_or_refuse(
        &mut self,
        head: u16,
        buffers: Result<&[Buffer], request::Reason>,
        memory: &Arc<GuestMemory>,
        map: &MemMap<'_>,
    ) -> Option<Request> {
        let parsed = buffers
            .map_err(|reason| Rejection {
                status: None,
                code: VIRTIO_BLK_S_IOERR as u8,
                reason,
            })
            .and_then(|buffers| request::parse_in(memory, map, buffers, self.shared.limits()));
        match parsed {
            Ok(request) => Some(request),
            Err(rejection) => {
                self.stats.rejected(rejection.reason);
                if let Some(suppressed) = self.refusal_log.allow() {
                    log::warn!(
                        "{}: queue {}: request {head} refused: {}{}",
                        self.shared.id,
                        self.queue_index,
                        rejection.reason.name(),
                        if suppressed > 0 {
                            format!(" ({suppressed} more refusals not logged)")
                        } else {
                            String::new()
                        }
                    );
                }
                self.finished.push(Finished {
                    head,
                    status: rejection.status,
                    code: rejection.code,
                    used_len: u32::from(rejection.status.is_some()),
                });
                None
            }
        }
    }

    /// Completes request `head` at once with an I/O error (counted as a failed `class`).
    fn fail_now(&mut self, head: u16, status: GuestAddress, class: OpClass) {
        self.stats.started();
        self.stats
            .completed(class, 0, false, std::time::Duration::ZERO);
        self.finished.push(Finished {
            head,
            status: Some(status),
            code: VIRTIO_BLK_S_IOERR as u8,
            used_len: 1,
        });
    }

    fn execute(&mut self, head: u16, request: Request, memory: &Arc<GuestMemory>) {
        let class = class_of(&request.kind);
        if self
            .shared
            .image
            .as_ref()
            .is_some_and(|image| !image.ensure_held())
        {
            // The other side of a migration still holds the image: serve nothing.
            self.fail_now(head, request.status, class);
            return;
        }
        let Request {
            kind,
            iovecs,
            data_len,
            status,
            used_len,
        } = request;
        let ops = match kind {
            RequestKind::Read { offset } => Ops::One(OpKind::Read { offset }, iovecs),
            RequestKind::Write { offset } => Ops::One(OpKind::Write { offset }, iovecs),
            RequestKind::Flush => {
                if self.shared.flush_failed.load(Ordering::Acquire) {
                    // fsyncgate: after one failed flush, data may already be gone; never
                    // report a later flush as success.
                    self.fail_now(head, status, OpClass::Flush);
                    return;
                }
                Ops::One(OpKind::Flush, GuestIovecs::default())
            }
            RequestKind::Discard(ranges) => Ops::Ranges(ranges, false),
            RequestKind::WriteZeroes(ranges) => Ops::Ranges(ranges, true),
            RequestKind::GetId { buffer } => {
                self.serve_get_id(head, status, used_len, buffer, memory);
                return;
            }
        };
        let started = Started {
            head,
            status,
            used_len,
            pending: match &ops {
                Ops::One(..) => 1,
                Ops::Ranges(ranges, _) => u32::try_from(ranges.len()).unwrap_or(u32::MAX),
            },
            class,
            bytes: u64::from(data_len),
            started: self.clock.unwrap_or_else(Instant::now),
        };
        let Some((tag, record)) = self.in_flight.start(started, memory) else {
            self.fail_now(head, status, class);
            return;
        };
        self.stats.started();
        let mut push = |kind, iovecs| {
            // SAFETY: the iovecs were built by `request::parse_in` from guest memory regions of
            // `memory` (or point into the record's bounce buffer, kept until the request
            // completes); the request's record pins that memory until every op of the request
            // has completed, so the mappings outlive the kernel's access. The guest owns the
            // buffers' contents; the device only accesses them as the descriptor directions
            // (checked by the parser) allow.
            unsafe { self.engine.push(IoOp { kind, iovecs, tag }) };
        };
        match ops {
            Ops::One(kind, iovecs) => {
                let read = matches!(kind, OpKind::Read { .. });
                if read {
                    record
                        .written
                        .extend(iovecs.0.iter().map(|v| (v.iov_base as usize, v.iov_len)));
                }
                let iovecs = bounced(self.shared.direct_align, iovecs, read, &mut record.bounce);
                push(kind, iovecs);
            }
            Ops::Ranges(ranges, zeroes) => {
                for r in ranges {
                    let kind = if zeroes {
                        OpKind::WriteZeroes {
                            offset: r.offset,
                            len: r.len,
                            unmap: r.unmap,
                        }
                    } else {
                        OpKind::Discard {
                            offset: r.offset,
                            len: r.len,
                        }
                    };
                    push(kind, GuestIovecs::default());
                }
            }
        }
    }

    /// GET_ID: the serial into the guest's buffer, at once.
    fn serve_get_id(
        &mut self,
        head: u16,
        status: GuestAddress,
        used_len: u32,
        buffer: GuestAddress,
        memory: &Arc<GuestMemory>,
    ) {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let serial = self.shared.serial.as_bytes();
        for (dst, src) in id.iter_mut().zip(serial) {
            *dst = *src;
        }
        let code = match memory.write_slice(&id, buffer) {
            Ok(()) => {
                self.log.mark(buffer.0, id.len() as u64);
                VIRTIO_BLK_S_OK as u8
            }
            Err(_) => VIRTIO_BLK_S_IOERR as u8,
        };
        self.stats.started();
        self.stats.completed(
            OpClass::GetId,
            0,
            code == VIRTIO_BLK_S_OK as u8,
            std::time::Duration::ZERO,
        );
        self.finished.push(Finished {
            head,
            status: Some(status),
            code,
            used_len,
        });
    }
}

/// A request's engine ops: one for everything but discards and write-zeroes, which have one
/// per range (`true`: write-zeroes).
enum Ops {
    One(OpKind, GuestIovecs),
    Ranges(Vec<request::ByteRange>, bool),
}

/// The iovecs to hand the engine: the guest's own, or on a `direct` disk (`align`) with any
/// unaligned buffer an aligned bounce buffer kept in `bounce` until completion.
fn bounced(
    align: Option<usize>,
    iovecs: GuestIovecs,
    read: bool,
    bounce: &mut Option<Bounce>,
) -> GuestIovecs {
    match align {
        Some(align) if bounce::needed(&iovecs, align) => {
            // SAFETY: `request::parse_in` built the iovecs from mapped guest memory that the
            // request's record pins until the request completes; write buffers are readable
            // by the descriptor directions parse checked.
            let mut copy = unsafe { Bounce::new(iovecs, align, read) };
            let aligned = copy.iovecs();
            *bounce = Some(copy);
            aligned
        }
        _ => iovecs,
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        // A connection that ended without stopping its queue (the front-end died): the queue
        // no longer runs, for the image lock's count of running queues; nothing is handed
        // over.
        if self.started {
            if let Some(image) = &self.shared.image {
                image.queue_gone();
            }
        }
    }
}

#[path = "worker_admit.rs"]
mod admit;
#[path = "worker_complete.rs"]
mod complete;
#[path = "worker_start.rs"]
mod start;

use admit::Deferred;

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
#[path = "worker_tests.rs"]
mod tests;
