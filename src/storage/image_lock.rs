//! Who may write an image while a VM migrates between two devices on it.
//!
//! A disk's image is locked (`flock`, exclusive; shared when read-only) for as long as its
//! device exists, so two devices or daemons never write one image. A live migration needs
//! exactly that twice over, for a moment: the source device serves the running VM while the
//! destination device (in this daemon or another, on this host or another one on shared
//! storage) already exists, waiting for the VM to arrive. The rule is that only the side
//! whose front-end runs may write, and [`ImageLock`] follows the VM:
//!
//! - A destination device is created `incoming=on`: it opens the image without taking the
//!   lock, so the source may hold it.
//! - A device whose front-end has dirty logging on (a migration is running; `ring::dirty`)
//!   releases the lock when its last queue stops: that is the switchover (QEMU stops the
//!   source's queues before the destination starts its own).
//! - A device takes the lock when a queue starts. If it cannot (the other side still runs),
//!   it serves nothing: every request fails with an I/O error until it can (checked again on
//!   each request, one `flock` call).
//!
//! A tiered disk's store goes with the lock: deactivated (no more moves or journal entries)
//! before the release, activated (its journal replayed, as at start-up) when taken.
//!
//! A migration that fails after the switchover restarts the source's queues, which take the
//! lock back (the destination never started). An unrelated device on the image is still
//! refused at creation, `incoming` or not only changes who holds the lock at creation.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use crate::lock::lock;
use crate::storage::tier::store::TierStore;

/// The lock on one device's image, and the device's side of a migration.
pub struct ImageLock {
    file: Arc<File>,
    readonly: bool,
    held: AtomicBool,
    /// Serializes taking and releasing (with the tier hand-over inside): a queue sees `held`
    /// only once the tier is ready.
    change: Mutex<()>,
    /// A tiered disk's store, handed over with the image (`tier::handover`).
    tier: Option<Arc<TierStore>>,
    /// Queues started and not stopped.
    running: AtomicU16,
    /// The front-end has dirty logging on (a migration runs).
    migrating: AtomicBool,
}

impl ImageLock {
    /// The lock on `file`, already taken (`held`) or not (an incoming migration); a tiered
    /// disk's `tier` store is activated when the lock is taken, deactivated when released.
    pub fn new(file: Arc<File>, readonly: bool, held: bool, tier: Option<Arc<TierStore>>) -> Self {
        Self {
            file,
            readonly,
            held: AtomicBool::new(held),
            change: Mutex::new(()),
            tier,
            running: AtomicU16::new(0),
            migrating: AtomicBool::new(false),
        }
    }

    /// Whether this device holds the image now.
    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// Takes the lock if it is not held (and a tiered disk's store, replaying its journal);
    /// whether it is held afterwards.
    pub fn ensure_held(&self) -> bool {
        if self.is_held() {
            return true;
        }
        let _change = lock(&self.change);
        if self.is_held() {
            return true;
        }
        let operation = if self.readonly {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        } | libc::LOCK_NB;
        // SAFETY: flock only reads the fd number, which `self.file` keeps open.
        if unsafe { libc::flock(self.file.as_raw_fd(), operation) } != 0 {
            return false;
        }
        if let Some(tier) = &self.tier {
            if let Err(e) = tier.activate() {
                log::error!("the tiered disk cannot be taken over: {e}");
                self.unlock();
                return false;
            }
        }
        self.held.store(true, Ordering::Release);
        true
    }

    fn unlock(&self) -> bool {
        // SAFETY: flock only reads the fd number, which `self.file` keeps open.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) == 0 }
    }

    /// The front-end switched dirty logging on or off.
    pub fn set_migrating(&self, on: bool) {
        self.migrating.store(on, Ordering::Release);
    }

    /// A queue started: take the lock if need be; whether the device may serve.
    pub fn queue_started(&self) -> bool {
        self.running.fetch_add(1, Ordering::AcqRel);
        self.ensure_held()
    }

    /// A queue's front-end went away without stopping it: it no longer runs, but nothing is
    /// handed over (a front-end that vanishes mid-migration is no switchover).
    pub fn queue_gone(&self) {
        self.running_down();
    }

    fn running_down(&self) -> u16 {
        self.running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .unwrap_or(0)
    }

    /// A queue stopped (everything it had is returned). The last one to stop while a
    /// migration runs hands the image over: returns true if the lock was released.
    pub fn queue_stopped(&self) -> bool {
        let before = self.running_down();
        if before != 1 || !self.migrating.load(Ordering::Acquire) {
            return false;
        }
        let _change = lock(&self.change);
        if !self.is_held() {
            return false;
        }
        // A tiered disk stops moving and journalling first: the other side replays it.
        if let Some(tier) = &self.tier {
            tier.deactivate();
        }
        self.held.store(false, Ordering::Release);
        self.unlock()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn open(path: &std::path::Path) -> Arc<File> {
        Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .unwrap(),
        )
    }

    fn lock_now(file: &File) -> bool {
        // SAFETY: flock on a live fd.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    }

    #[test]
    fn the_lock_follows_the_running_side_of_a_migration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let source_file = open(&path);
        assert!(lock_now(&source_file));
        let source = ImageLock::new(Arc::clone(&source_file), false, true, None);
        let dest = ImageLock::new(open(&path), false, false, None);
        // Both queues of the source run; the destination cannot start while they do.
        assert!(source.queue_started() && source.queue_started());
        assert!(!dest.ensure_held(), "the source holds the image");
        // A stop without a migration (guest reboot) keeps the lock.
        assert!(!source.queue_stopped());
        assert!(source.queue_started());
        // A front-end that vanishes mid-migration hands nothing over.
        source.set_migrating(true);
        assert!(source.queue_started());
        source.queue_gone();
        assert!(source.is_held());
        // Migration: the last queue to stop hands the image over.
        assert!(!source.queue_stopped(), "one queue still runs");
        assert!(source.queue_stopped(), "the last one releases");
        assert!(!source.is_held());
        assert!(
            dest.queue_started(),
            "the destination takes it at its first queue"
        );
        // The source cannot take it back while the destination runs...
        assert!(!source.queue_started());
        // ...and an unrelated user is refused all along.
        assert!(!lock_now(&open(&path)));
        // Stops never go below zero.
        for _ in 0..4 {
            source.queue_stopped();
        }
        assert!(dest.is_held());
    }
}
