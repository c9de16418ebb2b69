//! The RBD engine: one per queue worker, all on the device's one [`RbdImage`].
//!
//! `push` hands an op to librbd at once (librbd queues it internally; there is no separate
//! submission step). Its completion runs [`complete`] on a librbd thread, which records the
//! result under a short lock, releases librbd's completion object and raises this engine's
//! eventfd — the worker's epoll wakes as it does for io_uring. The guest's iovecs go to
//! `rbd_aio_readv`/`rbd_aio_writev` unchanged and stay in the op's slot until it is reaped:
//! librbd reads or writes guest memory until it calls back, never after.
//!
//! librbd returns a read's full length (unallocated ranges read as zeros) or a negative
//! errno; a write, flush, discard or write-zeroes returns zero or a negative errno. There
//! are no short transfers to continue.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::VecDeque;
use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use slab::Slab;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::image::RbdImage;
use super::lib::{AioCompletion, Api, WRITE_ZEROES_THICK};
use crate::storage::{Completion, Engine, GuestIovecs, IoOp, OpKind};

/// Bytes of reads and writes one engine keeps in librbd at a time. librbd copies a write's
/// data (and reads into its own buffers) until the op completes, so without a bound a guest
/// posting a ring of huge requests would make the daemon allocate without limit. Ops past
/// the budget wait in the engine, in order, and go as earlier ones complete.
pub const IN_FLIGHT_BYTES: u64 = 64 << 20;

/// What completion callbacks share with their engine.
struct Done {
    api: &'static Api,
    /// (slot, librbd's return value) of finished ops, in completion order.
    results: Mutex<Vec<(usize, isize)>>,
    /// Raised when a result lands in an empty list (the worker then takes them all).
    eventfd: EventFd,
}

/// The callback argument of one op: which engine, which slot. Allocated once and reused
/// from op to op; librbd holds its address while the op runs.
struct Token {
    done: Arc<Done>,
    slot: usize,
}

/// A token's address, owned by the engine (created by `Box::into_raw`, freed in `Drop`).
struct TokenPtr(NonNull<Token>);

// SAFETY: a token is written only by its engine while no op of its is in flight, and read
// only by the one librbd callback of the op it was given to; moving the engine (and its
// pointers) to another thread changes neither.
unsafe impl Send for TokenPtr {}

/// An op librbd is working on.
struct Slot {
    tag: u64,
    kind: OpKind,
    /// The guest buffers librbd reads or writes until the op completes.
    _iovecs: GuestIovecs,
    /// Bytes it transfers (what a read must return; its share of the budget).
    bytes: u64,
    /// Its callback argument; back to the spares once the op is reaped.
    token: TokenPtr,
}

/// librbd's completion callback (`rbd_callback_t`).
///
/// # Safety
/// `arg` is the `Token` of a slot whose op has not been reaped: the engine keeps the token
/// (and so the `Done` it names) alive until it has seen this callback's result.
unsafe extern "C" fn complete(completion: AioCompletion, arg: *mut c_void) {
    // SAFETY: see the function's contract.
    let token = unsafe { &*arg.cast::<Token>() };
    // Our own reference: once the result is pushed the engine may reap the op, reuse the
    // token and even drop itself, while this thread still raises the eventfd.
    let done = Arc::clone(&token.done);
    let slot = token.slot;
    // SAFETY: `completion` is the live completion librbd passes to its own callback; it is
    // read and released once, here, and never used again.
    let ret = unsafe {
        let ret = (done.api.rbd_aio_get_return_value)(completion);
        (done.api.rbd_aio_release)(completion);
        ret
    };
    let first = {
        let mut results = done
            .results
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        results.push((slot, ret));
        results.len() == 1
    };
    // One wake-up per batch: results already waiting mean the worker has a wake-up coming
    // and takes them all (it empties the list under the same lock).
    if first {
        if let Err(e) = done.eventfd.write(1) {
            log::error!("rbd completion eventfd: {e}");
        }
    }
}

/// The RBD engine of one queue worker.
pub struct RbdEngine {
    image: Arc<RbdImage>,
    done: Arc<Done>,
    slots: Slab<Slot>,
    /// Callback arguments not in use, kept so an op costs no allocation of ours.
    spare_tokens: Vec<TokenPtr>,
    /// Ops waiting for budget, in arrival order, with their bytes.
    waiting: VecDeque<(IoOp, u64)>,
    /// Bytes of the ops in `slots`.
    in_flight_bytes: u64,
    /// Ops finished without librbd (empty transfers) or refused by it at submission.
    ready: Vec<Completion>,
    /// Scratch for taking results out from under the lock.
    taken: Vec<(usize, isize)>,
}

