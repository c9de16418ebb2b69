//! Opening a device's backing file or block device.
//!
//! A missing file is created sparse when a size is given; an existing file keeps its size (a
//! different `size=` is refused rather than silently growing or truncating a disk). The file is
//! locked with `flock` (shared when read-only, exclusive otherwise) so two devices, or two
//! daemons, never write one image. The final path component is never followed if it is a
//! symlink; an existing one is opened `O_PATH` first, its type checked on that fd (only a
//! regular file, or a block device where allowed, is opened for I/O), then reopened through
//! it: a path changed in between cannot make the daemon open something else.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::sys::private_file::{open_private, pin, reopen};

/// Errors opening a backing.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    /// open/create failed.
    #[error("cannot open {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another device or process holds the lock.
    #[error("{0} is already in use by another device or process")]
    Locked(PathBuf),
    /// The file is neither regular nor a block device.
    #[error("{0} is not a regular file or block device")]
    NotAFileOrBlockDevice(PathBuf),
    /// A block device, and this daemon was not started with `--allow-block-devices`.
    #[error(
        "{0} is a block device; the daemon serves block devices only with --allow-block-devices"
    )]
    BlockDeviceNotAllowed(PathBuf),
    /// The existing size differs from `size=`.
    #[error("{path} is {actual} bytes but size={requested} was given")]
    SizeMismatch {
        /// The path.
        path: PathBuf,
        /// Size on disk.
        actual: u64,
        /// Size asked for.
        requested: u64,
    },
    /// The size is zero or not a multiple of 512.
    #[error("{path} has size {size}, not a non-zero multiple of 512")]
    BadSize {
        /// The path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// A metadata syscall failed.
    #[error("cannot set up {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// How to open a backing file.
#[derive(Debug, Clone)]
pub struct OpenRequest<'a> {
    /// The path.
    pub path: &'a Path,
    /// Size for a new file, or the size the existing one must have.
    pub size: Option<u64>,
    /// Open read-only.
    pub readonly: bool,
    /// Open with `O_DIRECT`.
    pub direct: bool,
    /// Take the lock now (false: the destination of a migration, which takes it later;
    /// `storage::image_lock`).
    pub lock: bool,
}

/// An opened, locked backing file.
#[derive(Debug)]
pub struct BackingFile {
    /// The open file; the lock lives as long as it does.
    pub file: File,
    /// Size in bytes.
    pub size: u64,
    /// Whether it is a block device (affects nothing in the data path; reported in info).
    pub is_block_device: bool,
}

/// Whether host block devices may back disks (`--allow-block-devices`; off by default: a
/// control client naming `/dev/sda` would otherwise get the host's disk as a guest disk).
static ALLOW_BLOCK_DEVICES: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Sets the daemon-wide block-device policy (from the command line, at start).
pub fn allow_block_devices(allowed: bool) {
    ALLOW_BLOCK_DEVICES.store(allowed, std::sync::atomic::Ordering::Release);
}

