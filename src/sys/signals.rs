//! Termination signals handled synchronously: SIGINT, SIGTERM and SIGHUP are blocked in every
//! thread (blocked before any thread is spawned, so all inherit the mask) and the main thread
//! waits for them with `sigwait` (the daemon ends on the first two and logs the third). No
//! async signal handlers, so nothing runs in signal context.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

/// Signals the main thread waits for (SIGHUP does not end the daemon; see `daemon`).
const TERMINATION: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for signal in TERMINATION {
        // SAFETY: as above; the signal numbers are valid constants.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    set
}

/// Blocks the termination signals in the calling thread (and threads it spawns later).
pub fn block_termination_signals() -> std::io::Result<()> {
    let set = termination_set();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// Waits for a termination signal and returns its number.
pub fn wait_for_termination() -> std::io::Result<libc::c_int> {
    let set = termination_set();
    let mut signal: libc::c_int = 0;
    // SAFETY: `set` is initialised and `signal` is a valid out-pointer for the call.
    let rc = unsafe { libc::sigwait(&set, &mut signal) };
    if rc == 0 {
        Ok(signal)
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// Asks this process to terminate the orderly way (the main thread's `sigwait` sees it).
pub fn request_termination() {
    // SAFETY: kill with our own pid and a valid signal number only queues a signal.
    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
}