fn op_bytes(op: &IoOp) -> u64 {
    match op.kind {
        OpKind::Read { .. } | OpKind::Write { .. } => op
            .iovecs
            .iter()
            .fold(0u64, |sum, iov| sum.saturating_add(iov.iov_len as u64)),
        _ => 0,
    }
}

impl RbdEngine {
    /// An engine submitting to `image`.
    pub fn new(image: Arc<RbdImage>) -> std::io::Result<Self> {
        Ok(Self {
            done: Arc::new(Done {
                api: image.api(),
                results: Mutex::new(Vec::new()),
                eventfd: EventFd::new(EFD_NONBLOCK)?,
            }),
            image,
            slots: Slab::new(),
            spare_tokens: Vec::new(),
            waiting: VecDeque::new(),
            in_flight_bytes: 0,
            ready: Vec::new(),
            taken: Vec::new(),
        })
    }

    /// A token for slot `index`: a spare one, or a new one.
    fn token_for(&mut self, index: usize) -> TokenPtr {
        let token = self.spare_tokens.pop().unwrap_or_else(|| {
            TokenPtr(NonNull::from(Box::leak(Box::new(Token {
                done: Arc::clone(&self.done),
                slot: 0,
            }))))
        });
        // SAFETY: a spare or new token: no op of it is in flight, so no callback reads it.
        unsafe { (*token.0.as_ptr()).slot = index };
        token
    }

    /// Submits `op` (of `bytes` bytes) under a fresh completion; `Err(errno)` when librbd
    /// refused it.
    ///
    /// # Safety
    /// As for [`Engine::push`]: the iovecs stay valid until the op is reaped.
    unsafe fn submit_op(&mut self, op: IoOp, bytes: u64) -> Result<(), i32> {
        let api = self.done.api;
        let image = self.image.handle();
        let iov_count = c_int::try_from(op.iovecs.len()).map_err(|_| libc::EINVAL)?;
        let index = self.slots.vacant_key();
        let token = self.token_for(index);
        let mut completion: AioCompletion = std::ptr::null_mut();
        // SAFETY: the argument is the token's heap address, which stays valid (and its slot
        // field unchanged) until this op's result has been taken in `collect`.
        let ret = unsafe {
            (api.rbd_aio_create_completion)(token.0.as_ptr().cast(), complete, &mut completion)
        };
        if ret < 0 {
            self.spare_tokens.push(token);
            return Err(super::errno_code(ret.into()));
        }
        // SAFETY: (every arm) the image is open for as long as `self.image` is held; the
        // iovecs point at guest memory that the caller keeps mapped and untouched until this
        // op is reaped, and the array itself stays in the slot until then (librbd may read it
        // after the call returns); `completion` is fresh and owned by librbd from here on.
        let ret = unsafe {
            match op.kind {
                OpKind::Read { offset } => {
                    (api.rbd_aio_readv)(image, op.iovecs.as_ptr(), iov_count, offset, completion)
                }
                OpKind::Write { offset } => {
                    (api.rbd_aio_writev)(image, op.iovecs.as_ptr(), iov_count, offset, completion)
                }
                OpKind::Flush => (api.rbd_aio_flush)(image, completion),
                // librbd skips the parts of a discard that are not aligned to its
                // granularity; a discarded range must read back as zeros, so it is a
                // write-zeroes that may deallocate.
                OpKind::Discard { offset, len } => {
                    let len = usize::try_from(len).unwrap_or(usize::MAX);
                    (api.rbd_aio_write_zeroes)(image, offset, len, completion, 0, 0)
                }
                OpKind::WriteZeroes { offset, len, unmap } => {
                    let len = usize::try_from(len).unwrap_or(usize::MAX);
                    let flags = if unmap { 0 } else { WRITE_ZEROES_THICK };
                    (api.rbd_aio_write_zeroes)(image, offset, len, completion, flags, 0)
                }
            }
        };
        if ret < 0 {
            // Refused before it started: the callback will never run.
            // SAFETY: the completion was not handed to librbd's I/O path; released once.
            unsafe { (api.rbd_aio_release)(completion) };
            self.spare_tokens.push(token);
            return Err(super::errno_code(ret.into()));
        }
        let inserted = self.slots.insert(Slot {
            tag: op.tag,
            kind: op.kind,
            _iovecs: op.iovecs,
            bytes,
            token,
        });
        debug_assert_eq!(inserted, index);
        self.in_flight_bytes = self.in_flight_bytes.saturating_add(bytes);
        Ok(())
    }

