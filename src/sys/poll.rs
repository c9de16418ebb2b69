//! Waiting for one of two file descriptors to become readable.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::os::fd::RawFd;

/// Which descriptor became readable first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readable {
    /// The first one.
    First,
    /// The second one (checked first, so a stop request wins over a new connection).
    Second,
}

/// Blocks until `first` or `second` is readable, retrying on EINTR.
pub fn wait_readable(first: RawFd, second: RawFd) -> std::io::Result<Readable> {
    let mut fds = [
        libc::pollfd {
            fd: first,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: second,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a live array of two pollfd structs and the count passed is its
        // length; poll writes only their `revents` fields.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if fds[1].revents != 0 {
            return Ok(Readable::Second);
        }
        if fds[0].revents != 0 {
            return Ok(Readable::First);
        }
    }
}

/// Blocks until `fd` is readable (true) or `timeout` passes (false), retrying on EINTR.
pub fn wait_readable_for(fd: RawFd, timeout: std::time::Duration) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: `pfd` is one live pollfd and the count passed is 1; poll writes only its
        // `revents` field.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        return Ok(rc > 0);
    }
}
