//! Descriptor chains reduced to plain buffers, shared by every device's parser.
//!
//! Both devices' queues walk chains with `ring::split` into [`Buffers`]. [`collect_buffers`]
//! reduces virtio-queue's own walk to the same form: the reference our ring engine is tested
//! and fuzzed against (`ring::split` tests, the `ring_split` fuzz target), and the parser's
//! unit tests' way of building requests. It only notices when the walk stopped early, which
//! virtio-queue signals by ending the iterator on a descriptor that still has `NEXT` set.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use smallvec::SmallVec;
use vm_memory::GuestAddress;

/// A descriptor reduced to what parsing needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// A chain's buffers; most chains are short, so they live on the stack.
pub type Buffers = SmallVec<[Buffer; 8]>;

/// The chain was cut short: a loop, an over-long chain, or a broken or nested indirect table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokenChain;

/// Collects a chain's buffers; `Err(BrokenChain)` if the walk stopped while the last
/// descriptor still pointed to a next one, or the chain was empty.
pub fn collect_buffers(
    chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
) -> Result<Buffers, BrokenChain> {
    let mut buffers = Buffers::new();
    let mut truncated = false;
    for desc in chain {
        truncated = desc.has_next();
        buffers.push(Buffer {
            addr: desc.addr(),
            len: desc.len(),
            writable: desc.is_write_only(),
        });
    }
    if truncated || buffers.is_empty() {
        Err(BrokenChain)
    } else {
        Ok(buffers)
    }
}
