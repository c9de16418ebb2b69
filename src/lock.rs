//! Locking that survives a panicked holder.
//!
//! A poisoned mutex means some thread panicked while holding it. None of our guarded state is
//! left half-updated by a panic that could matter more than stopping the whole daemon (a
//! limiter's counters, a worker's bookkeeping, the device list), and one device's bug must not
//! take every other VM's disk down, so every lock in the daemon recovers the guard instead of
//! propagating the poison.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, taking the guard even if a previous holder panicked.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}
