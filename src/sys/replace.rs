//! Durable whole-file replacement, for the small metadata files the daemon rewrites (the
//! device list, a tier journal's compaction).
//!
//! [`replace_file`] writes `<path>.tmp` (mode 0600), `fsync`s it, renames it over `path` and
//! `fsync`s the directory. When it returns `Ok`, the new contents survive a crash; a crash
//! before that leaves the old file intact (plus, at worst, a stale `.tmp` that the next
//! replacement removes). The temp file is never opened through a symlink.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A step of the replacement failed.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}")]
pub struct ReplaceError {
    /// What was being done.
    pub action: &'static str,
    /// On which path.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

/// The temporary file [`replace_file`] writes before renaming it over `path`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".tmp");
    PathBuf::from(name)
}

/// Replaces `path` with `bytes` atomically and durably (see the module docs).
pub fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), ReplaceError> {
    let temp = temp_path(path);
    let failed = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| ReplaceError {
            action,
            path,
            source,
        }
    };
    // A stale temp file (or anything a client placed at that name, a symlink included) is
    // removed, not followed; the new one is created exclusively, so a link appearing in
    // between makes this fail rather than write through it.
    match std::fs::remove_file(&temp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed("cannot remove the stale", &temp)(e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&temp)
        .map_err(failed("cannot create", &temp))?;
    file.write_all(bytes)
        .map_err(failed("cannot write", &temp))?;
    file.sync_all().map_err(failed("cannot fsync", &temp))?;
    drop(file);
    std::fs::rename(&temp, path).map_err(failed("cannot rename over", path))?;
    sync_parent(path).map_err(failed("cannot fsync the directory of", path))
}

/// Syncs the directory holding `path`, making a file created, renamed or removed there
/// durable as a name (its contents need their own `sync_all`).
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_contents_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("list.json");
        replace_file(&path, b"old").unwrap();
        replace_file(&path, b"new contents").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new contents");
        assert!(!temp_path(&path).exists());
        let mode = std::os::unix::fs::PermissionsExt::mode(&path.metadata().unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_symlink_at_the_temporary_name_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"someone else's").unwrap();
        let path = dir.path().join("list.json");
        std::os::unix::fs::symlink(&victim, temp_path(&path)).unwrap();
        replace_file(&path, b"ours").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"someone else's");
        assert_eq!(std::fs::read(&path).unwrap(), b"ours");
    }

    #[test]
    fn a_failed_replacement_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("list.json");
        replace_file(&path, b"old").unwrap();
        // The temporary path is a directory: creating the file fails before any rename.
        std::fs::create_dir(temp_path(&path)).unwrap();
        let err = replace_file(&path, b"new").unwrap_err();
        assert_eq!(err.action, "cannot remove the stale");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
    }
}
