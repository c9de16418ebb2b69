//! The per-queue-pair worker: sends what the guest put in its tx queue (to the tap or into
//! the switch) and fills its rx queue from the tap.
//!
//! ```text
//!  tx kick ─▶ pop chain ─▶ check (frame.rs) ─▶ writev(tap) | switch.transmit ─▶ used
//!  tap readable / rx kick ─▶ take rx chains ─▶ readv(tap) into them ─▶ used (whole frame)
//! ```
//!
//! Backpressure: when the guest has no rx buffers the worker stops reading the tap (frames
//! wait in the tap's queue, and the kernel drops beyond its length, as with any NIC) and asks
//! the guest for a kick on the rx queue; the next kick resumes reading. The tap is
//! edge-triggered, so the worker always reads until the tap is empty or the ring is.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::Arc;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace};

use super::fabric::{Port, SwitchHub, MAX_BURST};
use super::frame::{tx_frame_into, FrameRef, Frames, TxFrame};
use super::header::{HEADER_LEN, MAX_GSO_FRAME};
use super::rx::RxTarget;
use super::rx::{Gathered, Header, RxBatch};
use super::shared::NetShared;
use super::slots::Slots;
use super::spec::{Negotiated, MAX_CHAIN_DESCRIPTORS};
use super::stats::{Direction, Drop, Tally};
use super::tap_queue::TapQueue;
use crate::devices::desc::{Buffer, Buffers};
use crate::devices::sg::host_iovecs;
use crate::qos::gate::{admit_batch, Gate};
use crate::qos::limiter::{Cost, CostKind};
use crate::qos::timer::TimerError;
use crate::ring::burst::{Burst, PREFETCH_AHEAD};
use crate::ring::dirty::DirtyLog;
use crate::ring::map::MemMap;
use crate::storage::GuestIovecs;
use crate::vring::{
    avail_index, has_available, AtomicGuestMemory, CheckedVring, EmptyPasses, GuestMemory,
};
use smallvec::{smallvec, SmallVec};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::devices::poll::{spin, Look, PollMode, Poller, MAX_SPELL};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors that stop a worker from serving its queues (guest mistakes never do).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The queue's rings could not be read or written.
    #[error("virtqueue access failed")]
    Queue(#[from] virtio_queue::Error),
    /// The QoS timer could not be created.
    #[error(transparent)]
    Timer(#[from] TimerError),
    /// The repoll eventfd could not be created.
    #[error("cannot create the repoll event")]
    Repoll(#[source] std::io::Error),
}

/// What a frame from the tap costs before its size is known: one packet and one byte (the
/// rest of its bytes is charged once read, possibly into debt). The byte makes a byte
/// bucket in debt hold the next frame back: a zero-byte cost passes any byte bucket (a
/// flush against a byte limit costs nothing), and `rx-bps` on a tap once never held.
const RX_PROBE: Cost = Cost {
    kind: CostKind::Rx,
    bytes: 1,
};

/// Most tx chains handled per burst (one used-index store and at most one interrupt each);
/// the switch takes a burst this size at once.
const TX_BURST: usize = MAX_BURST;
/// Most frames read from the tap per burst of the rx ring.
const RX_BURST: usize = 64;

/// What one tx burst did.
enum TxPass {
    /// This many chains were taken.
    Sent(usize),
    /// QoS holds the ring (the timer resumes it).
    Held,
    /// The ring is stopped or broken (kicks are on for a broken one).
    Stopped,
}

/// Where this pair's frames go.
pub enum PairBackend {
    /// A tap queue (owned by the worker for the connection's lifetime).
    Tap(TapQueue),
    /// A switch port.
    Switch {
        /// The switch.
        hub: Arc<SwitchHub>,
        /// Our port on it.
        port: Arc<Port>,
        /// Our receive side, which senders fill.
        rx: Arc<RxTarget>,
    },
}

/// Serves one queue pair.
pub struct PairWorker {
    pair: u16,
    shared: Arc<NetShared>,
    memory: AtomicGuestMemory,
    backend: PairBackend,
    negotiated: Negotiated,
    /// Features the tap offloads were last set for.
    offloads_for: Option<u64>,
    batch: RxBatch,
    /// The connection's dirty-page log (live migration): rx frames and used rings.
    log: Arc<DirtyLog>,
    /// The tx burst being sent, each frame filled in place in a reused slot.
    tx_frames: Slots<TxSlot>,
    /// The burst's chains that carry no frame to send: position, head, why.
    tx_bad: Vec<(u16, u16, Drop)>,
    /// Scratch for the chain being walked.
    descs: Buffers,
    /// Scratch iovec list, reused per frame and emptied after each use.
    iovecs: GuestIovecs,
    /// When to poll the tx ring instead of sleeping.
    poller: Poller,
    /// Wakes the worker's own event loop again between busy-polling spells.
    repoll: EventFd,
    /// The busy-poll group polls the tx ring (`shell::group`): no spinning of our own.
    in_group: bool,
    /// When the group last looked at the tx ring and found nothing (fruitless looks count
    /// against the budget); `None` after a look that worked: its own work is no fruitless
    /// polling, and the clock is read only by idle looks (a worked pass reads none).
    last_look: Option<Instant>,
    /// QoS: the directions waiting for tokens (tx: a frame was put back in the ring; rx:
    /// frames wait in the tap) and the timer that wakes the worker for them.
    gate: Gate<Direction>,
}

impl PairWorker {
    /// A worker for queue pair `pair`.
    pub fn new(
        pair: u16,
        shared: Arc<NetShared>,
        memory: AtomicGuestMemory,
        log: Arc<DirtyLog>,
        backend: PairBackend,
    ) -> Result<Self, WorkerError> {
        let gate = Gate::new()?;
        let config = &shared.config;
        let poller = Poller::new(config.poll);
        let repoll = EventFd::new(EFD_NONBLOCK).map_err(WorkerError::Repoll)?;
        Ok(Self {
            pair,
            shared,
            memory,
            log,
            backend,
            negotiated: Negotiated::default(),
            offloads_for: None,
            batch: RxBatch::default(),
            tx_frames: Slots::with_slots(TX_BURST),
            tx_bad: Vec::with_capacity(TX_BURST),
            descs: Buffers::new(),
            iovecs: GuestIovecs::default(),
            gate,
            poller,
            repoll,
            in_group: false,
            last_look: None,
        })
    }

    /// The eventfd that calls the worker again between busy-polling spells.
    pub fn repoll_fd(&self) -> std::os::fd::RawFd {
        self.repoll.as_raw_fd()
    }

    /// The repoll event fired: consume it and serve the tx ring.
    pub fn process_repoll(&mut self, tx: &CheckedVring) -> Result<(), WorkerError> {
        let _ = self.repoll.read();
        self.process_tx(tx)
    }

    /// The queue pair this worker serves.
    pub fn pair(&self) -> u16 {
        self.pair
    }

    /// The QoS timer's fd, for the thread's event loop.
    pub fn timer_fd(&self) -> std::os::fd::RawFd {
        self.gate.timer_fd()
    }

    /// The QoS timer fired: resume what waited for tokens.
    pub fn process_timer(
        &mut self,
        rx: &CheckedVring,
        tx: &CheckedVring,
    ) -> Result<(), WorkerError> {
        // Each direction is retried as a whole; its next frame is admitted at its real cost.
        for held in self.gate.release(&self.shared.qos, |_| None) {
            match held.item {
                Direction::Tx => self.process_tx(tx)?,
                Direction::Rx => self.receive_from_tap(rx)?,
            }
        }
        Ok(())
    }

    /// Holds `direction` back (the gate's timer is armed for `wait`).
    fn hold(&mut self, direction: Direction, wait: Duration) {
        self.shared.stats.throttled(direction, wait);
        if !self.gate.holds(|d| *d == direction) {
            self.gate.hold(direction);
        }
    }

    /// The fd the thread's event loop watches for the tap, if any.
    pub fn tap_poll_fd(&self) -> Option<std::os::fd::RawFd> {
        match &self.backend {
            PairBackend::Tap(tap) => Some(tap.poll_fd()),
            PairBackend::Switch { .. } => None,
        }
    }

    /// Gives the tap queue back (at disconnect).
    pub fn into_tap(self) -> Option<TapQueue> {
        match self.backend {
            PairBackend::Tap(tap) => Some(tap),
            PairBackend::Switch { .. } => None,
        }
    }

    /// Picks up newly acked features (tap offloads follow them).
    fn refresh_features(&mut self) {
        let features = self.shared.acked_features();
        if self.offloads_for == Some(features) {
            return;
        }
        self.negotiated = Negotiated::from_features(features);
        if let PairBackend::Tap(tap) = &mut self.backend {
            tap.set_offloads(self.negotiated.tap_offloads());
        }
        self.offloads_for = Some(features);
    }

    /// A kick on the rx queue: buffers were added.
    pub fn process_rx_kick(&mut self, rx: &CheckedVring) -> Result<(), WorkerError> {
        self.refresh_features();
        match &self.backend {
            PairBackend::Tap(_) => self.receive_from_tap(rx),
            // Other ports' threads fill a switch port's rx queue as they send, and drop what
            // finds it full: a kick is news to no one. Ask the driver for no more (a polling
            // driver refilling its ring otherwise kicks at every refill, and each kick wakes
            // this thread for nothing).
            PairBackend::Switch { .. } => Ok(rx.disable_notification()?),
        }
    }

    /// The tap's poll fd fired.
    pub fn process_tap(&mut self, rx: &CheckedVring) -> Result<(), WorkerError> {
        self.refresh_features();
        let PairBackend::Tap(tap) = &mut self.backend else {
            return Ok(());
        };
        let events = tap.events();
        if events.reattached {
            self.shared.set_link(true);
        }
        if events.readable {
            self.receive_from_tap(rx)?;
        }
        Ok(())
    }

    /// Largest frame (header included) the tap may hand this guest.
    fn max_rx_len(&self) -> u64 {
        let frame = if self.negotiated.tap_offloads() & !crate::sys::tap::offload::CSUM != 0 {
            MAX_GSO_FRAME as u64
        } else {
            u64::from(self.shared.config.mtu).saturating_add(14 + 4)
        };
        frame.saturating_add(HEADER_LEN as u64)
    }

    fn receive_from_tap(&mut self, rx: &CheckedVring) -> Result<(), WorkerError> {
        if rx.size_rejected() {
            return Ok(());
        }
        let need = self.max_rx_len();
        let stats = &self.shared.stats;
        let mut notify = false;
        let mut held = None;
        loop {
            let PairBackend::Tap(tap) = &mut self.backend else {
                return Ok(());
            };
            if !tap.is_up() {
                break;
            }
            let mut state = rx.get_mut();
            if !state.get_queue().ready() || !state.is_enabled() {
                break;
            }
            // The avail index before the memory snapshot (see `Burst::up_to`).
            let end = avail_index(state.get_queue(), &self.memory);
            let memory = self.memory.memory();
            let map = MemMap::new(&memory);
            let dirty = Arc::clone(&self.log);
            let mut burst = match Burst::bounded(state.get_queue_mut(), &map, end) {
                Ok(burst) => burst
                    .with_log(Some(&dirty))
                    .limit_walk(MAX_CHAIN_DESCRIPTORS),
                Err(e) => {
                    stats.ring_error();
                    log::debug!("{} pair {}: rx ring: {e}", self.shared.config.id, self.pair);
                    break;
                }
            };
            let mut taken = 0usize;
            let mut qos_now = None;
            // Why this burst ended: the ring ran out (`Some(true)`), something else stops
            // the pass (`Some(false)`), or it is full and another follows (`None`).
            let mut ended = None;
            while taken < RX_BURST {
                if self.gate.holds(|d| *d == Direction::Rx) {
                    ended = Some(false);
                    break;
                }
                let limited = self.shared.qos.is_enabled();
                if limited {
                    // One frame's worth of packet tokens now; its bytes once its size is known.
                    if let Err(wait) =
                        self.gate
                            .admit(&self.shared.qos, Some(RX_PROBE), &mut qos_now)
                    {
                        held = Some(wait);
                        ended = Some(false);
                        break;
                    }
                }
                let refund = |qos: &crate::qos::handle::QosHandle| {
                    if limited {
                        qos.refund(RX_PROBE);
                    }
                };
                let gathered = self.batch.gather(
                    &mut burst,
                    &memory,
                    need,
                    self.negotiated.mergeable_rx,
                    |reason| stats.dropped(Direction::Rx, reason),
                );
                match gathered {
                    Ok(Gathered::Ready) => {}
                    Ok(Gathered::Empty) => {
                        // No room: leave the frames in the tap and wait for the guest's kick.
                        refund(&self.shared.qos);
                        stats.rx_stalled();
                        ended = Some(true);
                        break;
                    }
                    Err(e) => {
                        refund(&self.shared.qos);
                        stats.ring_error();
                        log::debug!("{} pair {}: rx ring: {e}", self.shared.config.id, self.pair);
                        ended = Some(false);
                        break;
                    }
                }
                self.iovecs.0.clear();
                let mut mapped = true;
                for buffer in self.batch.buffers() {
                    let len = u64::from(buffer.capacity);
                    if host_iovecs(&memory, &buffer.spans, 0, len, &mut self.iovecs.0).is_err() {
                        mapped = false;
                        break;
                    }
                }
                let read = if mapped {
                    tap.read_frame(&self.iovecs)
                } else {
                    None
                };
                self.iovecs.0.clear();
                let Some(n) = read else {
                    // Tap empty (or gone): nothing used.
                    refund(&self.shared.qos);
                    self.batch.put_back(&mut burst);
                    if !tap.is_up() {
                        self.shared.set_link(false);
                    }
                    ended = Some(false);
                    break;
                };
                let n = n as u64;
                let truncated = n >= self.batch.capacity() && self.batch.capacity() < need;
                let (used, delivered) = if truncated || n < HEADER_LEN as u64 {
                    stats.dropped(Direction::Rx, Drop::TooLarge);
                    (0, None)
                } else {
                    (n, Some(n.saturating_sub(HEADER_LEN as u64)))
                };
                self.batch
                    .commit(&mut burst, &memory, used, Header::NumBuffersUnset);
                if let Some(bytes) = delivered {
                    stats.received(bytes);
                    if limited {
                        // The probe paid for one byte already.
                        self.shared.qos.charge_bytes(Cost {
                            kind: CostKind::Rx,
                            bytes: bytes.saturating_sub(RX_PROBE.bytes),
                        });
                    }
                }
                taken = taken.saturating_add(1);
            }
            let seen = burst.avail_seen();
            notify |= burst.finish();
            match ended {
                // Out of room: ask for a kick, and go on at once only if the driver posted
                // more buffers than the ones just found too small (else a guest posting less
                // room than a frame needs would keep this loop spinning).
                Some(true) => {
                    state.get_queue_mut().enable_notification(&*memory)?;
                    let now = state
                        .get_queue()
                        .avail_idx(&*memory, std::sync::atomic::Ordering::Acquire)
                        .map(|i| i.0)
                        .unwrap_or(seen);
                    if now != seen {
                        continue;
                    }
                    break;
                }
                Some(false) => break,
                None => continue,
            }
        }
        if let Some(wait) = held {
            self.hold(Direction::Rx, wait);
        }
        if notify {
            if let Err(e) = rx.signal_used_queue() {
                log::debug!(
                    "{} pair {}: rx notify failed: {e}",
                    self.shared.config.id,
                    self.pair
                );
            }
        }
        Ok(())
    }

    /// A kick on the tx queue.
    pub fn process_tx(&mut self, tx: &CheckedVring) -> Result<(), WorkerError> {
        if tx.size_rejected() {
            return Ok(());
        }
        self.refresh_features();
        let started = Instant::now();
        self.poller.woke(started);
        let mut empty_passes = EmptyPasses::default();
        loop {
            let sent = match self.tx_pass(tx)? {
                TxPass::Sent(sent) => sent,
                TxPass::Held | TxPass::Stopped => return Ok(()),
            };
            // Counted before a full burst goes round again: a full burst between two empty
            // passes (a wake-up that found the ring drained, then the driver's next batch)
            // is progress, not a stall. (It once counted as one, and the ring was left with
            // kicks off: the driver never kicked again and the queue stopped for good.)
            if empty_passes.stalled(sent) {
                self.shared.stats.ring_error();
                // Kicks back on, whatever the ring shows: the driver's next publication
                // brings the next look (bounded work per kick on a ring that stays broken).
                let _ = tx.enable_notification();
                return Ok(());
            }
            if sent == TX_BURST {
                continue;
            }
            if self.in_group {
                // The busy-poll group looks at the ring from here; kicks stay off.
                return Ok(());
            }
            // Poll for more (`devices::poll`): after sending in adaptive mode, always when busy.
            let now = Instant::now();
            let window = self.poller.window(now);
            let spell_left = MAX_SPELL.saturating_sub(now.saturating_duration_since(started));
            let busy = self.poller.mode() == PollMode::Busy;
            let mut polled = Duration::ZERO;
            if !window.is_zero() && !spell_left.is_zero() && (sent > 0 || busy) {
                let memory = self.memory.memory();
                if self.poll_for_tx(tx, &memory, window.min(spell_left)) {
                    continue;
                }
                polled = now.elapsed();
                self.poller.missed(polled);
                if busy && !self.poller.window(now).is_zero() {
                    // Keep busy polling, but through the event loop, so a queue stop gets in.
                    if let Err(e) = self.repoll.write(1) {
                        log::warn!("{} pair {}: repoll: {e}", self.shared.config.id, self.pair);
                    }
                    return Ok(());
                }
            }
            if !tx.enable_notification()? {
                self.poller.sleeping(Instant::now(), polled);
                return Ok(());
            }
        }
    }

    /// Busy mode, not yet polled by the busy-poll group, its tx ring started, and within its
    /// poll budget.
    pub fn wants_group(&mut self, tx: &CheckedVring) -> bool {
        self.poller.mode() == PollMode::Busy
            && !self.in_group
            && serving(tx)
            && !self.poller.window(Instant::now()).is_zero()
    }

    /// The busy-poll group polls the tx ring from now on.
    pub fn joined_group(&mut self) {
        self.in_group = true;
        self.last_look = None;
    }

    /// The front-end stops queue `position` (GET_VRING_BASE): the group touches the tx ring
    /// no more (a restart's kick joins it again).
    pub fn stop_queue(&mut self, position: usize) {
        if position == 1 {
            self.in_group = false;
        }
    }

    /// One look at the tx ring for the busy-poll group: a burst if the guest queued frames;
    /// else the time since the last look counts against the poll budget, and once the budget
    /// is spent the ring goes back to kicks. A ring that is stopped, disabled or refused is
    /// left untouched.
    pub fn group_pass(&mut self, tx: &CheckedVring) -> crate::devices::shell::Pass {
        use crate::devices::shell::Pass;
        if !self.in_group || !serving(tx) {
            if self.in_group && !tx.size_rejected() {
                let mut state = tx.get_mut();
                if state.get_queue().ready() && !state.is_enabled() {
                    kicks_back_on(&mut state);
                }
            }
            self.in_group = false;
            return Pass::Leave;
        }
        let worked = if has_available(tx, &self.memory.memory()) {
            match self.tx_pass(tx) {
                Ok(TxPass::Sent(sent)) => sent,
                // QoS holds the ring (its timer resumes it on the worker's own thread), or it
                // stopped meanwhile (not ours to touch) or was refused (kicks already on).
                Ok(TxPass::Held | TxPass::Stopped) => {
                    self.in_group = false;
                    return Pass::Leave;
                }
                Err(e) => {
                    log::debug!("{} pair {}: tx: {e}", self.shared.config.id, self.pair);
                    return self.leave_group(tx);
                }
            }
        } else {
            0
        };
        if worked > 0 {
            self.last_look = None;
            // A part burst: the driver is likely still filling its next one, and a look at
            // once would take the avail ring's line from its core while it writes there
            // (measured: the drain row ran 4% slower without this pause).
            if worked < TX_BURST {
                std::hint::spin_loop();
            }
            return Pass::Worked;
        }
        let now = Instant::now();
        let since = self
            .last_look
            .map_or(Duration::ZERO, |last| now.saturating_duration_since(last));
        self.last_look = Some(now);
        self.poller.missed(since);
        if self.poller.window(now).is_zero() {
            return self.leave_group(tx);
        }
        Pass::Idle
    }

    /// Back to kicks: notifications on, and frames that came meanwhile (which will bring no
    /// kick) are served by the worker's own thread through its repoll event.
    fn leave_group(&mut self, tx: &CheckedVring) -> crate::devices::shell::Pass {
        self.in_group = false;
        self.poller.sleeping(Instant::now(), Duration::ZERO);
        if matches!(tx.enable_notification(), Ok(true)) {
            if let Err(e) = self.repoll.write(1) {
                log::warn!("{} pair {}: repoll: {e}", self.shared.config.id, self.pair);
            }
        }
        crate::devices::shell::Pass::Leave
    }

    /// One burst from the tx ring (notifications off).
    fn tx_pass(&mut self, tx: &CheckedVring) -> Result<TxPass, WorkerError> {
        // One lock of the ring per pass.
        let mut state = tx.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            if state.get_queue().ready() {
                kicks_back_on(&mut state);
            }
            return Ok(TxPass::Stopped);
        }
        // The avail index before the memory snapshot (see `Burst::up_to`).
        let end = avail_index(state.get_queue(), &self.memory);
        let memory = self.memory.memory();
        let map = MemMap::new(&memory);
        let dirty = Arc::clone(&self.log);
        let served = Burst::bounded(state.get_queue_mut(), &map, end).map(|burst| {
            let mut burst = burst
                .with_log(Some(&dirty))
                .limit_walk(MAX_CHAIN_DESCRIPTORS);
            burst.suppress_kicks();
            let sent_held = self.tx_burst(&mut burst, &memory);
            (sent_held, burst.finish())
        });
        let (sent, held) = match served {
            Ok((sent_held, signal)) => {
                if signal {
                    if let Err(e) = tx.signal_locked(&state) {
                        log::debug!(
                            "{} pair {}: tx notify failed: {e}",
                            self.shared.config.id,
                            self.pair
                        );
                    }
                }
                sent_held
            }
            Err(e) => {
                self.shared.stats.ring_error();
                log::debug!("{} pair {}: tx ring: {e}", self.shared.config.id, self.pair);
                // Kicks on: if the front-end fixes the ring, its next kick reaches us.
                state.enable_notification()?;
                return Ok(TxPass::Stopped);
            }
        };
        drop(state);
        if let Some(wait) = held {
            self.hold(Direction::Tx, wait);
            return Ok(TxPass::Held);
        }
        Ok(TxPass::Sent(sent))
    }

    /// Spins (notifications off) until the guest queues more frames (true) or `window`
    /// passes (false).
    fn poll_for_tx(&self, tx: &CheckedVring, memory: &GuestMemory, window: Duration) -> bool {
        let look = || -> Result<Look, std::convert::Infallible> {
            Ok(if has_available(tx, memory) {
                Look::Work
            } else {
                Look::Nothing
            })
        };
        matches!(spin(window, look), Ok(true))
    }

    /// Takes up to [`TX_BURST`] chains from the tx ring, sends the good frames (to the tap
    /// one `writev` each, into the switch as one burst) and returns every chain. Returns how
    /// many chains were taken, and the wait if QoS stopped the burst.
    fn tx_burst(
        &mut self,
        burst: &mut Burst<'_, '_, '_>,
        memory: &GuestMemory,
    ) -> (usize, Option<Duration>) {
        let stats = &self.shared.stats;
        let mtu = self.shared.config.mtu;
        let map = burst.map();
        self.tx_frames.clear();
        self.tx_bad.clear();
        let mut taken = 0usize;
        let mut held = None;
        let mut bytes = 0u64;
        burst.prefetch_start(TX_BURST as u16, false);
        while taken < TX_BURST {
            burst.prefetch(PREFETCH_AHEAD, false);
            let slot = self.tx_frames.next_free();
            // The usual chain first, one readable buffer: one descriptor load, no walk.
            let (head, checked) = match burst.pop_single(false, 0) {
                Ok(Some((head, addr, len))) => {
                    let one = [Buffer {
                        addr: GuestAddress(addr),
                        len,
                        writable: false,
                    }];
                    (head, tx_frame_into(memory, map, &one, mtu, &mut slot.frame))
                }
                _ => match burst.pop(&mut self.descs) {
                    Ok(Some((head, walked))) => (
                        head,
                        walked.map_err(|_| Drop::BrokenChain).and_then(|()| {
                            tx_frame_into(memory, map, &self.descs, mtu, &mut slot.frame)
                        }),
                    ),
                    Ok(None) => break,
                    Err(e) => {
                        stats.ring_error();
                        log::debug!("{} pair {}: tx ring: {e}", self.shared.config.id, self.pair);
                        break;
                    }
                },
            };
            // TX_BURST fits a u16.
            let position = u16::try_from(taken).unwrap_or(u16::MAX);
            match checked {
                Err(reason) => self.tx_bad.push((position, head, reason)),
                Ok(()) => {
                    bytes = bytes.saturating_add(u64::from(slot.frame.frame_len));
                    slot.head = head;
                    slot.position = position;
                    self.tx_frames.keep();
                }
            }
            taken = taken.saturating_add(1);
        }
        // QoS: the whole burst in one charge when it fits (one lock, one clock read); else
        // frame by frame in ring order, and from the first frame refused on, every chain goes
        // back to the ring until the timer (the guest sees a full queue: back-pressure, no
        // drop).
        let qos = &self.shared.qos;
        let cost = |bytes| Cost {
            kind: CostKind::Tx,
            bytes,
        };
        let mut now = None;
        let frames = self.tx_frames.len() as u64;
        if !admit_batch(qos, cost(bytes), frames, &mut now) {
            let burst_frames = self.tx_frames.used();
            let refused = burst_frames.iter().position(|TxSlot { frame, .. }| {
                let single = Some(cost(u64::from(frame.frame_len)));
                match self.gate.admit(qos, single, &mut now) {
                    Ok(()) => false,
                    Err(wait) => {
                        held = Some(wait);
                        true
                    }
                }
            });
            if let Some(k) = refused {
                let from = burst_frames.get(k).map_or(0, |slot| slot.position);
                let back = taken.saturating_sub(usize::from(from));
                burst.unpop(u16::try_from(back).unwrap_or(u16::MAX));
                taken = usize::from(from);
                self.tx_frames.truncate(k);
                self.tx_bad.retain(|&(position, _, _)| position < from);
            }
        }
        for &(_, _, reason) in &self.tx_bad {
            stats.dropped(Direction::Tx, reason);
        }
        let burst_frames = self.tx_frames.used();
        match &mut self.backend {
            PairBackend::Tap(tap) => {
                for TxSlot { frame, .. } in burst_frames {
                    // Our copies of its virtio and Ethernet headers, then the guest's bytes.
                    match tap.send(&guest_frame(memory, map, frame)) {
                        Ok(()) => stats.sent(u64::from(frame.frame_len)),
                        Err(reason) => stats.dropped(Direction::Tx, reason),
                    }
                }
                if !tap.is_up() {
                    self.shared.set_link(false);
                }
            }
            PairBackend::Switch { hub, port, .. } => {
                let frames = SlotFrames {
                    memory,
                    map,
                    slots: burst_frames,
                };
                let mut refused: SmallVec<[bool; MAX_BURST]> = smallvec![false; burst_frames.len()];
                hub.transmit_burst(port, &frames, |i, reason| {
                    stats.dropped(Direction::Tx, reason);
                    if let Some(r) = refused.get_mut(usize::from(i)) {
                        *r = true;
                    }
                });
                let mut sent = Tally::default();
                for (TxSlot { frame, .. }, refused) in burst_frames.iter().zip(&refused) {
                    if !refused {
                        sent.add(u64::from(frame.frame_len));
                    }
                }
                stats.sent_tally(sent);
            }
        }
        // Every chain goes back in the order it was taken, refused ones included: we offer
        // VIRTIO_F_IN_ORDER, and a driver that took it frees its buffers by position.
        let mut bad = self.tx_bad.iter().peekable();
        for slot in burst_frames {
            while let Some(&(_, head, _)) = bad.next_if(|&&(at, _, _)| at < slot.position) {
                burst.used(head, 0);
            }
            burst.used(slot.head, 0);
        }
        for &(_, head, _) in bad {
            burst.used(head, 0);
        }
        (taken, held)
    }
}

/// A checked frame of the tx burst: its chain's head and position in the burst.
#[derive(Default)]
struct TxSlot {
    head: u16,
    /// Chains taken before it in this burst (what goes back to the ring if QoS refuses it).
    position: u16,
    frame: TxFrame,
}

/// A tx ring found started but disabled (SET_VRING_ENABLE 0, e.g. a guest's `ethtool -L`
/// down): kicks back on before we stop looking at it. We may have left it asking for none
/// (the no-kick flag, or EVENT_IDX's `avail_event` behind the driver), and once it is enabled
/// again nothing but a kick brings us back to it. (A started ring may be written: the flag
/// is ours; vhost-user-backend re-arms the kick fd at enable, and a kick that came meanwhile
/// waits in it.)
fn kicks_back_on(state: &mut vhost_user_backend::VringState<crate::vring::AtomicGuestMemory>) {
    if let Err(e) = state.enable_notification() {
        log::debug!("tx ring disabled: kicks not turned back on: {e}");
    }
}

/// Whether the worker may serve `tx` now: started (ready), enabled, and not refused.
fn serving(tx: &CheckedVring) -> bool {
    if tx.size_rejected() {
        return false;
    }
    let state = tx.get_ref();
    state.get_queue().ready() && state.is_enabled()
}

/// A checked tx frame as the switch and the tap see it.
fn guest_frame<'a>(
    memory: &'a GuestMemory,
    map: &'a MemMap<'a>,
    frame: &'a TxFrame,
) -> FrameRef<'a> {
    FrameRef::Guest {
        memory,
        map: Some(map),
        frame,
    }
}

/// A burst's checked tx slots as the switch reads them (each frame made on demand: no list
/// of frames built per burst).
struct SlotFrames<'a> {
    memory: &'a GuestMemory,
    map: &'a MemMap<'a>,
    slots: &'a [TxSlot],
}

impl Frames for SlotFrames<'_> {
    fn count(&self) -> usize {
        self.slots.len()
    }

    fn frame(&self, i: usize) -> Option<FrameRef<'_>> {
        let slot = self.slots.get(i)?;
        Some(guest_frame(self.memory, self.map, &slot.frame))
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
