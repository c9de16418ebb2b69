//! The tier metadata: which extents are cold and where their records are, kept as a journal
//! of fixed-size, checksummed entries (`<hot file>.tiermap`, or `<cold file>.tiermap` when the hot tier is a block device).
//!
//! ```text
//! entry (48 bytes, little-endian)
//!   0  4 magic "NCXJ"     4  1 kind (1 geometry, 2 cold, 3 hot, 4 clean)   5 3 zero
//!   8  8 sequence number (entry i of the file has sequence i)
//!  16  8 extent (geometry: extent size)     24 8 generation (geometry: extent count)
//!  32  8 record offset in the cold file     40 4 record length    44 4 CRC32C of 0..44
//! ```
//!
//! Durability rules. An entry is appended and `fdatasync`ed before the change it describes is
//! acted on: a cold entry only after its record is durable in the cold file, and before the
//! hot copy is released; a hot entry only after the promoted data is durable in the hot file.
//! Replay applies entries in order and stops at the first entry that is torn or corrupt (bad
//! magic, checksum or sequence): everything after it was never acknowledged. Entry 0 records the
//! geometry (refused if it does not match the device). A clean shutdown appends a `clean` entry;
//! its absence means the start-up check must run. Compaction rewrites the journal as a snapshot
//! (geometry + one cold entry per cold extent) to a temporary file, syncs it and renames it over
//! the journal, then syncs the directory.

// Data read from disk is as untrusted as a guest's: no indexing or arithmetic that can panic.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::sys::private_file::open_private;
use crate::sys::replace::replace_file;

/// Bytes per entry.
pub const ENTRY_LEN: usize = 48;
const MAGIC: [u8; 4] = *b"NCXJ";

/// Where a cold extent's record lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColdLocation {
    /// Byte offset of the record in the cold file.
    pub offset: u64,
    /// Record length (header + compressed data).
    pub len: u32,
    /// The extent's generation when it was compressed.
    pub generation: u64,
}

/// One journal entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// The device's geometry.
    Geometry {
        /// Extent size in bytes.
        extent_size: u64,
        /// Number of extents.
        extents: u64,
    },
    /// Extent `extent` is now cold at `location`.
    Cold {
        /// The extent.
        extent: u64,
        /// Its record.
        location: ColdLocation,
    },
    /// Extent `extent` is hot again (or unwritten): its data is in the hot file.
    Hot {
        /// The extent.
        extent: u64,
    },
    /// The daemon shut down cleanly after this point.
    Clean,
}

/// Errors reading or writing the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
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
    /// The journal exists but even its first entry is unreadable: refuse rather than start
    /// over and forget which extents are cold.
    #[error("tier metadata {0} is corrupt from its first entry")]
    Corrupt(PathBuf),
    /// The journal is for another geometry.
    #[error("tier metadata {path} is for extent size {found_size} x {found_count}, the device has {want_size} x {want_count}")]
    Geometry {
        /// The journal.
        path: PathBuf,
        /// Found.
        found_size: u64,
        /// Found.
        found_count: u64,
        /// Wanted.
        want_size: u64,
        /// Wanted.
        want_count: u64,
    },
}

impl Entry {
    /// The 48 bytes of entry number `seq`.
    pub fn encode(&self, seq: u64) -> [u8; ENTRY_LEN] {
        let (kind, a, b, offset, len) = match *self {
            Entry::Geometry {
                extent_size,
                extents,
            } => (1u8, extent_size, extents, 0, 0),
            Entry::Cold { extent, location } => (
                2,
                extent,
                location.generation,
                location.offset,
                location.len,
            ),
            Entry::Hot { extent } => (3, extent, 0, 0, 0),
            Entry::Clean => (4, 0, 0, 0, 0),
        };
        let mut out = [0u8; ENTRY_LEN];
        let mut put = |at: usize, bytes: &[u8]| {
            if let Some(dst) = out.get_mut(at..at.saturating_add(bytes.len())) {
                dst.copy_from_slice(bytes);
            }
        };
        put(0, &MAGIC);
        put(4, &[kind]);
        put(8, &seq.to_le_bytes());
        put(16, &a.to_le_bytes());
        put(24, &b.to_le_bytes());
        put(32, &offset.to_le_bytes());
        put(40, &len.to_le_bytes());
        let crc = crc32c::crc32c(out.get(..44).unwrap_or_default());
        if let Some(dst) = out.get_mut(44..48) {
            dst.copy_from_slice(&crc.to_le_bytes());
        }
        out
    }

