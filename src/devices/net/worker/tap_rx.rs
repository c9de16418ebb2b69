//! The tap's frames into the guest's rx ring: a burst of chains per lock of the ring,
//! one `readv` per frame, QoS charged per frame (a probe before the read, the bytes after).

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::Arc;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

use crate::devices::net::header::{HEADER_LEN, MAX_GSO_FRAME};
use crate::devices::net::rx::{Gathered, Header};
use crate::devices::net::spec::MAX_CHAIN_DESCRIPTORS;
use crate::devices::net::stats::{Direction, Drop};
use crate::devices::sg::host_iovecs;
use crate::qos::limiter::{Cost, CostKind};
use crate::ring::burst::Burst;
use crate::ring::map::MemMap;
use crate::vring::{avail_index, CheckedVring};

use super::{PairBackend, PairWorker, WorkerError};

/// What a frame from the tap costs before its size is known: one packet and one byte (the
/// rest of its bytes is charged once read, possibly into debt). The byte makes a byte
/// bucket in debt hold the next frame back: a zero-byte cost passes any byte bucket (a
/// flush against a byte limit costs nothing), and `rx-bps` on a tap once never held.
const RX_PROBE: Cost = Cost {
    kind: CostKind::Rx,
    bytes: 1,
};

/// Most frames read from the tap per burst of the rx ring.
const RX_BURST: usize = 64;

impl PairWorker {
    /// Largest frame (header included) the tap may hand this guest.
    fn max_rx_len(&self) -> u64 {
        let frame = if self.negotiated.tap_offloads() & !crate::sys::tap::offload::CSUM != 0 {
            MAX_GSO_FRAME as u64
        } else {
            u64::from(self.shared.config.mtu).saturating_add(14 + 4)
        };
        frame.saturating_add(HEADER_LEN as u64)
    }

    pub(super) fn receive_from_tap(&mut self, rx: &CheckedVring) -> Result<(), WorkerError> {
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
}
