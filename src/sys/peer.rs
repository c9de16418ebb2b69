//! Credentials of the process at the other end of a unix socket (`SO_PEERCRED`).

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::os::fd::AsRawFd;

/// The peer's pid, uid and gid as the kernel recorded them at connect time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Reads `SO_PEERCRED` of a connected unix socket.
pub fn peer_credentials(socket: &impl AsRawFd) -> std::io::Result<PeerCredentials> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid, writable, and `len` holds the size of `cred`, so the
    // kernel writes at most that many bytes; the fd is borrowed for the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(PeerCredentials {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// The daemon's effective uid.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn a_socketpair_peer_is_ourselves() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let cred = peer_credentials(&a).unwrap();
        assert_eq!(cred.uid, effective_uid());
        assert_eq!(cred.pid, std::process::id() as i32);
    }
}
