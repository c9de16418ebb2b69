//! The vhost-user side of inflight tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`):
//! `GET_INFLIGHT_FD` and `SET_INFLIGHT_FD`, which `vhost-user-backend` answers with an error
//! (ending the connection), so the relay answers them with this module.
//!
//! `GET_INFLIGHT_FD` (the front-end's first start, or after a device reset): we create a
//! zeroed, sealed memfd sized for the queues, map it, and hand the fd back; QEMU keeps it.
//! `SET_INFLIGHT_FD` (every start, and after our restart): QEMU hands the fd back and we map
//! it. Either way the mapping becomes the device's current region ([`InflightSlot`]), which
//! its queue workers read on their next start (`ring::inflight` has the per-queue protocol).
//!
//! Everything in the messages is the front-end's: the sizes must describe at most the
//! device's queues at its largest queue size, the fd must be a regular file (memfd, shm)
//! large enough for the range, and the range is registered with the SIGBUS handler (a file
//! shrunk later reads zeros instead of ending the daemon).

// Front-end-controlled numbers flow through here: no indexing or arithmetic that can panic or
// wrap silently.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex};

use crate::lock::lock;
use crate::ring::inflight::{queue_region_size, InflightQueue};
use crate::sys::shared_map::SharedMapping;

/// `VHOST_USER_GET_INFLIGHT_FD`.
pub const GET_INFLIGHT_FD: u32 = 31;
/// `VHOST_USER_SET_INFLIGHT_FD`.
pub const SET_INFLIGHT_FD: u32 = 32;
/// `VhostUserInflight`: mmap_size, mmap_offset (u64), num_queues, queue_size (u16), padded.
pub const PAYLOAD_LEN: usize = 24;

/// Why an inflight message was refused (the connection is then dropped).
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The payload is not a `VhostUserInflight`.
    #[error("inflight message of {0} bytes")]
    Payload(usize),
    /// Queue count or size out of what the device allows.
    #[error("inflight region for {queues} queue(s) of {size}: beyond the device's {max_queues} of {max_size}")]
    Geometry {
        /// Queues asked for.
        queues: u16,
        /// Their size.
        size: u16,
        /// The device's queues.
        max_queues: u16,
        /// The device's largest queue size.
        max_size: u16,
    },
    /// The region's size or offset does not fit its queues or its file.
    #[error("inflight region: {0}")]
    Region(String),
    /// A system call failed.
    #[error("inflight region: {action}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io(action: &'static str) -> impl FnOnce(std::io::Error) -> InflightError {
    move |source| InflightError::Io { action, source }
}

/// One mapped inflight region (unmapped when the last user drops it).
pub struct InflightRegion {
    mapping: SharedMapping,
    queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// A fresh, zeroed region for `queues` queues of `queue_size` (GET_INFLIGHT_FD).
    fn create(queues: u16, queue_size: u16) -> Result<Self, InflightError> {
        let len = region_len(queues, queue_size);
        // SAFETY: memfd_create takes a NUL-terminated name and flags; the fd is owned at once.
        let fd = unsafe {
            libc::memfd_create(
                c"novacron-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io("memfd_create")(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(io("size the memfd"))?;
        // Its size can never change again: no SIGBUS for anyone mapping it.
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on our own fd with an integer argument.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io("seal the memfd")(std::io::Error::last_os_error()));
        }
        Self::map(file, 0, len, queues, queue_size)
    }

    /// Maps `len` bytes at `offset` of `file` (SET_INFLIGHT_FD), after checking them.
    fn map(
        file: File,
        offset: u64,
        len: usize,
        queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let needed = region_len(queues, queue_size);
        if len < needed {
            return Err(InflightError::Region(format!(
                "{len} bytes for {queues} queue(s) of {queue_size} (needs {needed})"
            )));
        }
        let mapping = SharedMapping::map(file, offset, needed)
            .map_err(|e| InflightError::Region(e.to_string()))?;
        Ok(Self {
            mapping,
            queues,
            queue_size,
        })
    }

