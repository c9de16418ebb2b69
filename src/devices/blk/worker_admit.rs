//! A queue worker's QoS admission: requests a pop pass parsed are charged to the device's
//! limits in one batch per kind when they all fit, else one by one in ring order, the first
//! refused and everything behind it held in the gate until the timer says tokens are back.
//! (Split from `worker.rs`; the same `QueueWorker`.)

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

// The parent's imports and private types: this is part of the worker, in its own file.
use super::*;
use crate::qos::credit::Credit;

/// A parsed request waiting for QoS tokens.
pub(super) struct Deferred {
    pub(super) head: u16,
    pub(super) request: Request,
    /// Keeps the request's guest mappings alive.
    pub(super) memory: Arc<GuestMemory>,
}

impl QueueWorker {
    /// Starts the waiting requests the limiter now allows.
    pub(super) fn release_throttled(&mut self) {
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
    pub(super) fn admit(&mut self, head: u16, request: Request, memory: &Arc<GuestMemory>) {
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

    /// A credit for a pass of a limited device whose gate holds nothing (`qos::credit`).
    pub(super) fn take_credit(&self) -> Option<Credit> {
        if !self.shared.qos.is_enabled() || self.gate.is_holding() {
            return None;
        }
        Some(Credit::new(crate::sys::clock::ns_at(self.clock?)))
    }

    /// Pays `cost` from `credit`. False: the request waits for its chunk's charge, and so
    /// does the rest of the pass; the credit has ended (what it held is back in the buckets,
    /// where the chunk's charge may need it).
    pub(super) fn spend_credit(&self, credit: &mut Option<Credit>, cost: Option<Cost>) -> bool {
        let paid = match (credit.as_mut(), cost) {
            (Some(credit), Some(cost)) => credit.spend(&self.shared.qos, cost),
            // Costs nothing (a request refused and answered at once).
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !paid {
            if let Some(credit) = credit.take() {
                credit.give_back(&self.shared.qos);
            }
        }
        paid
    }

    /// Admits the requests the pass parsed: with QoS, in one charge per kind (reads, writes)
    /// when the limits allow them all (one lock and no clock read per request), else one by
    /// one in ring order, the first refused and everything behind it held (`admit`).
    pub(super) fn admit_pass(&mut self, memory: &Arc<GuestMemory>) {
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
    pub(super) fn admit_batch(&self, pass: &[(u16, Request)], now: &mut Option<u64>) -> bool {
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
    pub(super) fn charge_extra_work(&mut self) {
        let work = self.engine.take_extra_work();
        for (kind, bytes) in [(CostKind::Read, work.read), (CostKind::Write, work.write)] {
            if bytes > 0 {
                self.shared.qos.charge_bytes(Cost { kind, bytes });
            }
        }
    }

    pub(super) fn execute_deferred(&mut self, deferred: Deferred) {
        // Not part of a pop pass: its latency counts from now (never from a pass's clock).
        self.clock = None;
        let Deferred {
            head,
            request,
            memory,
        } = deferred;
        self.execute(head, request, &memory);
    }
}
