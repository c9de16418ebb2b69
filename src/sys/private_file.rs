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
/// link is a symlink; `pin` already refused to follow one).
pub fn reopen(pinned: &File, options: &OpenOptions) -> std::io::Result<File> {
    options.open(format!("/proc/self/fd/{}", pinned.as_raw_fd()))
}

/// Reads a small file of the daemon's own at `path` (a note it wrote there earlier), never
/// through a symlink and never waiting: `None` unless it is a regular file ([`pin`], its
/// type checked on the fd), owned by the daemon's user and with no other hard link (a file
/// planted by whoever else can write the directory, or a link to another of our files, is
/// not ours), and not held by someone else's lease. The reopen is `O_NONBLOCK`: a lease
/// holder (who must own the file) gets its break, and we get `EWOULDBLOCK` at once instead
/// of waiting up to `lease-break-time` (45 s) with the caller's locks held.
pub fn open_regular(path: &Path) -> std::io::Result<Option<File>> {
    use std::os::unix::fs::MetadataExt;
    let pinned = match pin(path) {
        Ok(pinned) => pinned,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = pinned.metadata()?;
    if !meta.is_file() || meta.uid() != super::peer::effective_uid() || meta.nlink() != 1 {
        return Ok(None);
    }
    let mut options = OpenOptions::new();
    options
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC);
    match reopen(&pinned, &options) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
        Err(e) => Err(e),
    }
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
    use crate::sys::kick::testing::within_10s;
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
        let len = within_10s(move || {
            let mut options = OpenOptions::new();
            options.read(true);
            reopen(&pinned, &options).unwrap().metadata().unwrap().len()
        });
        assert_eq!(len, 4096, "the file that was checked");
    }

    #[test]
    fn only_a_lone_regular_file_of_our_own_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours");
        std::fs::write(&ours, b"tap0").unwrap();
        assert!(open_regular(&ours).unwrap().is_some());
        // Planted by another user (the tests run as root, who may give it away).
        let planted = dir.path().join("planted");
        std::fs::write(&planted, b"tap0").unwrap();
        std::os::unix::fs::chown(&planted, Some(65534), None).unwrap();
        assert!(open_regular(&planted).unwrap().is_none(), "another user's");
        // A second hard link to a file of ours.
        let linked = dir.path().join("linked");
        std::fs::hard_link(&ours, &linked).unwrap();
        assert!(open_regular(&linked).unwrap().is_none(), "a hard link");
        assert!(
            open_regular(&ours).unwrap().is_none(),
            "linked elsewhere too"
        );
    }

    #[test]
    fn a_leased_file_is_refused_at_once() {
        // A write lease (taken by its owner, with no other open of the file) makes a plain
        // open wait up to lease-break-time (45 s); ours must answer at once. The lease is
        // taken on a tmpfs (/dev/shm), where leases work whatever /tmp is.
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let path = dir.path().join("marker");
        std::fs::write(&path, b"tap0").unwrap();
        let holder = File::open(&path).unwrap();
        // Linux's F_SETSIG (<bits/fcntl-linux.h>), which the libc crate does not export.
        const F_SETSIG: libc::c_int = 10;
        // The break is signalled to the holder, this process: SIGURG (ignored by default)
        // instead of SIGIO (which would end the test run).
        // SAFETY: a valid fd; F_SETSIG takes an int argument.
        let set = unsafe { libc::fcntl(holder.as_raw_fd(), F_SETSIG, libc::SIGURG) };
        assert_eq!(set, 0);
        // SAFETY: a valid fd; F_SETLEASE takes an int argument.
        let rc = unsafe { libc::fcntl(holder.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) };
        assert_eq!(rc, 0, "lease: {}", std::io::Error::last_os_error());
        let opened = within_10s(move || open_regular(&path).unwrap().is_some());
        assert!(!opened, "a leased file is not read");
        drop(holder);
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("marker");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(within_10s(move || open_regular(&fifo).unwrap().is_none()));
    }
}
