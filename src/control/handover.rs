//! The control socket's part in a live upgrade: its listening fd, copied for the successor
//! process (`daemon.handover`), after which its path is no longer removed at stop. Kept apart
//! from the server so the methods can reach it without importing the server.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::lock::lock;

/// The control socket's listening fd and path while the server runs.
static LISTENING: Mutex<Option<(PathBuf, std::os::fd::RawFd)>> = Mutex::new(None);
/// Set once the control socket was handed to a successor.
static HANDED_OVER: AtomicBool = AtomicBool::new(false);

/// The server listens on `fd`, bound to `path`.
pub fn listening(path: &Path, fd: std::os::fd::RawFd) {
    *lock(&LISTENING) = Some((path.to_path_buf(), fd));
}

/// The server stopped (its listener is about to close).
pub fn stopped() {
    *lock(&LISTENING) = None;
}

/// A successor takes over: the socket's path is its now (not removed at stop).
pub fn keep_socket() {
    HANDED_OVER.store(true, Ordering::Release);
}

/// Whether the socket was handed to a successor (its path is then not ours to remove).
pub fn handed_over() -> bool {
    HANDED_OVER.load(Ordering::Acquire)
}

/// A copy of the control socket's listener for a live upgrade's successor process.
pub fn hand_over() -> std::io::Result<(PathBuf, std::os::fd::OwnedFd)> {
    let listening = lock(&LISTENING);
    let Some((path, fd)) = listening.as_ref() else {
        return Err(std::io::Error::from_raw_os_error(libc::ENOTCONN));
    };
    // SAFETY: F_DUPFD_CLOEXEC duplicates the listener's fd, which stays open while
    // `LISTENING` names it (cleared by `stopped`, under this lock, before it closes).
    let copy = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `copy` is a new descriptor nobody else owns.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(copy) };
    Ok((path.clone(), owned))
}