    /// Parses entry number `seq`; `None` if it is torn, corrupt or out of sequence.
    pub fn decode(bytes: &[u8], seq: u64) -> Option<Self> {
        let b: &[u8; ENTRY_LEN] = bytes.get(..ENTRY_LEN)?.try_into().ok()?;
        let u64_at = |at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(
                b.get(at..at.saturating_add(8))?.try_into().ok()?,
            ))
        };
        let u32_at = |at: usize| -> Option<u32> {
            Some(u32::from_le_bytes(
                b.get(at..at.saturating_add(4))?.try_into().ok()?,
            ))
        };
        if b.get(..4)? != MAGIC || crc32c::crc32c(b.get(..44)?) != u32_at(44)? {
            return None;
        }
        if b.get(5..8)? != [0, 0, 0] || u64_at(8)? != seq {
            return None;
        }
        let (a, bb, offset, len) = (u64_at(16)?, u64_at(24)?, u64_at(32)?, u32_at(40)?);
        match b.get(4)? {
            1 => Some(Entry::Geometry {
                extent_size: a,
                extents: bb,
            }),
            2 => Some(Entry::Cold {
                extent: a,
                location: ColdLocation {
                    offset,
                    len,
                    generation: bb,
                },
            }),
            3 => Some(Entry::Hot { extent: a }),
            4 => Some(Entry::Clean),
            _ => None,
        }
    }
}

/// What replay found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// Cold extents and their records.
    pub cold: BTreeMap<u64, ColdLocation>,
    /// Whether the last valid entry was `clean`.
    pub clean: bool,
    /// Valid entries.
    pub entries: u64,
    /// Bytes after the last valid entry (a torn tail), discarded.
    pub torn_bytes: u64,
}

/// Applies the valid prefix of a journal's bytes; checks the geometry if one is recorded.
pub fn replay(bytes: &[u8]) -> (Replayed, Option<(u64, u64)>) {
    let mut out = Replayed::default();
    let mut geometry = None;
    let mut seq = 0u64;
    for chunk in bytes.chunks(ENTRY_LEN) {
        let Some(entry) = Entry::decode(chunk, seq) else {
            break;
        };
        out.clean = entry == Entry::Clean;
        match entry {
            Entry::Geometry {
                extent_size,
                extents,
            } => geometry = Some((extent_size, extents)),
            Entry::Cold { extent, location } => {
                out.cold.insert(extent, location);
            }
            Entry::Hot { extent } => {
                out.cold.remove(&extent);
            }
            Entry::Clean => {}
        }
        seq = seq.saturating_add(1);
    }
    out.entries = seq;
    let valid = seq.saturating_mul(ENTRY_LEN as u64);
    out.torn_bytes = (bytes.len() as u64).saturating_sub(valid);
    (out, geometry)
}

/// The journal file, open for appending.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    next_seq: u64,
}

