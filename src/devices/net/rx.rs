//! Filling a guest's receive queue: take enough rx chains for a frame, let the caller put the
//! bytes in (a tap `readv` straight into them, or a guest-to-guest copy from a switch port),
//! then return exactly the chains used, with `num_buffers` set, in one step.
//!
//! Without `VIRTIO_NET_F_MRG_RXBUF` a frame must fit one chain. With it, a frame may span
//! several chains; they are published together (see [`add_used_batch`]). Chains taken but not
//! needed are put back (the ring's next-avail index is rewound), so nothing the guest posted is
//! wasted. A malformed chain is returned with length 0 and counted; chains taken before it in
//! the same batch go back with length 0 too (they cannot be put back past it) — this only
//! happens to a guest that posts bad buffers.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::num::Wrapping;

use virtio_queue::{Queue, QueueT};

use super::frame::{rx_buffer, RxBuffer};
use super::header::HEADER_LEN;
use super::stats::Drop;
use crate::devices::desc::collect_buffers;
use crate::vring::{add_used_batch, GuestMemory};

/// Chains taken for one frame.
#[derive(Debug, Default)]
pub struct RxBatch {
    buffers: Vec<RxBuffer>,
    capacity: u64,
}

/// What [`RxBatch::gather`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gathered {
    /// Enough room for the frame.
    Ready,
    /// The ring ran out first; everything taken was put back.
    Empty,
}

impl RxBatch {
    /// The chains taken so far.
    pub fn buffers(&self) -> &[RxBuffer] {
        &self.buffers
    }

    /// Their total room.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Takes chains until they hold `need` bytes (header included). Without mergeable
    /// buffers one chain is taken, whatever its size: the caller checks it. `bad` is told
    /// about each malformed chain (already returned to the guest with length 0).
    pub fn gather(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemory,
        need: u64,
        mergeable: bool,
        mut bad: impl FnMut(Drop),
    ) -> Result<Gathered, virtio_queue::Error> {
        self.buffers.clear();
        self.capacity = 0;
        loop {
            if !self.buffers.is_empty() && (!mergeable || self.capacity >= need) {
                return Ok(Gathered::Ready);
            }
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                self.put_back(queue);
                return Ok(Gathered::Empty);
            };
            let head = chain.head_index();
            let checked = collect_buffers(chain)
                .map_err(|_| Drop::BrokenChain)
                .and_then(|buffers| rx_buffer(memory, head, &buffers));
            match checked {
                Ok(buffer) => {
                    self.capacity = self.capacity.saturating_add(u64::from(buffer.capacity));
                    self.buffers.push(buffer);
                }
                Err(reason) => {
                    bad(reason);
                    let mut returned: smallvec::SmallVec<[(u16, u32); 8]> =
                        self.buffers.drain(..).map(|b| (b.head, 0)).collect();
                    returned.push((head, 0));
                    self.capacity = 0;
                    add_used_batch(queue, memory, &returned)?;
                }
            }
        }
    }

    /// Puts every chain taken back into the ring.
    pub fn put_back(&mut self, queue: &mut Queue) {
        rewind(queue, self.buffers.len());
        self.buffers.clear();
        self.capacity = 0;
    }

    /// Returns the chains holding the first `len` bytes (header included) to the guest and
    /// puts the rest back. Writes `num_buffers` into the header first. Returns whether the
    /// guest wants a notification.
    pub fn commit(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemory,
        len: u64,
    ) -> Result<bool, virtio_queue::Error> {
        let mut used: smallvec::SmallVec<[(u16, u32); 8]> = smallvec::SmallVec::new();
        let mut left = len;
        for buffer in &self.buffers {
            if left == 0 && !used.is_empty() {
                break;
            }
            let take = left.min(u64::from(buffer.capacity));
            // `take <= capacity`, a u32.
            used.push((buffer.head, u32::try_from(take).unwrap_or(u32::MAX)));
            left = left.saturating_sub(take);
        }
        let count = u16::try_from(used.len()).unwrap_or(u16::MAX);
        if let Some(first) = self.buffers.first() {
            // `num_buffers` is the last field of the 12-byte header; the chain was checked
            // to hold the header, so this cannot fail on a valid map.
            let offset = (HEADER_LEN as u64).saturating_sub(2);
            if super::frame::write_stream(memory, &first.spans, offset, &count.to_le_bytes())
                .is_err()
            {
                log::debug!("rx header write failed");
            }
        }
        let unused = self.buffers.len().saturating_sub(used.len());
        // Rewind before publishing: the unused chains were taken after the used ones.
        rewind(queue, unused);
        self.buffers.clear();
        self.capacity = 0;
        add_used_batch(queue, memory, &used)
    }
}

/// Moves the ring's next-avail index back by `count` chains.
fn rewind(queue: &mut Queue, count: usize) {
    if count == 0 {
        return;
    }
    // At most a ring's worth of chains is ever taken, which fits in u16.
    let count = Wrapping(u16::try_from(count).unwrap_or(u16::MAX));
    let next = Wrapping(queue.next_avail()) - count;
    queue.set_next_avail(next.0);
}
