//! Listening sockets handed to the daemon at start: systemd socket activation (`LISTEN_FDS`,
//! through the `sd-notify` crate) and the vhost-user backend convention `--fd=N`. Each is
//! checked to be a listening `AF_UNIX` stream socket bound to a path, made close-on-exec and
//! kept under that path; whoever would bind the path (a device socket, the control socket)
//! takes the inherited listener instead. An inherited socket belongs to whoever created it:
//! the daemon never unlinks its path.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::lock::lock;

/// Why an inherited fd was refused.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    /// The number is not an open fd.
    #[error("fd {0} is not open")]
    NotOpen(RawFd),
    /// Not a listening unix stream socket.
    #[error("fd {0} is not a listening unix stream socket")]
    NotListening(RawFd),
    /// Not bound to a filesystem path (unnamed or abstract).
    #[error("fd {0} is not bound to a filesystem path")]
    NoPath(RawFd),
    /// The socket-activation environment is malformed.
    #[error("socket activation: {0}")]
    Activation(#[source] std::io::Error),
    /// Two inherited sockets on one path.
    #[error("two inherited sockets are bound to {0}")]
    Duplicate(PathBuf),
}

static INHERITED: Mutex<BTreeMap<PathBuf, UnixListener>> = Mutex::new(BTreeMap::new());

fn sockopt(fd: RawFd, option: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid out-pointers of the sizes given; a bad fd or a
    // non-socket only makes the call fail.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            std::ptr::addr_of_mut!(value).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// Takes fd `fd` (given to this process by its parent) as a listening socket; returns the
/// path it is bound to.
pub fn adopt(fd: RawFd) -> Result<PathBuf, InheritError> {
    // SAFETY: F_GETFD only reads the fd's flags; a closed number fails with EBADF.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(InheritError::NotOpen(fd));
    }
    let listening = sockopt(fd, libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && sockopt(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && sockopt(fd, libc::SO_ACCEPTCONN) == Some(1);
    if !listening {
        return Err(InheritError::NotListening(fd));
    }
    // SAFETY: `fd` is open (checked above) and was handed to this process by its parent
    // (systemd or the launcher) for us to own; this runs at start-up, before the daemon opens
    // anything, and each number is adopted at most once (a second adoption of the same path
    // is refused below, and `--fd` and LISTEN_FDS are not combined by any launcher).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listener = UnixListener::from(owned);
    // SAFETY: FD_CLOEXEC on an fd we now own: children (none are spawned with it) never see it.
    unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        .ok_or(InheritError::NoPath(fd))?;
    let mut table = lock(&INHERITED);
    if table.contains_key(&path) {
        return Err(InheritError::Duplicate(path));
    }
    log::info!("listening on inherited socket {} (fd {fd})", path.display());
    table.insert(path.clone(), listener);
    Ok(path)
}

/// Adopts the sockets systemd passed (`LISTEN_FDS`/`LISTEN_PID`); returns their paths.
pub fn adopt_systemd() -> Result<Vec<PathBuf>, InheritError> {
    let fds = sd_notify::listen_fds().map_err(InheritError::Activation)?;
    let paths = fds.map(adopt).collect::<Result<Vec<_>, _>>()?;
    // Not for the processes we start (none today, but a tap helper could be).
    for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    Ok(paths)
}

/// Inherited sockets nobody took (after start-up: a unit passing a socket no device uses).
pub fn unclaimed() -> Vec<PathBuf> {
    lock(&INHERITED).keys().cloned().collect()
}

/// Puts an inherited listener back (its device was removed): a device added later on the
/// same path serves it again. The service manager still listens on its own copy, so binding
/// the path anew would fail.
pub fn give_back(path: &Path, listener: UnixListener) {
    lock(&INHERITED).insert(path.to_path_buf(), listener);
}

/// The inherited listener bound to `path`, if any (once).
pub fn take(path: &Path) -> Option<UnixListener> {
    lock(&INHERITED).remove(path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    #[test]
    fn only_listening_unix_sockets_bound_to_a_path_are_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        let fd = UnixListener::bind(&path).unwrap().into_raw_fd();
        assert_eq!(adopt(fd).unwrap(), path);
        assert!(take(&path).is_some());
        assert!(take(&path).is_none(), "taken once");
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let fd = file.as_raw_fd();
        assert!(matches!(adopt(fd), Err(InheritError::NotListening(_))));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(matches!(
            adopt(a.as_raw_fd()),
            Err(InheritError::NotListening(_))
        ));
        assert!(matches!(adopt(100_000), Err(InheritError::NotOpen(_))));
    }
}