    /// Starts waiting ops while the budget allows.
    fn start_waiting(&mut self) {
        while let Some(&(_, bytes)) = self.waiting.front() {
            let fits = self.in_flight_bytes.saturating_add(bytes) <= IN_FLIGHT_BYTES;
            if !fits && !self.slots.is_empty() {
                return;
            }
            let Some((op, _)) = self.waiting.pop_front() else {
                return;
            };
            let tag = op.tag;
            // SAFETY: the op was pushed under `push`'s contract, which holds until it is
            // reaped; it has not been.
            if let Err(errno) = unsafe { self.submit_op(op, bytes) } {
                self.ready.push(Completion {
                    tag,
                    result: Err(errno),
                });
            }
        }
    }

    /// Moves recorded results into `ready`.
    fn collect(&mut self) {
        std::mem::swap(
            &mut *self
                .done
                .results
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            &mut self.taken,
        );
        for (index, ret) in self.taken.drain(..) {
            let Some(slot) = self.slots.try_remove(index) else {
                log::error!("{}: completion for unknown slot {index}", self.image.name());
                continue;
            };
            self.spare_tokens.push(slot.token);
            self.in_flight_bytes = self.in_flight_bytes.saturating_sub(slot.bytes);
            let result = match (ret, slot.kind) {
                (r, _) if r < 0 => Err(super::errno_code(i64::try_from(r).unwrap_or(-1))),
                // librbd trims a transfer at the image's end (an image shrunk behind our
                // back): anything but the whole transfer is an error, never a success.
                (r, OpKind::Read { .. }) if r.unsigned_abs() as u64 != slot.bytes => Err(libc::EIO),
                (r, OpKind::Write { .. }) if r != 0 && r.unsigned_abs() as u64 != slot.bytes => {
                    Err(libc::EIO)
                }
                _ => Ok(()),
            };
            self.ready.push(Completion {
                tag: slot.tag,
                result,
            });
        }
    }
}

impl Engine for RbdEngine {
    fn name(&self) -> &'static str {
        "rbd"
    }

    unsafe fn push(&mut self, op: IoOp) {
        let transfer = matches!(op.kind, OpKind::Read { .. } | OpKind::Write { .. });
        let bytes = op_bytes(&op);
        let refused = match bytes {
            0 if transfer => Some(Ok(())),
            // Far beyond what a guest driver sends (Linux: a few MiB): refused, not split.
            b if b > IN_FLIGHT_BYTES => Some(Err(libc::EINVAL)),
            _ => None,
        };
        if let Some(result) = refused {
            self.ready.push(Completion {
                tag: op.tag,
                result,
            });
            return;
        }
        // In arrival order, behind anything already waiting for budget.
        self.waiting.push_back((op, bytes));
        self.start_waiting();
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.done.eventfd.as_raw_fd())
    }

    fn acknowledge_notification(&mut self) {
        let _ = self.done.eventfd.read();
    }

    fn completions_pending(&mut self) -> bool {
        !self
            .done
            .results
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.collect();
        self.start_waiting();
        out.append(&mut self.ready);
    }

    fn in_flight(&self) -> usize {
        self.slots
            .len()
            .saturating_add(self.ready.len())
            .saturating_add(self.waiting.len())
    }

    fn drain(&mut self, out: &mut Vec<Completion>) {
        while !self.slots.is_empty() || !self.waiting.is_empty() {
            self.collect();
            self.start_waiting();
            if self.slots.is_empty() {
                continue;
            }
            // Bounded waits: a result recorded between `collect` and the wait raised the
            // eventfd, which keeps it readable.
            match crate::sys::poll::wait_readable_for(
                self.done.eventfd.as_raw_fd(),
                std::time::Duration::from_millis(100),
            ) {
                Ok(true) => {
                    let _ = self.done.eventfd.read();
                }
                Ok(false) => {}
                Err(e) => log::error!("{}: waiting for librbd: {e}", self.image.name()),
            }
        }
        // A drain is a queue stop (a pause, a migration's switchover, a disconnect): what the
        // guest wrote must be in the cluster, not in this process's cache, before another
        // client (the migration's destination) reads the image.
        if let Err(e) = self.image.flush() {
            log::error!("{e}");
        }
        out.append(&mut self.ready);
    }
}

impl Drop for RbdEngine {
    fn drop(&mut self) {
        // librbd may still be writing into guest memory: wait for every op before the
        // worker's mapping (and the tokens the callbacks read) go away.
        let mut discarded = Vec::new();
        self.drain(&mut discarded);
        for token in self.spare_tokens.drain(..) {
            // SAFETY: every op is reaped (drained above), so every token is a spare no
            // callback reads any more; each came from `Box::leak` and is freed once.
            drop(unsafe { Box::from_raw(token.0.as_ptr()) });
        }
    }
}
