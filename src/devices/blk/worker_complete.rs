//! A queue worker's completions: engine ops reaped into their requests' in-flight records,
//! finished requests returned to the driver in one burst (status bytes, used entries, one
//! used-index store, the inflight record, at most one interrupt).
//! (Split from `worker.rs`; the same `QueueWorker`.)

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

// The parent's imports and private types: this is part of the worker, in its own file.
use super::*;

impl QueueWorker {
    pub(super) fn reap_and_complete(&mut self, vring: &CheckedVring) -> Result<(), WorkerError> {
        self.engine.reap(&mut self.completions);
        self.complete_engine_ops();
        self.return_finished(vring)
    }

    pub(super) fn complete_engine_ops(&mut self) {
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
    pub(super) fn return_finished(&mut self, vring: &CheckedVring) -> Result<(), WorkerError> {
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
            // A failed signal (a full counter: one is pending; a call fd the front-end made
            // blocking: refused) is the front-end's business, not an error of this worker
            // (which would log at error level on every batch).
            if let Err(e) = vring.signal_used_queue() {
                log::debug!(
                    "{}: queue {}: signal: {e}",
                    self.shared.id,
                    self.queue_index
                );
            }
        }
        Ok(())
    }
}
