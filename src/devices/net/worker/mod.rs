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
//!
//! - `tx.rs`: the tx ring out, a burst per pass (to the tap or into the switch);
//! - `tap_rx.rs`: the tap's frames into the rx ring.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::Arc;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

use super::fabric::{Port, SwitchHub};
use super::rx::RxBatch;
use super::rx::RxTarget;
use super::shared::NetShared;
use super::slots::Slots;
use super::spec::Negotiated;
use super::stats::{Direction, Drop};
use super::tap_queue::TapQueue;
use crate::devices::desc::Buffers;
use crate::qos::gate::Gate;
use crate::qos::timer::TimerError;
use crate::ring::dirty::DirtyLog;
use crate::storage::GuestIovecs;
use crate::vring::{AtomicGuestMemory, CheckedVring, EmptyPasses};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::devices::poll::{PollMode, Poller, MAX_SPELL};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

mod tap_rx;
mod tx;

use tx::{TxPass, TxSlot, TX_BURST};

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
    /// When the group last looked at the tx ring and found nothing: a fruitless look is
    /// charged the gap since against the poll budget. `None` after a look that worked: the
    /// first fruitless look after it is charged nothing (the ring was being served until
    /// then; a run of fruitless looks is charged from its first one on).
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
    /// else the time since the last fruitless look (see `last_look`) counts against the poll
    /// budget, and once the budget is spent the ring goes back to kicks. The group lets go of
    /// a ring that is disabled (with kicks back on: `tx_pass`), stopped or refused (untouched).
    pub fn group_pass(&mut self, tx: &CheckedVring) -> crate::devices::shell::Pass {
        use crate::devices::shell::Pass;
        if !self.in_group || tx.size_rejected() {
            self.in_group = false;
            return Pass::Leave;
        }
        // One lock of the ring and one avail-index read per look, idle or not (a pass that
        // finds nothing new returns after the read).
        let worked = match self.tx_pass(tx) {
            Ok(TxPass::Sent(sent)) => sent,
            // QoS holds the ring (its timer resumes it on the worker's own thread), or it
            // stopped or was disabled meanwhile (kicks back on; not ours to touch further) or
            // was refused (kicks already on).
            Ok(TxPass::Held | TxPass::Stopped) => {
                self.in_group = false;
                return Pass::Leave;
            }
            Err(e) => {
                log::debug!("{} pair {}: tx: {e}", self.shared.config.id, self.pair);
                return self.leave_group(tx);
            }
        };
        if worked > 0 {
            // No clock read on a pass that worked: two reads per pass were 2.7% of the busy
            // element's 64-byte forwarding profile.
            self.last_look = None;
            return if worked == TX_BURST {
                Pass::Worked
            } else {
                // A part burst: the driver is likely still filling its next one.
                Pass::Drained
            };
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

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests;
