//! Opening the daemon's own data files (tier journals, cold tiers): created mode 0600 if
//! missing, never truncated, never through a symlink, close-on-exec. And reading or copying
//! small files at client-influenced paths only when they are regular files: a FIFO planted
//! there must not make the reading thread wait for a writer. Any file at such a path is
//! opened in two steps, [`pin`] (`O_PATH`: judge the type on the fd) then [`reopen`]
//! (through that fd), so a path swapped in between changes nothing.
//!
//! Their paths derive from client-given ones, so following a link placed there would let a
//! control client make the daemon write wherever it points.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Opens `path` read-write, creating it (0600) when missing; fails with `ELOOP` on a symlink.
pub fn open_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// The file at `path` itself (a symlink there is not followed: the fd is the link's), opened
/// `O_PATH`: no wait (a FIFO's open waits for a writer), no read, no lease or lock taken.
/// Judge its type on this fd, then [`reopen`] it for I/O: a path changed in between cannot
/// make the caller open something else.
pub fn pin(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Opens the file `pinned` ([`pin`]) holds with `options`, through `/proc/self/fd/N`: the
/// same file, whatever its path has become. `options` must not say `O_NOFOLLOW` (the magic
/// link is a symlink; `pin` already refused to follow one). Not by opening `O_NONBLOCK`
/// instead, which would break a lease rather than wait for it.
pub fn reopen(pinned: &File, options: &OpenOptions) -> std::io::Result<File> {
    options.open(format!("/proc/self/fd/{}", pinned.as_raw_fd()))
}

/// Reads a regular file at `path`, never through a symlink, never waiting for a FIFO's
/// writer ([`pin`], its type checked, then [`reopen`]); `None` if there is no regular file.
pub fn open_regular(path: &Path) -> std::io::Result<Option<File>> {
    let pinned = match pin(path) {
        Ok(pinned) => pinned,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !pinned.metadata()?.is_file() {
        return Ok(None);
    }
    let mut options = OpenOptions::new();
    options.read(true).custom_flags(libc::O_CLOEXEC);
    reopen(&pinned, &options).map(Some)
}

/// Copies the regular file at `from` ([`open_regular`]) into a new file `to` (mode 0600,
/// `O_EXCL`: never through a link, never over anything), durably: the copy and its directory
/// entry are synced before this returns true, so the caller may then remove `from`. False
/// when there is no regular file at `from`. On an error nothing is left at `to` (a partial
/// copy there would later be taken for the whole file).
pub fn copy_into_new(from: &Path, to: &Path) -> std::io::Result<bool> {
    let Some(mut source) = open_regular(from)? else {
        return Ok(false);
    };
    let mut copy = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(to)?;
    let copied = std::io::copy(&mut source, &mut copy)
        .and_then(|_| copy.sync_all())
        .and_then(|()| super::replace::sync_parent(to));
    if let Err(e) = copied {
        let _ = std::fs::remove_file(to);
        return Err(e);
    }
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_0600_keeps_contents_and_refuses_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, b"kept").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let _ = open_private(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"kept");
        let fresh = dir.path().join("fresh");
        let _ = open_private(&fresh).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let err = open_private(&link).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
    }

    #[test]
    fn copies_only_a_regular_file_into_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from");
        std::fs::write(&from, b"journal").unwrap();
        let to = dir.path().join("to");
        assert!(copy_into_new(&from, &to).unwrap());
        assert_eq!(std::fs::read(&to).unwrap(), b"journal");
        let mode = std::fs::metadata(&to).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Never over anything: a file, or a link (dangling or not), stays as it is.
        assert!(copy_into_new(&from, &to).is_err());
        let target = dir.path().join("target");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(copy_into_new(&from, &link).is_err());
        assert!(!target.exists(), "written through a link");
        // No regular file to copy: a link, a FIFO (no wait for a writer), nothing.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let from_link = dir.path().join("from-link");
        std::os::unix::fs::symlink(&from, &from_link).unwrap();
        // A copy that fails part-way leaves nothing behind (this file fails its first read:
        // address 0 of our own memory is not mapped).
        let failed = dir.path().join("failed");
        assert!(copy_into_new(Path::new("/proc/self/mem"), &failed).is_err());
        assert!(!failed.exists(), "a partial copy was left");
        for source in [&fifo, &from_link, &dir.path().join("missing")] {
            let to = dir.path().join("new");
            assert!(!copy_into_new(source, &to).unwrap(), "{}", source.display());
            assert!(!to.exists());
        }
    }

    #[test]
    fn a_path_swapped_for_a_fifo_after_the_check_still_opens_the_file_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, [7u8; 4096]).unwrap();
        let pinned = pin(&path).unwrap();
        assert!(pinned.metadata().unwrap().file_type().is_file());
        // The path becomes a FIFO between the check and the open.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        std::fs::rename(&fifo, &path).unwrap();
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut options = OpenOptions::new();
            options.read(true);
            let _ = done.send(reopen(&pinned, &options).map(|f| f.metadata().unwrap().len()));
        });
        assert_eq!(
            result
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("the open waited for a FIFO's writer")
                .unwrap(),
            4096,
            "the file that was checked"
        );
    }
}
