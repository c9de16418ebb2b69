//! The persistent device list: `<state-dir>/devices.json`.
//!
//! Every successful change rewrites the whole file atomically: write `devices.json.tmp`,
//! `fsync` it, rename it over `devices.json`, `fsync` the directory. A crash leaves either the
//! old or the new list, never a torn one. A file that does not parse, or has an unknown
//! version, is a start-up error: the daemon refuses to run rather than forget devices.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sys::replace::replace_file;

/// Current file format version.
const VERSION: u32 = 1;
const FILE: &str = "devices.json";

/// Errors reading or writing the state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Rewriting the file failed (the old one is intact).
    #[error(transparent)]
    Replace(#[from] crate::sys::replace::ReplaceError),
    /// A filesystem operation failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file exists but is not a device list we understand.
    #[error("{path} is corrupt or from an unknown version: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// One persisted device: its type and its options, exactly as given to `device.add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    /// Device type (`blk` or `net`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Options as `key → value` strings.
    pub options: BTreeMap<String, String>,
}

/// One persisted QoS group: its name and limit options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRecord {
    /// Group name.
    pub name: String,
    /// Limit options as `key → value` strings.
    pub options: BTreeMap<String, String>,
}

/// One persisted switch (created with `switch.add`): its name and options (`uplink`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchRecord {
    /// Switch name.
    pub name: String,
    /// Options as `key → value` strings.
    pub options: BTreeMap<String, String>,
}

/// Everything the state directory records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Saved {
    /// Devices added at run time.
    pub devices: Vec<DeviceRecord>,
    /// QoS groups (absent in files written before groups existed).
    pub groups: Vec<GroupRecord>,
    /// Switches added with `switch.add` (absent in older files).
    pub switches: Vec<SwitchRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    devices: Vec<DeviceRecord>,
    #[serde(default)]
    groups: Vec<GroupRecord>,
    #[serde(default)]
    switches: Vec<SwitchRecord>,
}

/// The state directory.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Opens (creating, mode 0700) the state directory.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StateError::Io {
                action: "cannot create state directory",
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Reads what was recorded (nothing if the file does not exist yet).
    pub fn load(&self) -> Result<Saved, StateError> {
        let path = self.dir.join(FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Saved::default()),
            Err(source) => {
                return Err(StateError::Io {
                    action: "cannot read",
                    path,
                    source,
                })
            }
        };
        let file: StateFile = serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if file.version != VERSION {
            return Err(StateError::Corrupt {
                path,
                reason: format!("version {} (this daemon reads {VERSION})", file.version),
            });
        }
        Ok(Saved {
            devices: file.devices,
            groups: file.groups,
            switches: file.switches,
        })
    }

    /// Replaces the recorded state atomically and durably.
    pub fn save(&self, saved: &Saved) -> Result<(), StateError> {
        let path = self.dir.join(FILE);
        let body = serde_json::to_vec_pretty(&StateFile {
            version: VERSION,
            devices: saved.devices.clone(),
            groups: saved.groups.clone(),
            switches: saved.switches.clone(),
        })
        .map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        replace_file(&path, &body).map_err(StateError::from)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;

    fn record(id: &str) -> DeviceRecord {
        DeviceRecord {
            kind: "blk".into(),
            options: [("id".to_string(), id.to_string())].into_iter().collect(),
        }
    }

    #[test]
    fn round_trip_and_empty_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("state")).unwrap();
        assert_eq!(store.load().unwrap(), Saved::default());
        let saved = Saved {
            devices: vec![record("a"), record("b")],
            groups: vec![GroupRecord {
                name: "g".into(),
                options: [("iops".to_string(), "10".to_string())]
                    .into_iter()
                    .collect(),
            }],
            switches: vec![SwitchRecord {
                name: "t7".into(),
                options: [("uplink".to_string(), "up0".to_string())]
                    .into_iter()
                    .collect(),
            }],
        };
        store.save(&saved).unwrap();
        assert_eq!(store.load().unwrap(), saved);
        // Files from before groups existed still load.
        std::fs::write(
            dir.path().join("state").join(FILE),
            br#"{"version":1,"devices":[]}"#,
        )
        .unwrap();
        assert_eq!(store.load().unwrap(), Saved::default());
        let list = dir.path().join("state").join(FILE);
        assert!(!crate::sys::replace::temp_path(&list).exists());
    }

    #[test]
    fn corrupt_and_unknown_versions_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        std::fs::write(dir.path().join(FILE), b"{\"version\":1,\"devices\":[").unwrap();
        assert!(matches!(store.load(), Err(StateError::Corrupt { .. })));
        std::fs::write(dir.path().join(FILE), b"{\"version\":9,\"devices\":[]}").unwrap();
        assert!(matches!(store.load(), Err(StateError::Corrupt { .. })));
    }
}
