//! Block storage engines: how a request's bytes move between guest memory and the backing.
//!
//! An [`Engine`] takes [`IoOp`]s whose iovecs point straight into mapped guest memory (no
//! bounce buffers) and reports one [`Completion`] per op. Engines finish an op completely or
//! fail it: a short read or write is continued from where it stopped, a read past the end of
//! the file fills the rest with zeros, and a write that makes no progress fails with `EIO`.
//!
//! ```text
//!   worker ──push(op)──▶ engine ──submit()──▶ kernel (io_uring SQ, or inline syscalls)
//!   worker ◀──reap()──── engine ◀──────────── kernel (CQ; eventfd wakes the worker's epoll)
//! ```
//!
//! Engines: [`uring::UringEngine`] (one ring per queue worker, batched submission, many ops in
//! flight), [`sync::SyncEngine`] (blocking syscalls on the worker thread, for hosts without
//! io_uring) and [`null::NullEngine`] (no storage at all).

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

pub mod backing;
pub mod image_lock;
pub mod iov;
pub mod null;
pub mod open;
pub mod rbd;
pub mod reorder;
pub mod sync;
pub mod tier;
pub mod uring;
pub mod volatile;

use std::os::fd::RawFd;

pub use iov::GuestIovecs;
pub use open::{open_engine, EngineKind, EngineSource};

/// Errors from an engine itself (not from one op: those are [`Completion`] errnos).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Creating or registering the io_uring failed.
    #[error("cannot set up io_uring")]
    Setup(#[source] std::io::Error),
    /// `io_uring_enter` failed.
    #[error("io_uring submission failed")]
    Submit(#[source] std::io::Error),
}

/// What an op does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Read into the iovecs from `offset`.
    Read {
        /// Byte offset in the backing.
        offset: u64,
    },
    /// Write the iovecs at `offset`.
    Write {
        /// Byte offset in the backing.
        offset: u64,
    },
    /// `fdatasync`: make every write completed before this op durable.
    Flush,
    /// Deallocate a range (punch a hole); reads of it return zeros afterwards.
    Discard {
        /// Byte offset in the backing.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Make a range read as zeros; `unmap` allows freeing the space (punch a hole).
    WriteZeroes {
        /// Byte offset in the backing.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Whether the range may be deallocated.
        unmap: bool,
    },
}

/// One operation handed to an engine.
#[derive(Debug)]
pub struct IoOp {
    /// What to do.
    pub kind: OpKind,
    /// Guest buffers for reads and writes; empty otherwise.
    pub iovecs: GuestIovecs,
    /// Returned unchanged in the op's completion.
    pub tag: u64,
}

/// The outcome of one op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The op's tag.
    pub tag: u64,
    /// `Ok` when every byte was transferred, else the errno.
    pub result: Result<(), i32>,
}

/// Work an engine did beyond its ops' own bytes (see [`Engine::take_extra_work`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtraWork {
    /// Bytes read on the guest's behalf (cold records decompressed for its reads).
    pub read: u64,
    /// Bytes written on the guest's behalf (extents promoted before its writes).
    pub write: u64,
}

/// An I/O engine bound to one backing and used by one queue worker.
pub trait Engine: Send {
    /// Short name for logs and `daemon.info`.
    fn name(&self) -> &'static str;

    /// Queues `op`. It may run at once (sync engines) or at the next [`Engine::submit`].
    ///
    /// # Safety
    /// Every iovec must point to memory that is valid for reads (writes) or writes (reads),
    /// not accessed by the caller, and stays mapped until the op's completion is reaped.
    unsafe fn push(&mut self, op: IoOp);

    /// Hands queued ops to the kernel in one batch. Engines that run ops inside `push` have
    /// nothing to do.
    fn submit(&mut self) -> Result<(), EngineError> {
        Ok(())
    }

    /// An eventfd that becomes readable when completions are ready; `None` (the default) when
    /// completions are always ready right after `push` (inline engines).
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    /// Resets the completion eventfd after it woke the worker (engines without one: no-op).
    fn acknowledge_notification(&mut self) {}

    /// Whether completions are waiting to be reaped (checked while polling; cheap).
    fn completions_pending(&mut self) -> bool {
        false
    }

    /// Moves finished ops' completions into `out`.
    fn reap(&mut self, out: &mut Vec<Completion>);

    /// Ops pushed and not yet reaped.
    fn in_flight(&self) -> usize;

    /// Backend work done beyond the ops' own bytes since the last call (a tiered disk's
    /// promotions and decompressions on the I/O path), for the worker to charge to QoS byte
    /// limits after the fact. Plain engines do none.
    fn take_extra_work(&mut self) -> ExtraWork {
        ExtraWork::default()
    }

    /// Blocks until every op pushed so far has completed, moving completions into `out`.
    fn drain(&mut self, out: &mut Vec<Completion>);
}

/// What an engine that runs each op to completion inside `push` supplies (blocking
/// syscalls, the null device, the test cache model); [`Inline`] turns it into an [`Engine`].
pub trait RunInline: Send {
    /// Short name for logs and `daemon.info`.
    fn name(&self) -> &'static str;

    /// Runs one op to completion; `Err(errno)` fails it.
    ///
    /// # Safety
    /// As for [`Engine::push`].
    unsafe fn run(&mut self, op: IoOp) -> Result<(), i32>;
}

/// An [`Engine`] over a [`RunInline`]: ops run inside `push`, their completions wait in order
/// for the next reap; nothing is ever in flight in the kernel.
#[derive(Debug, Default)]
pub struct Inline<E> {
    engine: E,
    done: std::collections::VecDeque<Completion>,
}

impl<E> Inline<E> {
    /// An engine running `engine`'s ops inline.
    pub fn wrap(engine: E) -> Self {
        Self {
            engine,
            done: std::collections::VecDeque::new(),
        }
    }
}

impl<E: RunInline> Engine for Inline<E> {
    fn name(&self) -> &'static str {
        self.engine.name()
    }

    unsafe fn push(&mut self, op: IoOp) {
        let tag = op.tag;
        // SAFETY: forwarded from the caller of `push`.
        let result = unsafe { self.engine.run(op) };
        self.done.push_back(Completion { tag, result });
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.extend(self.done.drain(..));
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn drain(&mut self, out: &mut Vec<Completion>) {
        self.reap(out);
    }
}

/// Reports whether io_uring can be used on this host (kernel support, seccomp, limits), the
/// way `uring::UringEngine` sets its rings up: created disabled and restricted (Linux 5.10+).
pub fn uring_available() -> bool {
    use io_uring::register::Restriction;
    let Ok(ring) = io_uring::IoUring::<io_uring::squeue::Entry>::builder()
        .setup_r_disabled()
        .build(2)
    else {
        return false;
    };
    let mut restrictions = [Restriction::sqe_flags_allowed(0)];
    ring.submitter()
        .register_restrictions(&mut restrictions)
        .and_then(|()| ring.submitter().register_enable_rings())
        .is_ok()
}