impl Journal {
    /// Opens (creating) the journal at `path` for a device of the given geometry: replays it,
    /// drops a torn tail, and returns what it says.
    pub fn open(
        path: &Path,
        extent_size: u64,
        extents: u64,
    ) -> Result<(Self, Replayed), JournalError> {
        let io = |action| {
            let path = path.to_path_buf();
            move |source| JournalError::Io {
                action,
                path,
                source,
            }
        };
        let mut file = open_private(path).map_err(io("cannot open"))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io("cannot read"))?;
        let (replayed, geometry) = replay(&bytes);
        let mut journal = Self {
            path: path.to_path_buf(),
            file,
            next_seq: replayed.entries,
        };
        match geometry {
            Some((size, count)) if (size, count) != (extent_size, extents) => {
                return Err(JournalError::Geometry {
                    path: path.to_path_buf(),
                    found_size: size,
                    found_count: count,
                    want_size: extent_size,
                    want_count: extents,
                })
            }
            Some(_) => {
                // Drop a torn tail so new entries follow the last valid one.
                let valid = replayed.entries.saturating_mul(ENTRY_LEN as u64);
                journal.file.set_len(valid).map_err(io("cannot truncate"))?;
            }
            None if !bytes.is_empty() => return Err(JournalError::Corrupt(path.to_path_buf())),
            None => {
                // New: start with the geometry.
                journal.file.set_len(0).map_err(io("cannot truncate"))?;
                journal.next_seq = 0;
                journal.append(&[Entry::Geometry {
                    extent_size,
                    extents,
                }])?;
            }
        }
        Ok((journal, replayed))
    }

    /// Appends entries and makes them durable (`fdatasync`) before returning. The sequence
    /// only advances once they are: after a failure the next append takes the same numbers
    /// and the same place, so a failed append never leaves a hole that the replay at the next
    /// start would stop at (dropping everything after it).
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), JournalError> {
        let mut bytes = Vec::with_capacity(entries.len().saturating_mul(ENTRY_LEN));
        let mut seq = self.next_seq;
        for entry in entries {
            bytes.extend_from_slice(&entry.encode(seq));
            seq = seq.saturating_add(1);
        }
        let offset = self.next_seq.saturating_mul(ENTRY_LEN as u64);
        use std::os::unix::fs::FileExt;
        let io = |action| {
            let path = self.path.clone();
            move |source| JournalError::Io {
                action,
                path,
                source,
            }
        };
        self.file
            .write_all_at(&bytes, offset)
            .map_err(io("cannot write"))?;
        self.file.sync_data().map_err(io("cannot sync"))?;
        self.next_seq = seq;
        Ok(())
    }

    /// Entries written so far.
    pub fn len(&self) -> u64 {
        self.next_seq
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.next_seq == 0
    }

    /// Rewrites the journal as a snapshot of `cold` (atomically: temporary file, sync, rename,
    /// directory sync).
    pub fn compact(
        &mut self,
        extent_size: u64,
        extents: u64,
        cold: &BTreeMap<u64, ColdLocation>,
    ) -> Result<(), JournalError> {
        let mut entries = vec![Entry::Geometry {
            extent_size,
            extents,
        }];
        entries.extend(
            cold.iter()
                .map(|(&extent, &location)| Entry::Cold { extent, location }),
        );
        let mut bytes = Vec::with_capacity(entries.len().saturating_mul(ENTRY_LEN));
        for (seq, entry) in entries.iter().enumerate() {
            bytes.extend_from_slice(&entry.encode(seq as u64));
        }
        replace_file(&self.path, &bytes)?;
        self.file = open_private(&self.path).map_err(|source| JournalError::Io {
            action: "cannot reopen",
            path: self.path.clone(),
            source,
        })?;
        self.next_seq = entries.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;
    use std::io::Write;

    fn cold(offset: u64) -> ColdLocation {
        ColdLocation {
            offset,
            len: 100,
            generation: 2,
        }
    }

    #[test]
    fn a_failed_append_leaves_no_hole_in_the_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut journal, _) = Journal::open(&path, 1 << 20, 64).unwrap();
        journal.append(&[Entry::Hot { extent: 1 }]).unwrap();
        // The disk refuses one write (here: the file swapped for a read-only handle).
        let writable = std::mem::replace(&mut journal.file, File::open(&path).unwrap());
        assert!(journal.append(&[Entry::Hot { extent: 2 }]).is_err());
        journal.file = writable;
        journal.append(&[Entry::Hot { extent: 3 }]).unwrap();
        // Every acknowledged entry replays: none is hidden behind a gap.
        let (replayed, _) = replay(&std::fs::read(&path).unwrap());
        assert_eq!(replayed.entries, journal.len());
        assert_eq!(journal.len(), 3, "geometry, extent 1, extent 3");
    }

    #[test]
    fn entries_round_trip_and_refuse_corruption() {
        let entries = [
            Entry::Geometry {
                extent_size: 1 << 20,
                extents: 64,
            },
            Entry::Cold {
                extent: 5,
                location: cold(4096),
            },
            Entry::Hot { extent: 5 },
            Entry::Clean,
        ];
        for (seq, entry) in entries.iter().enumerate() {
            let bytes = entry.encode(seq as u64);
            assert_eq!(Entry::decode(&bytes, seq as u64), Some(*entry));
            assert_eq!(
                Entry::decode(&bytes, seq as u64 + 1),
                None,
                "wrong sequence"
            );
            for byte in 0..ENTRY_LEN {
                let mut bad = bytes;
                bad[byte] ^= 0x10;
                assert_eq!(Entry::decode(&bad, seq as u64), None, "flip at {byte}");
            }
        }
    }

    #[test]
    fn replay_of_every_prefix_gives_the_state_after_the_last_whole_entry() {
        let entries = [
            Entry::Geometry {
                extent_size: 1 << 20,
                extents: 8,
            },
            Entry::Cold {
                extent: 1,
                location: cold(0),
            },
            Entry::Cold {
                extent: 2,
                location: cold(100),
            },
            Entry::Hot { extent: 1 },
            Entry::Clean,
        ];
        let bytes: Vec<u8> = entries
            .iter()
            .enumerate()
            .flat_map(|(seq, e)| e.encode(seq as u64))
            .collect();
        for cut in 0..=bytes.len() {
            let (state, geometry) = replay(&bytes[..cut]);
            let whole = (cut / ENTRY_LEN) as u64;
            assert_eq!(state.entries, whole);
            assert_eq!(state.torn_bytes, (cut % ENTRY_LEN) as u64);
            assert_eq!(geometry.is_some(), whole >= 1);
            let expect: Vec<u64> = match whole {
                0 | 1 => vec![],
                2 => vec![1],
                3 => vec![1, 2],
                _ => vec![2],
            };
            assert_eq!(
                state.cold.keys().copied().collect::<Vec<_>>(),
                expect,
                "cut {cut}"
            );
            assert_eq!(state.clean, whole == 5);
        }
    }

    #[test]
    fn the_journal_survives_reopen_torn_tails_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.tiermap");
        let (mut j, state) = Journal::open(&path, 4096, 16).unwrap();
        assert!(state.cold.is_empty());
        j.append(&[Entry::Cold {
            extent: 3,
            location: cold(0),
        }])
        .unwrap();
        j.append(&[Entry::Cold {
            extent: 4,
            location: cold(100),
        }])
        .unwrap();
        drop(j);
        // A torn write: half an entry at the end.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(&Entry::Hot { extent: 3 }.encode(3)[..20])
            .unwrap();
        drop(f);
        let (mut j, state) = Journal::open(&path, 4096, 16).unwrap();
        assert_eq!(state.cold.len(), 2);
        assert!(!state.clean);
        j.append(&[Entry::Hot { extent: 3 }, Entry::Clean]).unwrap();
        drop(j);
        let (mut j, state) = Journal::open(&path, 4096, 16).unwrap();
        assert_eq!(state.cold.keys().copied().collect::<Vec<_>>(), vec![4]);
        assert!(state.clean);
        j.compact(4096, 16, &state.cold).unwrap();
        assert_eq!(j.len(), 2);
        drop(j);
        let (_, again) = Journal::open(&path, 4096, 16).unwrap();
        assert_eq!(again.cold, state.cold);
        assert!(matches!(
            Journal::open(&path, 8192, 16),
            Err(JournalError::Geometry { .. })
        ));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(
            Journal::open(&path, 4096, 16),
            Err(JournalError::Corrupt(_))
        ));
    }
}