    /// The view of queue `index` (`None` past the region's queues).
    ///
    /// The view points into this mapping: keep the region (its `Arc`) alive as long.
    pub fn queue(&self, index: u16) -> Option<InflightQueue> {
        if index >= self.queues {
            return None;
        }
        let offset = usize::from(index).checked_mul(queue_region_size(self.queue_size))?;
        if offset.checked_add(queue_region_size(self.queue_size))? > self.mapping.len() {
            return None;
        }
        // SAFETY: the offset and the queue's bytes lie inside the mapping (checked), which is
        // page-aligned, so the base is 64-aligned; the caller keeps the region alive.
        Some(unsafe { InflightQueue::new(self.mapping.base().add(offset), self.queue_size) })
    }

    /// The queue size the region was made for.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }
}

fn region_len(queues: u16, queue_size: u16) -> usize {
    usize::from(queues).saturating_mul(queue_region_size(queue_size))
}

/// A device's current inflight region, shared by the relay (which sets it) and the queue
/// workers (which read it when their queue starts).
pub struct InflightSlot {
    max_queues: u16,
    max_queue_size: u16,
    region: Mutex<Option<Arc<InflightRegion>>>,
}

/// A decoded `VhostUserInflight`.
struct Payload {
    mmap_size: u64,
    mmap_offset: u64,
    queues: u16,
    queue_size: u16,
}

