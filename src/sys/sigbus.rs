//! Guest memory that shrinks under the daemon must not kill it.
//!
//! Front-ends hand us their guest memory as files (memfd, hugetlbfs, shm) that we map shared.
//! `shell::checks` refuses a file smaller than its region when it is mapped, but the
//! front-end keeps the file and may `ftruncate` it later (QEMU does not seal its memory). The
//! next access by the daemon past the new end raises SIGBUS, and SIGBUS's default action
//! ends the process: every tenant's disks and NICs would go with it.
//!
//! So the daemon registers the host ranges of every guest memory region it maps (`register`),
//! and a SIGBUS handler, for a fault of kind `BUS_ADRERR` (an access past the end of a mapped
//! file) inside a registered range, maps a private zero-filled page over the faulting page
//! and returns: the access is retried and sees zeros (writes go to that private page and are
//! lost). Only that front-end's own memory is affected, which its own truncation already
//! destroyed. The fault is counted per owner (`faults`) so the device can be reported. Any
//! other SIGBUS (a hardware memory error, a fault outside guest memory, one sent by `kill`)
//! gets the default action, as before.
//!
//! The table is fixed-size and lock-free for the handler: each slot is guarded by a sequence
//! number (odd while being rewritten), which the handler checks around its reads. Slots of
//! ranges that are no longer mapped are reused at the next registration (`msync` tells
//! whether a range is still mapped). A range unmapped and then reused by an unrelated file
//! mapping could in theory have a genuine fault there masked; the daemon maps no other files
//! that can shrink (its own memfds are sealed or never truncated).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Ranges tracked at once (regions of every connected front-end; QEMU uses a few each).
const SLOTS: usize = 1024;
/// Ranges one owner may hold (a front-end cannot take every slot from the others).
const PER_OWNER: usize = 64;

/// Errors installing the handler or registering a range.
#[derive(Debug, thiserror::Error)]
pub enum SigbusError {
    /// `sigaction` failed.
    #[error("cannot install the SIGBUS handler")]
    Install(#[source] std::io::Error),
    /// Every slot holds a mapped range.
    #[error("too many guest memory regions mapped ({SLOTS})")]
    Full,
    /// This owner already holds its share of slots.
    #[error("too many memory regions for one front-end ({PER_OWNER})")]
    OwnerFull,
}

struct Slot {
    /// Odd while the slot is being rewritten.
    seq: AtomicU64,
    start: AtomicUsize,
    /// 0: free.
    len: AtomicUsize,
    owner: AtomicU64,
    /// Faults absorbed in this range since it was registered.
    faults: AtomicU64,
}

impl Slot {
    const fn new() -> Self {
        Self {
            seq: AtomicU64::new(0),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            owner: AtomicU64::new(0),
            faults: AtomicU64::new(0),
        }
    }

