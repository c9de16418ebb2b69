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

use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use slab::Slab;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::image::RbdImage;
use super::lib::{AioCompletion, WRITE_ZEROES_THICK};
use crate::storage::{Completion, Engine, GuestIovecs, IoOp, OpKind};

/// What completion callbacks share with their engine.
struct Done {
    /// (slot, librbd's return value) of finished ops, in completion order.
    results: Mutex<Vec<(usize, isize)>>,
    /// Raised after each result is recorded.
    eventfd: EventFd,
}

/// The callback argument of one op: which engine, which slot. Reused from op to op.
struct Token {
    done: Arc<Done>,
    slot: usize,
}

/// An op librbd is working on.
struct Slot {
    tag: u64,
    /// The guest buffers librbd reads or writes until the op completes.
    _iovecs: GuestIovecs,
    /// Its callback argument; returned to the pool once the op is reaped.
    token: Box<Token>,
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
    let Ok(api) = super::lib::api() else {
        return; // unreachable: the op was submitted through this same loaded API
    };
    // SAFETY: `completion` is the live completion librbd passes to its own callback; it is
    // read and released once, here, and never used again.
    let ret = unsafe {
        let ret = (api.rbd_aio_get_return_value)(completion);
        (api.rbd_aio_release)(completion);
        ret
    };
    done.results
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push((slot, ret));
    if let Err(e) = done.eventfd.write(1) {
        log::error!("rbd completion eventfd: {e}");
    }
}

/// The RBD engine of one queue worker.
pub struct RbdEngine {
    image: Arc<RbdImage>,
    done: Arc<Done>,
    slots: Slab<Slot>,
    /// Callback arguments not in use, kept so an op costs no allocation of ours. Boxed: the
    /// box's address is the argument librbd hands back, so it must not move.
    #[allow(clippy::vec_box)]
    spare_tokens: Vec<Box<Token>>,
    /// Ops finished without librbd (empty transfers) or refused by it at submission.
    ready: Vec<Completion>,
    /// Scratch for taking results out from under the lock.
    taken: Vec<(usize, isize)>,
}

impl RbdEngine {
    /// An engine submitting to `image`.
    pub fn new(image: Arc<RbdImage>) -> std::io::Result<Self> {
        Ok(Self {
            image,
            done: Arc::new(Done {
                results: Mutex::new(Vec::new()),
                eventfd: EventFd::new(EFD_NONBLOCK)?,
            }),
            slots: Slab::new(),
            spare_tokens: Vec::new(),
            ready: Vec::new(),
            taken: Vec::new(),
        })
    }

    /// Submits `op` under a fresh completion; `Err(errno)` when librbd refused it.
    ///
    /// # Safety
    /// As for [`Engine::push`]: the iovecs stay valid until the op is reaped.
    unsafe fn submit_op(&mut self, op: IoOp) -> Result<(), i32> {
        let api = self.image.api();
        let image = self.image.handle();
        let index = self.slots.vacant_key();
        let mut token = self.spare_tokens.pop().unwrap_or_else(|| {
            Box::new(Token {
                done: Arc::clone(&self.done),
                slot: 0,
            })
        });
        token.slot = index;
        let arg = std::ptr::from_ref::<Token>(&token)
            .cast_mut()
            .cast::<c_void>();
        let mut completion: AioCompletion = std::ptr::null_mut();
        // SAFETY: `arg` points into `token`, which is moved into the slab below (a box: its
        // address does not move) and kept until the op's result has been taken.
        let ret = unsafe { (api.rbd_aio_create_completion)(arg, complete, &mut completion) };
        if ret < 0 {
            self.spare_tokens.push(token);
            return Err(ret.checked_neg().unwrap_or(libc::EIO));
        }
        let iov_count = c_int::try_from(op.iovecs.len()).unwrap_or(c_int::MAX);
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
                OpKind::Discard { offset, len } => {
                    (api.rbd_aio_discard)(image, offset, len, completion)
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
            return Err(ret.checked_neg().unwrap_or(libc::EIO));
        }
        let inserted = self.slots.insert(Slot {
            tag: op.tag,
            _iovecs: op.iovecs,
            token,
        });
        debug_assert_eq!(inserted, index);
        Ok(())
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
            let result = if ret < 0 {
                Err(i32::try_from(ret.unsigned_abs()).unwrap_or(libc::EIO))
            } else {
                Ok(())
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
        let empty = matches!(op.kind, OpKind::Read { .. } | OpKind::Write { .. })
            && op.iovecs.iter().all(|iov| iov.iov_len == 0);
        if empty {
            self.ready.push(Completion {
                tag: op.tag,
                result: Ok(()),
            });
            return;
        }
        let tag = op.tag;
        // SAFETY: forwarded from the caller of `push`.
        if let Err(errno) = unsafe { self.submit_op(op) } {
            self.ready.push(Completion {
                tag,
                result: Err(errno),
            });
        }
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
        out.append(&mut self.ready);
    }

    fn in_flight(&self) -> usize {
        self.slots.len().saturating_add(self.ready.len())
    }

    fn drain(&mut self, out: &mut Vec<Completion>) {
        while !self.slots.is_empty() {
            self.collect();
            if self.slots.is_empty() {
                break;
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
        out.append(&mut self.ready);
    }
}

impl Drop for RbdEngine {
    fn drop(&mut self) {
        // librbd may still be writing into guest memory: wait for every op before the
        // worker's mapping (and the tokens the callbacks read) go away.
        let mut discarded = Vec::new();
        self.drain(&mut discarded);
    }
}