fn decode(payload: &[u8]) -> Result<Payload, InflightError> {
    let u64_at = |at: usize| {
        payload
            .get(at..at.saturating_add(8))
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    let u16_at = |at: usize| {
        payload
            .get(at..at.saturating_add(2))
            .and_then(|b| <[u8; 2]>::try_from(b).ok())
            .map(u16::from_le_bytes)
    };
    match (u64_at(0), u64_at(8), u16_at(16), u16_at(18)) {
        (Some(mmap_size), Some(mmap_offset), Some(queues), Some(queue_size))
            if payload.len() == PAYLOAD_LEN =>
        {
            Ok(Payload {
                mmap_size,
                mmap_offset,
                queues,
                queue_size,
            })
        }
        _ => Err(InflightError::Payload(payload.len())),
    }
}

fn encode(p: &Payload) -> Vec<u8> {
    let mut out = Vec::with_capacity(PAYLOAD_LEN);
    out.extend_from_slice(&p.mmap_size.to_le_bytes());
    out.extend_from_slice(&p.mmap_offset.to_le_bytes());
    out.extend_from_slice(&p.queues.to_le_bytes());
    out.extend_from_slice(&p.queue_size.to_le_bytes());
    out.resize(PAYLOAD_LEN, 0);
    out
}

impl InflightSlot {
    /// A slot for a device of `max_queues` queues of at most `max_queue_size`.
    pub fn new(max_queues: u16, max_queue_size: u16) -> Self {
        Self {
            max_queues,
            max_queue_size,
            region: Mutex::new(None),
        }
    }

    /// Forgets the region (a new front-end connection: it brings its own, or none).
    pub fn clear(&self) {
        *lock(&self.region) = None;
    }

    /// The current region.
    pub fn current(&self) -> Option<Arc<InflightRegion>> {
        lock(&self.region).clone()
    }

    fn check(&self, queues: u16, size: u16) -> Result<(), InflightError> {
        if queues == 0 || queues > self.max_queues || size == 0 || size > self.max_queue_size {
            return Err(InflightError::Geometry {
                queues,
                size,
                max_queues: self.max_queues,
                max_size: self.max_queue_size,
            });
        }
        Ok(())
    }

    /// Answers GET_INFLIGHT_FD: the reply's payload and the region's fd.
    pub fn get(&self, payload: &[u8]) -> Result<(Vec<u8>, File), InflightError> {
        let asked = decode(payload)?;
        self.check(asked.queues, asked.queue_size)?;
        let region = InflightRegion::create(asked.queues, asked.queue_size)?;
        let fd = region
            .mapping
            .file()
            .try_clone()
            .map_err(io("duplicate the fd"))?;
        let reply = encode(&Payload {
            mmap_size: region.mapping.len() as u64,
            mmap_offset: 0,
            queues: asked.queues,
            queue_size: asked.queue_size,
        });
        *lock(&self.region) = Some(Arc::new(region));
        Ok((reply, fd))
    }

    /// Takes SET_INFLIGHT_FD's region.
    pub fn set(&self, payload: &[u8], file: Option<&File>) -> Result<(), InflightError> {
        let given = decode(payload)?;
        self.check(given.queues, given.queue_size)?;
        let Some(file) = file else {
            return Err(InflightError::Region("no fd".into()));
        };
        let len = usize::try_from(given.mmap_size)
            .map_err(|_| InflightError::Region(format!("{} bytes", given.mmap_size)))?;
        let file = file.try_clone().map_err(io("duplicate the fd"))?;
        let region =
            InflightRegion::map(file, given.mmap_offset, len, given.queues, given.queue_size)?;
        *lock(&self.region) = Some(Arc::new(region));
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests may panic
mod tests {
    use super::*;

    fn payload(size: u64, offset: u64, queues: u16, queue_size: u16) -> Vec<u8> {
        encode(&Payload {
            mmap_size: size,
            mmap_offset: offset,
            queues,
            queue_size,
        })
    }

    #[test]
    fn get_then_set_share_one_region_across_connections() {
        let slot = InflightSlot::new(4, 256);
        let (reply, fd) = slot.get(&payload(0, 0, 2, 128)).unwrap();
        let got = decode(&reply).unwrap();
        assert_eq!((got.queues, got.queue_size), (2, 128));
        assert_eq!(got.mmap_size, 2 * queue_region_size(128) as u64);
        assert_eq!(fd.metadata().unwrap().len(), got.mmap_size);
        // A request taken on queue 1 under the first connection...
        let region = slot.current().unwrap();
        let mut q = region.queue(1).unwrap();
        q.recover(0, |_| None);
        q.begin(17);
        drop(region);
        // ...is found by the next one, which brings the same fd back.
        slot.clear();
        assert!(slot.current().is_none());
        slot.set(&reply, Some(&fd)).unwrap();
        let region = slot.current().unwrap();
        assert_eq!(
            region.queue(1).unwrap().recover(0, |_| None).pending,
            vec![17]
        );
        assert!(region.queue(2).is_none());
        // The memfd cannot shrink under anyone's mapping.
        assert!(fd.set_len(0).is_err());
    }

    #[test]
    fn hostile_inflight_messages_are_refused() {
        let slot = InflightSlot::new(2, 256);
        assert!(matches!(
            slot.get(&[0u8; 20]),
            Err(InflightError::Payload(20))
        ));
        for (queues, size) in [(0u16, 128u16), (3, 128), (1, 0), (1, 512)] {
            assert!(matches!(
                slot.get(&payload(0, 0, queues, size)),
                Err(InflightError::Geometry { .. })
            ));
        }
        let small = tempfile::tempfile().unwrap();
        small.set_len(4096).unwrap();
        let need = queue_region_size(256) as u64;
        // Too small a size, a file too small, a bad offset, no fd, not a file.
        assert!(slot.set(&payload(64, 0, 1, 256), Some(&small)).is_err());
        assert!(slot.set(&payload(need, 0, 1, 256), Some(&small)).is_err());
        small.set_len(3 * 4096).unwrap();
        assert!(slot.set(&payload(need, 100, 1, 256), Some(&small)).is_err());
        assert!(slot
            .set(&payload(need, u64::MAX - 4095, 1, 256), Some(&small))
            .is_err());
        assert!(slot.set(&payload(need, 0, 1, 256), None).is_err());
        let dir = File::open("/").unwrap();
        assert!(slot.set(&payload(need, 0, 1, 256), Some(&dir)).is_err());
        assert!(slot.current().is_none(), "nothing refused was kept");
        slot.set(&payload(need, 4096, 1, 256), Some(&small))
            .unwrap();
        assert!(slot.current().is_some());
    }
}