    /// `(start, len, owner)` if the slot holds a range, read consistently (a slot being
    /// rewritten is waited for: a writer holds it for a handful of stores).
    fn read(&self) -> Option<(usize, usize, u64)> {
        loop {
            let before = self.seq.load(Ordering::Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let start = self.start.load(Ordering::Acquire);
            let len = self.len.load(Ordering::Acquire);
            let owner = self.owner.load(Ordering::Acquire);
            if self.seq.load(Ordering::Acquire) == before {
                return (len > 0).then_some((start, len, owner));
            }
        }
    }

    /// Rewrites the slot (callers hold `WRITER`).
    fn write(&self, start: usize, len: usize, owner: u64) {
        self.seq.fetch_add(1, Ordering::AcqRel);
        self.start.store(start, Ordering::Release);
        self.len.store(len, Ordering::Release);
        self.owner.store(owner, Ordering::Release);
        self.faults.store(0, Ordering::Release);
        self.seq.fetch_add(1, Ordering::AcqRel);
    }
}

static TABLE: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
static TOTAL: AtomicU64 = AtomicU64::new(0);
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);
/// Until when (CLOCK_MONOTONIC, ns) a memory-table update may have mapped guest memory that
/// is not registered yet (vhost-user-backend publishes a new table before it calls
/// `update_memory`, where it is registered): a fault on a page in no slot is then absorbed
/// too, page by page. The daemon maps no other file that can shrink, so nothing genuine is
/// masked.
static UPDATING_UNTIL_NS: AtomicU64 = AtomicU64::new(0);
/// How long that window stays open after a memory message is forwarded.
const UPDATE_WINDOW_NS: u64 = 1_000_000_000;
/// Serializes writers (registrations run in normal context; the handler never takes it).
static WRITER: Mutex<()> = Mutex::new(());

/// A new owner id for [`register`] (one per device).
pub fn new_owner() -> u64 {
    NEXT_OWNER.fetch_add(1, Ordering::Relaxed)
}

/// Installs the handler (once, at start-up, before any guest memory is mapped).
pub fn install() -> Result<(), SigbusError> {
    // SAFETY: a zeroed sigaction is a valid starting point; we set the handler, flags and an
    // empty mask before passing it to the kernel. The handler only uses atomics and
    // async-signal-safe system calls (mmap, sigaction, raise).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigbus;
        action.sa_sigaction = handler as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
            return Err(SigbusError::Install(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Registers the host range `start..start+len` as guest memory of `owner` (0: memory of no
/// one connection in particular, counted only in [`total_faults`]). Slots whose range
/// is no longer mapped are reused first.
pub fn register(owner: u64, start: usize, len: usize) -> Result<(), SigbusError> {
    if len == 0 {
        return Ok(());
    }
    let _writer = crate::lock::lock(&WRITER);
    let mut free = None;
    let mut held = 0usize;
    for slot in &TABLE {
        match slot.read() {
            Some((s, l, o)) if s == start && l == len && o == owner => return Ok(()),
            Some((s, l, _)) if !mapped(s, l) => {
                slot.write(0, 0, 0);
                free = free.or(Some(slot));
            }
            Some((_, _, o)) => held = held.saturating_add(usize::from(o == owner && owner != 0)),
            None => free = free.or(Some(slot)),
        }
    }
    if held >= PER_OWNER {
        return Err(SigbusError::OwnerFull);
    }
    let slot = free.ok_or(SigbusError::Full)?;
    slot.write(start, len, owner);
    Ok(())
}

/// Forgets `owner`'s ranges (its connection ended; its mappings go with it).
pub fn unregister(owner: u64) {
    if owner == 0 {
        return;
    }
    let _writer = crate::lock::lock(&WRITER);
    for slot in &TABLE {
        if slot.read().is_some_and(|(_, _, o)| o == owner) {
            slot.write(0, 0, 0);
        }
    }
}

/// A memory-table message is about to reach the handler (called by the relay before it
/// forwards SET_MEM_TABLE or ADD_MEM_REG): see [`UPDATING_UNTIL_NS`].
pub fn memory_update_coming() {
    let until = monotonic_ns().saturating_add(UPDATE_WINDOW_NS);
    UPDATING_UNTIL_NS.fetch_max(until, Ordering::AcqRel);
}

/// CLOCK_MONOTONIC in ns (async-signal-safe).
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, a live local; it is async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(now.tv_nsec).unwrap_or(0))
}

/// Faults absorbed in `owner`'s registered memory so far (read it before [`unregister`]).
pub fn faults(owner: u64) -> u64 {
    TABLE
        .iter()
        .filter(|slot| slot.read().is_some_and(|(_, _, o)| o == owner))
        .map(|slot| slot.faults.load(Ordering::Acquire))
        .fold(0, u64::saturating_add)
}

/// Faults absorbed in all guest memory so far.
pub fn total_faults() -> u64 {
    TOTAL.load(Ordering::Acquire)
}

/// Whether every page of the range is mapped (`msync` fails with ENOMEM otherwise).
fn mapped(start: usize, len: usize) -> bool {
    // SAFETY: MS_ASYNC msync only inspects the mappings of the range (no write-back on
    // Linux); an unmapped range is reported with ENOMEM, nothing is touched.
    unsafe { libc::msync(start as *mut libc::c_void, len, libc::MS_ASYNC) == 0 }
}

/// Maps private zero pages over the rest of the range from the page holding `addr` (its
/// file is gone from there on, or at least there): one mapping, however many pages fault
/// later, so a guest aiming at every page cannot pile up mappings to the kernel's limit.
/// Page size 4 KiB, else 2 MiB or 1 GiB for hugetlbfs regions.
fn replace_page(addr: usize, start: usize, len: usize) -> bool {
    let end = start.saturating_add(len);
    for size in [4usize << 10, 2 << 20, 1 << 30] {
        let page = addr & !(size - 1);
        if page < start || page >= end || (end - page) % size != 0 {
            continue;
        }
        let size = end - page;
        // SAFETY: the range lies inside a guest memory mapping of ours whose file no longer
        // backs it (every access there faults); replacing those pages with private anonymous
        // memory changes no memory that any code could use, and MAP_FIXED only ever replaces
        // that range.
        let mapped = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            return true;
        }
    }
    false
}

extern "C" fn on_sigbus(signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == libc::BUS_ADRERR {
        for slot in &TABLE {
            let Some((start, len, _)) = slot.read() else {
                continue;
            };
            if addr.checked_sub(start).is_some_and(|d| d < len) && replace_page(addr, start, len) {
                slot.faults.fetch_add(1, Ordering::AcqRel);
                TOTAL.fetch_add(1, Ordering::AcqRel);
                return;
            }
        }
        // Memory mapped by an update not registered yet: this page only (the range is not
        // known), 4 KiB or a huge page.
        if monotonic_ns() < UPDATING_UNTIL_NS.load(Ordering::Acquire) {
            for size in [4usize << 10, 2 << 20, 1 << 30] {
                let page = addr & !(size - 1);
                if replace_page(page, page, size) {
                    TOTAL.fetch_add(1, Ordering::AcqRel);
                    return;
                }
            }
        }
    }
    // Not guest memory: the default action, as if we had no handler.
    // SAFETY: resetting a signal's disposition and raising it are async-signal-safe.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        if code <= 0 {
            // Sent by a process (kill): returning would not repeat it.
            libc::raise(signal);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests may panic
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    #[test]
    fn a_truncated_mapping_reads_zeros_instead_of_killing_the_process() {
        install().unwrap();
        // SAFETY: memfd_create with a NUL-terminated name; the fd is owned at once.
        let file =
            unsafe { std::fs::File::from_raw_fd(libc::memfd_create(c"sigbus-test".as_ptr(), 0)) };
        let len = 4 * 4096;
        file.set_len(len as u64).unwrap();
        // SAFETY: a fresh shared mapping of our own memfd.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        } as *mut u8;
        assert_ne!(map as *mut libc::c_void, libc::MAP_FAILED);
        // SAFETY: inside the mapping, which is backed by the file here.
        unsafe { map.add(3 * 4096).write_volatile(7) };
        let owner = new_owner();
        register(owner, map as usize, len).unwrap();
        file.set_len(4096).unwrap();
        // SAFETY: inside the mapping; past the file's new end, so this faults (SIGBUS) and
        // the handler replaces the page.
        let read = unsafe { map.add(3 * 4096).read_volatile() };
        assert_eq!(read, 0, "the truncated page reads as zeros");
        // SAFETY: as above; the page is our private page now.
        unsafe { map.add(3 * 4096 + 1).write_volatile(9) };
        assert_eq!(faults(owner), 1);
        assert!(total_faults() >= 1);
        // SAFETY: the first page is still backed by the file.
        unsafe { map.write_volatile(1) };
        assert_eq!(
            faults(owner),
            1,
            "no fault where the file still backs the page"
        );
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(map as *mut libc::c_void, len) };
        // The slot is reused once the range is gone.
        assert!(!mapped(map as usize, len));
    }
}
