//! The guest's tx ring out: a burst of chains per pass, each frame checked into a slot,
//! QoS charged per burst, the good frames sent to the tap or into the switch as one burst,
//! and every chain returned in the order it was taken.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::Arc;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace};

use crate::devices::desc::Buffer;
use crate::devices::net::fabric::MAX_BURST;
use crate::devices::net::frame::{tx_frame_into, FrameRef, Frames, TxFrame};
use crate::devices::net::spec::MAX_CHAIN_DESCRIPTORS;
use crate::devices::net::stats::{Direction, Drop, Tally};
use crate::qos::gate::admit_batch;
use crate::qos::limiter::{Cost, CostKind};
use crate::ring::burst::{Burst, PREFETCH_AHEAD};
use crate::ring::map::MemMap;
use crate::vring::{avail_index, has_available, CheckedVring, GuestMemory};
use smallvec::{smallvec, SmallVec};
use std::time::Duration;

use crate::devices::poll::{spin, Look};

use super::{kicks_back_on, PairBackend, PairWorker, WorkerError};

/// Most tx chains handled per burst (one used-index store and at most one interrupt each);
/// the switch takes a burst this size at once.
pub(super) const TX_BURST: usize = MAX_BURST;

/// What one tx burst did.
pub(super) enum TxPass {
    /// This many chains were taken.
    Sent(usize),
    /// QoS holds the ring (the timer resumes it).
    Held,
    /// The ring is stopped, disabled or broken (kicks back on for a disabled or broken one).
    Stopped,
}

impl PairWorker {
    /// One burst from the tx ring; kicks off while it serves (`Burst::suppress_kicks`). A
    /// pass that finds the avail index where it was returns `Sent(0)` after that one read,
    /// leaving the ring as it was (the group's idle look, the kick path's last look).
    pub(super) fn tx_pass(&mut self, tx: &CheckedVring) -> Result<TxPass, WorkerError> {
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
        if end == Some(state.get_queue().next_avail()) {
            // Nothing new: no ring view, no kick flag written.
            return Ok(TxPass::Sent(0));
        }
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
    pub(super) fn poll_for_tx(
        &self,
        tx: &CheckedVring,
        memory: &GuestMemory,
        window: Duration,
    ) -> bool {
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
pub(super) struct TxSlot {
    head: u16,
    /// Chains taken before it in this burst (what goes back to the ring if QoS refuses it).
    position: u16,
    frame: TxFrame,
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
