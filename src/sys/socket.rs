//! Unix socket paths the daemon listens on (device sockets, the control socket).

use std::path::Path;

/// Makes `path` free for a new listening socket without ever destroying something else: a
/// missing path is fine; a socket nobody listens on (left by a crashed daemon) is removed; a
/// socket someone listens on, or anything that is not a socket (a file, a directory, a
/// symlink), is refused. Control clients name socket paths; they must not be able to make
/// the daemon (root) unlink an arbitrary file.
pub fn clear_stale(path: &Path) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            "the path exists and is not a socket; refusing to replace it",
        ));
    }
    let in_use = || {
        Error::new(
            ErrorKind::AddrInUse,
            "another process is listening on this socket",
        )
    };
    match connect_nonblocking(path) {
        Ok(()) => Err(in_use()),
        // A listener whose backlog is full: alive (a blocking connect would wait for it, on
        // the control thread, for as long as its owner likes).
        Err(e) if e.kind() == ErrorKind::WouldBlock => Err(in_use()),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

/// Connects a non-blocking unix stream socket to `path` (then closes it).
fn connect_nonblocking(path: &Path) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // Room for the terminating NUL.
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un of the size given; the fd is open.
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINPROGRESS) {
        return Ok(());
    }
    Err(e)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    #[test]
    fn only_a_dead_socket_is_ever_removed() {
        let dir = tempfile::tempdir().unwrap();
        // Missing: fine.
        clear_stale(&dir.path().join("none")).unwrap();
        // A file: refused and kept.
        let file = dir.path().join("file");
        std::fs::write(&file, b"tenant data").unwrap();
        assert!(clear_stale(&file).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"tenant data");
        // A symlink to a socket: refused (not followed, not removed).
        let live = dir.path().join("live.sock");
        let listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&live, &link).unwrap();
        assert!(clear_stale(&link).is_err());
        // A socket someone listens on: refused.
        assert!(clear_stale(&live).is_err());
        assert!(live.exists());
        // One whose backlog is full: alive, refused at once (a blocking connect would wait).
        let full = dir.path().join("full.sock");
        let busy = std::os::unix::net::UnixListener::bind(&full).unwrap();
        let mut queued = 0u32;
        while let Ok(()) = connect_nonblocking(&full) {
            // Each connected socket closes at once, but stays in the backlog until accepted.
            queued += 1;
            assert!(queued < 100_000, "the backlog never filled");
        }
        let (done, result) = std::sync::mpsc::channel();
        let path = full.clone();
        std::thread::spawn(move || {
            let _ = done.send(clear_stale(&path).map_err(|e| e.kind()));
        });
        assert_eq!(
            result.recv_timeout(std::time::Duration::from_secs(10)),
            Ok(Err(std::io::ErrorKind::AddrInUse))
        );
        assert!(full.exists());
        drop(busy);
        // A dead one: removed.
        drop(listener);
        clear_stale(&live).unwrap();
        assert!(!live.exists());
    }
}
