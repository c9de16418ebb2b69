//! A vring that refuses queue sizes the virtio spec forbids.
//!
//! Why this exists: `vhost-user-backend` checks SET_VRING_NUM only for `0 < num <= max`, and
//! `virtio_queue::Queue::set_size` merely logs a size that is not a power of two and keeps the
//! old one. The backend would then walk rings of a size the front-end never allocated. This
//! wrapper records the bad size instead; the worker sees [`CheckedVring::size_rejected`] and
//! refuses to touch the queue (and counts it) until the front-end sets a valid size.
//!
//! It also reads kicks without blocking whatever the front-end does to the shared kick fd
//! (`sys::kick::consume`).

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard};

use vhost_user_backend::{VringMutex, VringState, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::{Error as QueueError, QueueT};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// The guest memory type every device uses.
pub type GuestMemory = GuestMemoryMmap<()>;
/// The atomically replaceable guest memory handed to backends.
pub type AtomicGuestMemory = GuestMemoryAtomic<GuestMemory>;

/// A [`VringMutex`] whose queue size is validated.
#[derive(Clone)]
pub struct CheckedVring {
    inner: VringMutex<AtomicGuestMemory>,
    size_rejected: Arc<AtomicBool>,
    /// Set once a call fd of this ring was found blocking or full (`signal_locked`): from
    /// then on no call fd of this ring is written, new ones included.
    call_refused: Arc<AtomicBool>,
    /// Refused queue sizes are the front-end's to repeat: one line a second.
    size_log: Arc<crate::log_limit::SharedLogLimiter>,
}

thread_local! {
    /// Vrings created on this thread while [`collect_created`] runs.
    static CREATED: std::cell::RefCell<Option<Vec<CheckedVring>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` and returns, with its result, every vring it created on this thread, in order.
///
/// Why this exists: `vhost-user-backend` creates a connection's vrings inside
/// `VhostUserDaemon::new` and hands them to the backend only in `handle_event`, on each
/// queue's own thread, some time later. A switch port is filled by *other* threads, which
/// must know its rx vrings before the first frame for it arrives; waiting for an event would
/// drop the frames that arrive first. The vrings are created synchronously, in queue order,
/// so collecting them here is exact.
pub fn collect_created<R>(f: impl FnOnce() -> R) -> (R, Vec<CheckedVring>) {
    CREATED.with(|c| *c.borrow_mut() = Some(Vec::new()));
    let result = f();
    let created = CREATED.with(|c| c.borrow_mut().take()).unwrap_or_default();
    (result, created)
}

impl CheckedVring {
    /// Signals the front-end that used entries are published (its call eventfd), with the
    /// ring's state already locked (`state`, from this vring), unless it made that eventfd
    /// blocking.
    ///
    /// Why: the call fd is the front-end's, and `O_NONBLOCK` (set when it was handed to us,
    /// `shell::checks`) belongs to the open file, which the front-end shares. One that clears
    /// the flag and fills the counter makes a write block until it reads, which may be never,
    /// and the writer may be another tenant's sender (a switch port's rx queue) or the
    /// busy-poll thread. QEMU, DPDK and cloud-hypervisor make their eventfds non-blocking and
    /// leave them so, and never let a counter near its maximum (2^64 - 2: no number of real
    /// interrupts gets there). So the first call fd found blocking, or full (the write says
    /// EAGAIN), ends this ring's signals for the connection (rings are made per connection),
    /// new call fds included: the front-end broke
    /// its own queue, and may not try again (the check and the write are two steps, and a
    /// front-end that clears the flag in between blocks the writer; refusing every later fd
    /// leaves it that one race per ring, not one per SET_VRING_CALL). Eventfds take no
    /// `RWF_NOWAIT` write (EOPNOTSUPP as of Linux 6.18), which would close the race.
    pub fn signal_locked(&self, state: &VringState<AtomicGuestMemory>) -> io::Result<()> {
        if let Some(call) = state.get_call() {
            if self.call_refused.load(Ordering::Acquire) {
                return Err(io::Error::other(
                    "call eventfds refused (one was made blocking or full)",
                ));
            }
            // SAFETY: F_GETFL only reads the status flags of an fd the state owns.
            let flags = unsafe { libc::fcntl(call.as_raw_fd(), libc::F_GETFL) };
            if flags < 0 || flags & libc::O_NONBLOCK == 0 {
                self.call_refused.store(true, Ordering::Release);
                return Err(io::Error::other(
                    "the front-end made its call eventfd blocking: refused",
                ));
            }
        }
        let signalled = state.signal_used_queue();
        if let Err(e) = &signalled {
            if e.kind() == io::ErrorKind::WouldBlock {
                self.call_refused.store(true, Ordering::Release);
            }
        }
        signalled
    }

    /// Whether the front-end's last SET_VRING_NUM was refused.
    pub fn size_rejected(&self) -> bool {
        self.size_rejected.load(Ordering::Acquire)
    }
}

impl<'a> VringStateGuard<'a, AtomicGuestMemory> for CheckedVring {
    type G = MutexGuard<'a, VringState<AtomicGuestMemory>>;
}

impl<'a> VringStateMutGuard<'a, AtomicGuestMemory> for CheckedVring {
    type G = MutexGuard<'a, VringState<AtomicGuestMemory>>;
}

impl VringT<AtomicGuestMemory> for CheckedVring {
    fn new(mem: AtomicGuestMemory, max_queue_size: u16) -> Result<Self, QueueError> {
        let vring = Self {
            inner: VringMutex::new(mem, max_queue_size)?,
            size_rejected: Arc::new(AtomicBool::new(false)),
            call_refused: Arc::new(AtomicBool::new(false)),
            size_log: Arc::default(),
        };
        CREATED.with(|c| {
            if let Some(created) = c.borrow_mut().as_mut() {
                created.push(vring.clone());
            }
        });
        Ok(vring)
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, AtomicGuestMemory>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, AtomicGuestMemory>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), QueueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.signal_locked(&self.inner.get_ref())
    }

    fn enable_notification(&self) -> Result<bool, QueueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), QueueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, QueueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled)
    }

    fn set_queue_info(&self, desc: u64, avail: u64, used: u64) -> Result<(), QueueError> {
        self.inner.set_queue_info(desc, avail, used)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, QueueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        if num.is_power_of_two() {
            self.size_rejected.store(false, Ordering::Release);
            self.inner.set_queue_size(num);
        } else {
            if let Some(suppressed) = self.size_log.allow() {
                log::error!(
                    "front-end set queue size {num}, not a power of two: queue disabled \
                     ({suppressed} similar not logged)"
                );
            }
            self.size_rejected.store(true, Ordering::Release);
        }
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready)
    }

    fn set_kick(&self, file: Option<File>) {
        self.inner.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        // Not the crate's read: it reads the kick fd with the ring locked and blocks if the
        // front-end (which shares the fd) cleared O_NONBLOCK and read the counter to zero
        // first, holding the lock, and every other tenant's sender into this queue, for good.
        let state = self.inner.get_ref();
        if let Some(kick) = state.get_kick() {
            crate::sys::kick::consume(kick)?;
        }
        Ok(state.is_enabled())
    }

    fn set_call(&self, file: Option<File>) {
        // Made non-blocking by `shell::checks`; once one was refused, so is this one
        // (`signal_locked`).
        self.inner.set_call(file);
    }

    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file)
    }
}

/// Detects a ring that keeps saying buffers wait while none can be taken: stopped
/// (GET_VRING_BASE) or corrupt (an avail index more than a ring ahead, which `ring::burst`
/// refuses). A worker that looped on such a ring would spin forever; after two empty passes
/// in a row it should stop, kicks on, until the next kick.
#[derive(Debug, Default)]
pub struct EmptyPasses(u32);

impl EmptyPasses {
    /// Records a pass that took `taken` buffers; true when the worker should stop.
    pub fn stalled(&mut self, taken: usize) -> bool {
        self.0 = if taken == 0 {
            self.0.saturating_add(1)
        } else {
            0
        };
        self.0 >= 2
    }
}

/// The descriptor heads a queue has taken and not yet returned.
///
/// A head is the driver's until the device puts it in the used ring; a driver that publishes a
/// head the device still holds has a broken ring (virtio 1.2 §2.7.13). Without this check a
/// guest could publish one head again and again and make the device hold unbounded work for
/// it; with it, work held per queue is at most the queue size.
#[derive(Debug, Default)]
pub struct HeadSet {
    words: Vec<u64>,
    held: usize,
}

impl HeadSet {
    /// Takes `head`; false (and nothing changes) if it is already held.
    pub fn claim(&mut self, head: u16) -> bool {
        let (word, bit) = (usize::from(head >> 6), 1u64 << (head & 63));
        if self.words.len() <= word {
            self.words.resize(word.saturating_add(1), 0);
        }
        let Some(w) = self.words.get_mut(word) else {
            return false;
        };
        if *w & bit != 0 {
            return false;
        }
        *w |= bit;
        self.held = self.held.saturating_add(1);
        true
    }

    /// Returns `head` (no-op if it was not held).
    pub fn release(&mut self, head: u16) {
        let (word, bit) = (usize::from(head >> 6), 1u64 << (head & 63));
        if let Some(w) = self.words.get_mut(word) {
            if *w & bit != 0 {
                *w &= !bit;
                self.held = self.held.saturating_sub(1);
            }
        }
    }

    /// How many heads are held.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Returns every head.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.held = 0;
    }
}

/// The driver's avail index of `queue` (locked by the caller), read through the memory map
/// current now. Workers read it *before* taking the memory snapshot a pass uses (see
/// `ring::burst::Burst::up_to`): every chain published up to this index has its buffers in
/// that snapshot.
pub fn avail_index(queue: &virtio_queue::Queue, memory: &AtomicGuestMemory) -> Option<u16> {
    use vm_memory::GuestAddressSpace;
    queue
        .avail_idx(&*memory.memory(), std::sync::atomic::Ordering::Acquire)
        .ok()
        .map(|idx| idx.0)
}

/// Whether the driver has made buffers available that the device has not taken yet.
pub fn has_available(vring: &CheckedVring, memory: &GuestMemory) -> bool {
    let state = vring.get_ref();
    let queue = state.get_queue();
    queue
        .avail_idx(memory, std::sync::atomic::Ordering::Acquire)
        .map(|idx| idx.0 != queue.next_avail())
        .unwrap_or(false)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;

    use crate::sys::kick::testing::{count, eventfd, fill, within_10s};

    fn vring() -> CheckedVring {
        let memory = GuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        CheckedVring::new(GuestMemoryAtomic::new(memory), 16).unwrap()
    }

    #[test]
    fn a_kick_read_never_blocks_on_a_front_ends_blocking_empty_eventfd() {
        use std::io::Write;
        let vring = vring();
        let kick = eventfd(0);
        let mut ours = kick.try_clone().unwrap();
        vring.set_kick(Some(kick));
        vring.set_enabled(true);
        // Blocking mode, counter zero (the front-end read it first): a plain read would hang
        // there with the ring locked.
        let reader = vring.clone();
        assert!(within_10s(move || reader.read_kick().unwrap()));
        ours.write_all(&1u64.to_ne_bytes()).unwrap();
        assert!(vring.read_kick().unwrap());
        assert_eq!(count(&ours), 0, "consumed");
        let reader = vring.clone();
        assert!(
            within_10s(move || reader.read_kick().unwrap()),
            "empty again"
        );
    }

    #[test]
    fn a_call_fd_made_blocking_ends_the_rings_signals() {
        let vring = vring();
        let good = eventfd(libc::EFD_NONBLOCK);
        vring.set_call(Some(good.try_clone().unwrap()));
        vring.signal_used_queue().unwrap();
        assert_eq!(count(&good), 1);
        // The front-end cleared O_NONBLOCK and filled the counter: a write would block for
        // good.
        let hostile = eventfd(0);
        fill(&hostile);
        vring.set_call(Some(hostile.try_clone().unwrap()));
        for _ in 0..2 {
            let signaller = vring.clone();
            assert!(within_10s(move || signaller.signal_used_queue().is_err()));
        }
        // Even made non-blocking again, this fd stays refused, and so does a new one (the
        // front-end gets no second try at the race between the check and the write).
        // SAFETY: F_SETFL on an fd we own.
        let set = unsafe { libc::fcntl(hostile.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        assert_eq!(set, 0);
        assert!(vring.signal_used_queue().is_err());
        assert_eq!(count(&hostile), u64::MAX - 1, "never written");
        vring.set_call(Some(good.try_clone().unwrap()));
        assert!(vring.signal_used_queue().is_err());
        assert_eq!(count(&good), 0, "a new call fd is refused too");
    }

    #[test]
    fn a_full_call_fd_ends_the_rings_signals() {
        // Non-blocking, but the front-end filled the counter: the write says EAGAIN, and the
        // ring is signalled no more (no retry at every completion).
        let vring = vring();
        let full = eventfd(libc::EFD_NONBLOCK);
        fill(&full);
        vring.set_call(Some(full.try_clone().unwrap()));
        assert!(vring.signal_used_queue().is_err());
        let good = eventfd(libc::EFD_NONBLOCK);
        vring.set_call(Some(good.try_clone().unwrap()));
        assert!(vring.signal_used_queue().is_err());
        assert_eq!(count(&good), 0);
    }

    #[test]
    fn a_head_is_held_once_until_released() {
        let mut heads = HeadSet::default();
        assert!(heads.claim(0));
        assert!(heads.claim(65535));
        assert!(!heads.claim(0), "a held head is refused");
        assert_eq!(heads.held(), 2);
        heads.release(0);
        heads.release(0);
        assert_eq!(heads.held(), 1);
        assert!(heads.claim(0));
        heads.clear();
        assert_eq!(heads.held(), 0);
        assert!(heads.claim(65535));
    }

    #[test]
    fn sizes_that_are_not_powers_of_two_are_flagged_and_not_applied() {
        let vring = CheckedVring::new(GuestMemoryAtomic::new(GuestMemory::new()), 256).unwrap();
        vring.set_queue_size(100);
        assert!(vring.size_rejected());
        assert_eq!(vring.get_ref().get_queue().size(), 256);
        vring.set_queue_size(64);
        assert!(!vring.size_rejected());
        assert_eq!(vring.get_ref().get_queue().size(), 64);
    }
}
