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
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(Error::new(
            ErrorKind::AddrInUse,
            "another process is listening on this socket",
        )),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
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
        // A dead one: removed.
        drop(listener);
        clear_stale(&live).unwrap();
        assert!(!live.exists());
    }
}
