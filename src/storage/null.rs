//! The null engine: reads fill the guest buffers with zeros, everything else succeeds at once.
//! Like SPDK's null bdev or QEMU's `null-co,read-zeroes=on`, it measures the data path alone.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use super::iov::IovCursor;
use super::{Inline, IoOp, OpKind, RunInline};

/// An engine with no storage behind it.
/// Reads zeros, drops writes.
#[derive(Debug, Default)]
pub struct Null;

/// The null device's engine.
pub type NullEngine = Inline<Null>;

impl RunInline for Null {
    fn name(&self) -> &'static str {
        "null"
    }

    unsafe fn run(&mut self, op: IoOp) -> Result<(), i32> {
        if let OpKind::Read { .. } = op.kind {
            // SAFETY: the caller of `run` guarantees read iovecs are writable and exclusive.
            unsafe { IovCursor::new(op.iovecs).zero_remaining() };
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;
    use crate::storage::sync::tests::op;
    use crate::storage::Engine;

    #[test]
    fn reads_are_zero_writes_vanish() {
        let mut engine = NullEngine::default();
        let mut buf = [5u8; 64];
        // SAFETY: `buf` outlives the reap.
        unsafe {
            engine.push(op(OpKind::Read { offset: 0 }, &mut buf, 1));
            engine.push(op(OpKind::Write { offset: 0 }, &mut buf, 2));
        }
        let mut out = Vec::new();
        engine.reap(&mut out);
        assert_eq!(out.len(), 2);
        assert!(buf.iter().all(|&x| x == 0));
    }
}
