//! A queue worker's start: taking the disk image (a migration's running side) and
//! recovering what a previous process left in flight from the front-end's inflight region.
//! (Split from `worker.rs`; the same `QueueWorker`.)

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

// The parent's imports and private types: this is part of the worker, in its own file.
use super::*;

impl QueueWorker {
    /// At the queue's start: takes the image (the running side of a migration writes it;
    /// `storage::image_lock`), then recovers what a previous process left in flight.
    pub(super) fn start_queue(&mut self, vring: &CheckedVring) {
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
    pub(super) fn recover_inflight(&mut self, vring: &CheckedVring) {
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
}