/// Opens (or creates) and locks a backing file (a block device only when allowed).
pub fn open_backing(request: &OpenRequest<'_>) -> Result<BackingFile, BackingError> {
    let path = request.path;
    let with_path = |source| BackingError::Io {
        path: path.to_path_buf(),
        source,
    };
    // A control client may name a FIFO, whose open would wait for a writer (the control
    // thread, holding the registry, with it), or a character device. An existing path is
    // opened first with O_PATH, which never waits and reads or locks nothing, its type
    // checked on that fd, and only then reopened, through the fd (/proc/self/fd/N: the same
    // file, whatever the path has become since). Not by opening O_NONBLOCK: that breaks a
    // lease instead of waiting for it, and skips a removable block device's media checks.
    // A path that does not exist yet is created with O_EXCL: never a FIFO.
    let mut flags = libc::O_CLOEXEC;
    if request.direct {
        flags |= libc::O_DIRECT;
    }
    let mut options = OpenOptions::new();
    options
        .read(true)
        .write(!request.readonly)
        .custom_flags(flags | libc::O_NOFOLLOW);
    let created = !path.exists() && request.size.is_some() && !request.readonly;
    if created {
        options.create_new(true).mode(0o600);
    }
    // The kind is known before the open for I/O, and what is opened is that file: a new one
    // (O_EXCL: a regular file), or the pinned one reopened through its fd.
    let (opened, is_block_device) = if created {
        (options.open(path), false)
    } else {
        let pinned = pin(path).map_err(|source| BackingError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        // Judged before any open for I/O (a block device's open alone may spin up or load
        // media): what kind of file, and whether block devices may back disks.
        let kind = pinned.metadata().map_err(with_path)?.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(BackingError::NotAFileOrBlockDevice(path.to_path_buf()));
        }
        if kind.is_block_device() && !ALLOW_BLOCK_DEVICES.load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(BackingError::BlockDeviceNotAllowed(path.to_path_buf()));
        }
        options.custom_flags(flags);
        (reopen(&pinned, &options), kind.is_block_device())
    };
    let mut file = opened.map_err(|source| BackingError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if request.lock {
        lock(&file, request.readonly).map_err(|e| match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => BackingError::Locked(path.to_path_buf()),
            _ => with_path(e),
        })?;
    }
    if created {
        if let Some(size) = request.size {
            file.set_len(size).map_err(with_path)?;
        }
    }
    // Seeking to the end works for both regular files and block devices.
    let size = file.seek(SeekFrom::End(0)).map_err(with_path)?;
    if let Some(requested) = request.size {
        if requested != size {
            return Err(BackingError::SizeMismatch {
                path: path.to_path_buf(),
                actual: size,
                requested,
            });
        }
    }
    if size == 0 || size % 512 != 0 {
        return Err(BackingError::BadSize {
            path: path.to_path_buf(),
            size,
        });
    }
    Ok(BackingFile {
        file,
        size,
        is_block_device,
    })
}

/// Opens (creating, mode 0600) and, when `locked`, locks exclusively an append-style data file
/// such as a cold tier; it must be a regular file. (Unlocked: a migration's destination, which
/// takes the lock with the image: `storage::tier::handover`.)
pub fn open_log(path: &Path, locked: bool) -> Result<File, BackingError> {
    let file = open_private(path).map_err(|source| BackingError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if locked {
        lock(&file, false).map_err(|e| match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => BackingError::Locked(path.to_path_buf()),
            _ => BackingError::Io {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
    }
    let is_file = file
        .metadata()
        .map_err(|source| BackingError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .file_type()
        .is_file();
    if !is_file {
        return Err(BackingError::NotAFileOrBlockDevice(path.to_path_buf()));
    }
    Ok(file)
}

fn lock(file: &File, shared: bool) -> std::io::Result<()> {
    let operation = if shared { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    // During a live upgrade's hand-over the previous process still holds the lock for a
    // moment (`sys::takeover`).
    crate::sys::takeover::retry_while_busy(
        || {
            // SAFETY: flock only reads the fd number, which `file` keeps open for the call.
            let rc = unsafe { libc::flock(file.as_raw_fd(), operation) };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        },
        |e| e.raw_os_error() == Some(libc::EWOULDBLOCK),
    )
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;

    fn request(path: &Path, size: Option<u64>) -> OpenRequest<'_> {
        OpenRequest {
            path,
            size,
            readonly: false,
            direct: false,
            lock: true,
        }
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let refused = crate::sys::kick::testing::within_10s(move || {
            let mut request = request(&path, None);
            request.readonly = true;
            matches!(
                open_backing(&request),
                Err(BackingError::NotAFileOrBlockDevice(_))
            )
        });
        assert!(refused, "refused at once, no writer needed");
    }

    #[test]
    fn creates_sparse_and_reopens_with_same_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let backing = open_backing(&request(&path, Some(1 << 20))).unwrap();
        assert_eq!(backing.size, 1 << 20);
        drop(backing);
        let backing = open_backing(&request(&path, None)).unwrap();
        assert_eq!(backing.size, 1 << 20);
    }

    #[test]
    fn second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let _first = open_backing(&request(&path, Some(4096))).unwrap();
        assert!(matches!(
            open_backing(&request(&path, None)),
            Err(BackingError::Locked(_))
        ));
    }

    #[test]
    fn size_mismatch_missing_file_and_symlink_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        drop(open_backing(&request(&path, Some(4096))).unwrap());
        assert!(matches!(
            open_backing(&request(&path, Some(8192))),
            Err(BackingError::SizeMismatch { .. })
        ));
        assert!(open_backing(&request(&dir.path().join("missing"), None)).is_err());
        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(open_backing(&request(&link, None)).is_err());
    }
}
