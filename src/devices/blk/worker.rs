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
    /// Signalling the guest failed.
    #[error("cannot signal the used ring")]
    Signal(#[source] std::io::Error),
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

/// A parsed request waiting for QoS tokens.
struct Deferred {
    head: u16,
    request: Request,
    /// Keeps the request's guest mappings alive.
    memory: Arc<GuestMemory>,
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

    /// Starts the waiting requests the limiter now allows.
    fn release_throttled(&mut self) {
        if !self.gate.is_holding() {
            return;
        }
        for held in self.gate.release(&self.shared.qos, |d| d.request.cost()) {
            self.stats.throttle_waited(held.since.elapsed());
            self.execute_deferred(held.item);
        }
    }

    /// Runs `request` now, or holds it back if the device's limits say so. Requests behind
    /// held ones wait too (arrival order).
    fn admit(&mut self, head: u16, request: Request, memory: &Arc<GuestMemory>) {
        // The pass clock when there is one (one clock read per pass, not per request).
        let mut now = self.clock.map(crate::sys::clock::ns_at);
        if !self.gate.is_holding()
            && self
                .gate
                .admit(&self.shared.qos, request.cost(), &mut now)
                .is_ok()
        {
            self.execute(head, request, memory);
            return;
        }
        self.stats.throttled();
        self.gate.hold(Deferred {
            head,
            request,
            memory: Arc::clone(memory),
        });
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
        // The driver's core just wrote the ring entries and headers: ask for all of them at
        // once so the cross-core misses overlap (a chunk's descriptors and used lines, then
        // each request's header a few chains ahead).
        burst.prefetch_rings(available.min(ADMIT_CHUNK as u16));
        burst.prefetch_first(false);
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
                if self.pass.is_empty() && !self.shared.qos.is_enabled() {
                    // No limits: nothing to charge as a batch, start it now (in ring order:
                    // nothing of this pass waits before it).
                    self.execute(head, request, &memory);
                } else {
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
        self.admit_pass(&memory);
        self.clock = None;
        popped
    }

    /// Admits the requests the pass parsed: with QoS, in one charge per kind (reads, writes)
    /// when the limits allow them all (one lock and no clock read per request), else one by
    /// one in ring order, the first refused and everything behind it held (`admit`).
    fn admit_pass(&mut self, memory: &Arc<GuestMemory>) {
        let mut pass = std::mem::take(&mut self.pass);
        let mut now = self.clock.map(crate::sys::clock::ns_at);
        let admitted = !self.gate.is_holding() && self.admit_batch(&pass, &mut now);
        for (head, request) in pass.drain(..) {
            if admitted {
                self.execute(head, request, memory);
            } else {
                self.admit(head, request, memory);
            }
        }
        self.pass = pass;
    }

    /// Charges `pass` to QoS as one batch of reads and one of writes, or charges nothing.
    fn admit_batch(&self, pass: &[(u16, Request)], now: &mut Option<u64>) -> bool {
        let qos = &self.shared.qos;
        if !qos.is_enabled() {
            return true;
        }
        let mut reads = (
            0u64,
            Cost {
                kind: CostKind::Read,
                bytes: 0,
            },
        );
        let mut writes = (
            0u64,
            Cost {
                kind: CostKind::Write,
                bytes: 0,
            },
        );
        for cost in pass.iter().filter_map(|(_, request)| request.cost()) {
            let sum = if cost.kind == CostKind::Read {
                &mut reads
            } else {
                &mut writes
            };
            sum.0 = sum.0.saturating_add(1);
            sum.1.bytes = sum.1.bytes.saturating_add(cost.bytes);
        }
        if !admit_batch(qos, reads.1, reads.0, now) {
            return false;
        }
        if !admit_batch(qos, writes.1, writes.0, now) {
            if reads.0 > 0 {
                qos.refund_many(reads.1, reads.0);
            }
            return false;
        }
        true
    }

    /// Charges the engine's work beyond the requests' own bytes (a tier's promotions and
    /// decompressions) to the device's QoS, after the fact and into debt if need be, so the
    /// requests behind wait for it. Once per pass, not per request.
    fn charge_extra_work(&mut self) {
        let work = self.engine.take_extra_work();
        for (kind, bytes) in [(CostKind::Read, work.read), (CostKind::Write, work.write)] {
            if bytes > 0 {
                self.shared.qos.charge_bytes(Cost { kind, bytes });
            }
        }
    }

    /// Records in the inflight region that the ring was taken up to `next_avail`.
    fn record_popped(&self, next_avail: u16) {
        if let Some((_, inflight)) = &self.inflight {
            inflight.popped_to(next_avail);
        }
    }

    /// At the queue's start: takes the image (the running side of a migration writes it;
    /// `storage::image_lock`), then recovers what a previous process left in flight.
    fn start_queue(&mut self, vring: &CheckedVring) {
        self.started = true;
        self.clock = None;
        if let Some(image) = &self.shared.image {
            let had = image.is_held();
            if !image.queue_started() {
                log::warn!(
                    "{}: queue {}: the image is held by another device or process (a migration \
                     source still running?); requests fail until it is released",
                    self.shared.id,
                    self.queue_index
                );
            } else if !had {
                log::info!(
                    "{}: took the image: this side of the migration now serves it",
                    self.shared.id
                );
            }
        }
        self.recover_inflight(vring);
        // A previous process (killed, or upgraded away) may have published used entries and
        // died before their interrupt, or signalled a call fd the front-end had already let
        // go. With EVENT_IDX the driver's `used_event` then stays behind the used index we
        // start from, and the EVENT_IDX rule (which only asks whether `used_event` lies
        // inside the entries a return adds) never interrupts the driver again: the queue
        // hangs (issue 13's rare stall). So interrupt once now, and once more at the first return (in case the
        // call fd comes later), as libvhost-user does after a start. A spurious interrupt
        // costs the driver one look at the ring.
        self.force_signal = true;
        if let Err(e) = vring.signal_used_queue() {
            log::debug!("{}: queue {}: {e}", self.shared.id, self.queue_index);
        }
    }

    /// At the queue's start: takes the front-end's inflight region for this queue, and
    /// resubmits, in their original order, the requests a previous daemon took and did not
    /// return (a crash), going on from the avail position it recorded.
    fn recover_inflight(&mut self, vring: &CheckedVring) {
        self.inflight = None;
        let Some(region) = self.shared.inflight.current() else {
            return;
        };
        let Some(mut queue) = region.queue(self.queue_index) else {
            return;
        };
        let memory = self.memory.memory().into_inner();
        let mut pending: Vec<(u16, Result<Buffers, request::Reason>)> = Vec::new();
        {
            let mut state = vring.get_mut();
            let ring = state.get_queue_mut();
            if ring.size() != region.queue_size() {
                log::warn!(
                    "{}: queue {}: inflight region made for queues of {}, the ring has {}: \
                     not tracking",
                    self.shared.id,
                    self.queue_index,
                    region.queue_size(),
                    ring.size()
                );
                return;
            }
            let Ok(used) = ring.used_idx(&*memory, Ordering::Acquire) else {
                return;
            };
            let map = MemMap::new(&memory);
            let split = SplitRing::new(&map, ring);
            // The ids in the used ring, through vm-memory: only the used ring has to be
            // readable (not the whole ring in one region, as `SplitRing` needs).
            let (used_ring, size) = (ring.used_ring(), u64::from(ring.size()));
            let recovery = queue.recover(used.0, |position| {
                let slot = u64::from(position).checked_rem(size)?;
                let at = used_ring
                    .checked_add(4)?
                    .checked_add(slot.checked_mul(8)?)?;
                memory
                    .read_obj::<u32>(GuestAddress(at))
                    .ok()
                    .map(u32::from_le)
            });
            log::debug!(
                "{}: queue {}: inflight region: used {} {recovery:?}",
                self.shared.id,
                self.queue_index,
                used.0
            );
            if let Some(mut next_avail) = recovery.next_avail {
                // A crash between marking a head and recording its avail entry as taken
                // leaves the entry at the recorded position holding the newest marked head:
                // it was taken (and is resubmitted below), so go on past it. Otherwise it
                // could be taken again once its resubmitted copy has completed.
                if let (Ok(split), Some(&newest)) = (&split, recovery.pending.last()) {
                    if split.avail_idx() != next_avail && split.head(next_avail) == newest {
                        next_avail = next_avail.wrapping_add(1);
                        // Recorded at once: if this process dies before it takes anything
                        // else, the next one must not take that entry again either.
                        queue.popped_to(next_avail);
                    }
                }
                ring.set_next_avail(next_avail);
                ring.set_next_used(used.0);
            }
            if !recovery.pending.is_empty() {
                for head in recovery.pending {
                    let mut buffers = Buffers::new();
                    let walked = match &split {
                        Ok(split) => split
                            .chain(head, &mut buffers)
                            .map(|()| buffers)
                            .map_err(|_| request::Reason::BrokenChain),
                        Err(_) => Err(request::Reason::BrokenChain),
                    };
                    if self.heads.claim(head) {
                        pending.push((head, walked));
                    }
                }
            }
        }
        if !pending.is_empty() {
            log::info!(
                "{}: queue {}: resubmitting {} request(s) left in flight by the previous \
                 process",
                self.shared.id,
                self.queue_index,
                pending.len()
            );
            self.stats.resubmitted(pending.len());
        }
        self.inflight = Some((region, queue));
        let map = MemMap::new(&memory);
        for (head, buffers) in pending {
            if let Some(request) =
                self.parse_or_refuse(head, buffers.as_deref().map_err(|r| *r), &memory, &map)
            {
                self.admit(head, request, &memory);
            }
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

    fn execute_deferred(&mut self, deferred: Deferred) {
        // Not part of a pop pass: its latency counts from now (never from a pass's clock).
        self.clock = None;
        let Deferred {
            head,
            request,
            memory,
        } = deferred;
        self.execute(head, request, &memory);
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

    fn reap_and_complete(&mut self, vring: &CheckedVring) -> Result<(), WorkerError> {
        self.engine.reap(&mut self.completions);
        self.complete_engine_ops();
        self.return_finished(vring)
    }

    fn complete_engine_ops(&mut self) {
        // Borrowed out and put back so the buffer keeps its capacity across batches.
        let mut completions = std::mem::take(&mut self.completions);
        if completions.is_empty() {
            self.completions = completions;
            return;
        }
        // One clock read for the batch: each request's latency ends here.
        let now = Instant::now();
        for completion in completions.drain(..) {
            let Some((record, memory)) = self.in_flight.get_mut(completion.tag) else {
                log::error!(
                    "{}: completion for unknown request tag {}",
                    self.shared.id,
                    completion.tag
                );
                continue;
            };
            if let Err(errno) = completion.result {
                record.code = VIRTIO_BLK_S_IOERR as u8;
                if record.request.class == OpClass::Flush {
                    self.shared.flush_failed.store(true, Ordering::Release);
                    log::error!(
                        "{}: flush failed ({}); every later flush will fail",
                        self.shared.id,
                        std::io::Error::from_raw_os_error(errno)
                    );
                } else if let Some(suppressed) = self.failure_log.allow() {
                    log::warn!(
                        "{}: {} failed: {} ({suppressed} similar failures not logged)",
                        self.shared.id,
                        record.request.class.name(),
                        std::io::Error::from_raw_os_error(errno)
                    );
                }
            }
            record.request.pending = record.request.pending.saturating_sub(1);
            if record.request.pending > 0 {
                continue;
            }
            let ok = record.code == VIRTIO_BLK_S_OK as u8;
            if let (true, Some(copy)) = (ok, record.bounce.take()) {
                // SAFETY: the guest buffers are mapped by `memory`, which the record pins
                // until `finish`; read buffers are writable by the directions
                // `request::parse_in` checked.
                unsafe { copy.finish() };
            }
            // After the data is in guest memory (engine, tier copy or bounce); a failed read
            // may have written part of it too.
            for &(host, len) in &record.written {
                self.log.mark_host(memory, host, len);
            }
            let request = record.request;
            self.stats.completed(
                request.class,
                request.bytes,
                ok,
                now.saturating_duration_since(request.started),
            );
            self.finished.push(Finished {
                head: request.head,
                status: Some(request.status),
                code: record.code,
                used_len: if ok { request.used_len } else { 1 },
            });
            self.in_flight.finish(completion.tag);
        }
        self.completions = completions;
    }

    /// Returns what finished to the driver in one burst: status bytes, used entries, one
    /// used-index store, then (with an inflight region) the heads cleared and the new used
    /// index recorded (`ring::inflight`), and at most one interrupt.
    fn return_finished(&mut self, vring: &CheckedVring) -> Result<(), WorkerError> {
        if self.finished.is_empty() {
            return Ok(());
        }
        let memory = self.memory.memory().into_inner();
        let map = MemMap::new(&memory);
        let mut state = vring.get_mut();
        // The status byte (through the map: one byte always lies in one region); the used
        // length to return with it.
        let write_status = |done: &Finished| match done.status {
            Some(addr) if map.write(addr.0, &[done.code]) => {
                self.log.mark(addr.0, 1);
                done.used_len
            }
            _ => 0,
        };
        let published = Burst::new(state.get_queue_mut(), &map).map(|burst| {
            let mut burst = burst.with_log(Some(&self.log));
            for done in &self.finished {
                burst.used(done.head, write_status(done));
            }
            (burst.next_used(), burst.finish())
        });
        let (used_idx, notify) = match published {
            Ok(published) => published,
            Err(_) => {
                // The ring cannot be served as a whole (not in one region, or no longer
                // mapped): each entry goes back through vm-memory, which needs only the used
                // ring (virtio-queue's `add_used`: one index store per entry, so the inflight
                // record, written after all of them, covers them as one batch). No interrupt
                // decision without the ring: interrupt (harmless if unwanted).
                for done in &self.finished {
                    if state.add_used(done.head, write_status(done)).is_err() {
                        self.stats.ring_error();
                    }
                }
                let queue = state.get_queue();
                self.log.mark_used_ring(queue.used_ring(), queue.size());
                (queue.next_used(), true)
            }
        };
        if let Some((_, inflight)) = &self.inflight {
            for done in &self.finished {
                inflight.returned(done.head);
            }
            inflight.used_to(used_idx);
        }
        for done in self.finished.drain(..) {
            self.heads.release(done.head);
        }
        drop(state);
        if std::mem::take(&mut self.force_signal) | notify {
            vring.signal_used_queue().map_err(WorkerError::Signal)?;
        }
        Ok(())
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

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
#[path = "worker_tests.rs"]
mod tests;
