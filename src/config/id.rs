//! Device and switch ids: they appear in logs, metrics labels and file names, so they are kept
//! to a safe alphabet (`[A-Za-z0-9._-]`, 1..=64 characters). A device without `id=` is named
//! after its socket file (`vm1-disk0.sock` → `vm1-disk0`).

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::path::Path;

/// Checks an id; the error is a message for the user.
pub fn validate(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "id `{id}` must be 1..=64 characters of [A-Za-z0-9._-]"
        ))
    }
}

/// The id derived from a socket path: its file stem.
pub fn from_socket(socket: &Path) -> Result<String, String> {
    socket
        .file_stem()
        .and_then(|stem| stem.to_str())
        .filter(|stem| !stem.is_empty())
        .map(str::to_string)
        .ok_or_else(|| "cannot derive an id from the socket path; give id=".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_and_derived() {
        assert!(validate("vm1-disk0.a_b").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate(bad).is_err(), "accepted {bad:?}");
        }
        assert_eq!(
            from_socket(Path::new("/run/vm1-nic0.sock")).unwrap(),
            "vm1-nic0"
        );
        assert!(from_socket(Path::new("/")).is_err());
    }
}
