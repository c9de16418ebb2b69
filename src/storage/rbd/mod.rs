//! Disks on a Ceph cluster: the `rbd:` backing (`path=rbd:POOL[/NAMESPACE]/IMAGE[@SNAP]`).
//!
//! ```text
//!   queue worker ──push──▶ RbdEngine ──rbd_aio_readv/writev/flush/discard──▶ librbd ──▶ OSDs
//!   queue worker ◀─reap─── RbdEngine ◀── eventfd ◀── completion callback (librbd thread)
//! ```
//!
//! - [`lib`]: librbd/librados loaded at run time, their C functions declared once.
//! - [`image`]: one cluster connection and open image per device ([`image::RbdImage`]),
//!   shared by its queues; size and resize.
//! - [`objects`]: RADOS objects as a tiered disk's cold tier.
//! - [`engine`]: the [`crate::storage::Engine`] over an image, one per queue worker. The
//!   guest's iovecs go to librbd as they are (scatter-gather, no copy on our side); each
//!   op's completion callback runs on a librbd thread, queues the result and raises the
//!   worker's eventfd, which is in the worker's epoll set like io_uring's.
//!
//! Durability: librbd's cache runs in its default writethrough-until-flush mode. Until the
//! guest's first flush a completed write is in the cluster; after it, a completed write may
//! sit in this process's cache (a volatile write cache, as virtio-blk's FLUSH feature
//! declares) and a completed flush puts every earlier completed write in the cluster. Every
//! queue stop (pause, migration switchover, disconnect) flushes the cache too. The image is locked by
//! librbd's own exclusive-lock feature (RBD images have it by default), which is handed
//! between two clients cooperatively — what a live migration between two hosts needs — so
//! an `rbd:` disk has no `flock`-style image lock of ours.

pub mod engine;
pub mod image;
pub mod lib;
pub mod objects;

/// Errors opening or changing an RBD image.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    /// librbd/librados are not installed (or lack a function we need).
    #[error("Ceph client libraries unavailable (install librbd1): {0}")]
    Library(String),
    /// The `rbd:` path is malformed.
    #[error("bad rbd path `{path}`: {why}")]
    BadPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A librados/librbd call failed.
    #[error("{call}: {source}")]
    Call {
        /// The call (and its object).
        call: String,
        /// The errno it returned.
        #[source]
        source: std::io::Error,
    },
    /// The image's size is not a usable disk size.
    #[error("image size {0} is not a non-zero multiple of 512")]
    BadSize(u64),
}

/// The most bytes of a pool, namespace, image or snapshot name (Ceph's own limits are lower).
const MAX_NAME: usize = 255;

/// Where an RBD disk lives and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RbdSpec {
    /// The pool.
    pub pool: String,
    /// The RADOS namespace in the pool (empty: the default one).
    pub namespace: String,
    /// The image.
    pub image: String,
    /// A snapshot to serve read-only.
    pub snapshot: Option<String>,
    /// How to reach the cluster.
    pub client: CephClient,
}

/// How to reach a cluster (`ceph-conf=`, `ceph-id=`, `ceph-keyring=`); devices with equal
/// ones share one connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct CephClient {
    /// `ceph.conf` (librados' default search when `None`).
    pub conf: Option<std::path::PathBuf>,
    /// The client id, without `client.` (librados' default `admin` when `None`).
    pub id: Option<String>,
    /// A keyring file (else the one `ceph.conf` names).
    pub keyring: Option<std::path::PathBuf>,
}

impl CephClient {
    /// The same options with paths as the file system resolves them: `/a/ceph.conf` and
    /// `/a//ceph.conf` name one connection (each costs ~15 threads).
    pub fn canonical(&self) -> Self {
        let canonical = |path: &Option<std::path::PathBuf>| {
            path.as_ref()
                .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        };
        Self {
            conf: canonical(&self.conf),
            id: self.id.clone(),
            keyring: canonical(&self.keyring),
        }
    }
}

/// `SCHEME` + `POOL[/NAMESPACE]/NAME`: how an image and a cold tier's objects are named.
pub(crate) fn pool_path(scheme: &str, pool: &str, namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        format!("{scheme}{pool}/{name}")
    } else {
        format!("{scheme}{pool}/{namespace}/{name}")
    }
}

impl RbdSpec {
    /// The prefix that marks a `path=` as an RBD image.
    pub const PREFIX: &'static str = "rbd:";

    /// Parses `rbd:POOL[/NAMESPACE]/IMAGE[@SNAP]` (the part after `path=`); connection
    /// options are filled in by the caller.
    pub fn parse(path: &str) -> Result<Self, RbdError> {
        let bad = |why| RbdError::BadPath {
            path: path.to_string(),
            why,
        };
        let rest = path
            .strip_prefix(Self::PREFIX)
            .ok_or(bad("no rbd: prefix"))?;
        let (names, snapshot) = match rest.split_once('@') {
            Some((names, snap)) => (names, Some(snap.to_string())),
            None => (rest, None),
        };
        let parts: Vec<&str> = names.split('/').collect();
        let (pool, namespace, image) = match parts.as_slice() {
            [pool, image] => (*pool, "", *image),
            [pool, namespace, image] => (*pool, *namespace, *image),
            _ => return Err(bad("expected POOL/IMAGE or POOL/NAMESPACE/IMAGE")),
        };
        let valid = |name: &str| {
            !name.is_empty() && name.len() <= MAX_NAME && !name.chars().any(char::is_control)
        };
        if !valid(pool) || !valid(image) || !(namespace.is_empty() || valid(namespace)) {
            return Err(bad(
                "names must be 1 to 255 bytes without control characters",
            ));
        }
        if snapshot
            .as_deref()
            .is_some_and(|s| !valid(s) || s.contains('@'))
        {
            return Err(bad("bad snapshot name"));
        }
        Ok(Self {
            pool: pool.to_string(),
            namespace: namespace.to_string(),
            image: image.to_string(),
            snapshot,
            client: CephClient::default(),
        })
    }

    /// `POOL[/NAMESPACE]/IMAGE[@SNAP]`, for logs and `device.get`.
    pub fn display(&self) -> String {
        let mut out = pool_path(Self::PREFIX, &self.pool, &self.namespace, &self.image);
        if let Some(snap) = &self.snapshot {
            out.push('@');
            out.push_str(snap);
        }
        out
    }
}

/// The errno of a negative return value of librados/librbd (`EIO` if it is not one).
fn errno_code(ret: i64) -> i32 {
    ret.checked_neg()
        .and_then(|e| i32::try_from(e).ok())
        .filter(|&e| e > 0)
        .unwrap_or(libc::EIO)
}

/// An `io::Error` for a negative errno returned by librados/librbd.
fn errno(ret: i64) -> std::io::Error {
    std::io::Error::from_raw_os_error(errno_code(ret))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    #[test]
    fn paths_parse() {
        let spec = RbdSpec::parse("rbd:vms/disk0").unwrap();
        assert_eq!((spec.pool.as_str(), spec.image.as_str()), ("vms", "disk0"));
        assert!(spec.namespace.is_empty() && spec.snapshot.is_none());
        assert_eq!(spec.display(), "rbd:vms/disk0");
        let spec = RbdSpec::parse("rbd:vms/tenant1/disk0@golden").unwrap();
        assert_eq!(spec.namespace, "tenant1");
        assert_eq!(spec.snapshot.as_deref(), Some("golden"));
        assert_eq!(spec.display(), "rbd:vms/tenant1/disk0@golden");
    }

    #[test]
    fn bad_paths_are_refused() {
        for path in [
            "vms/disk0",
            "rbd:",
            "rbd:vms",
            "rbd:/disk0",
            "rbd:vms/",
            "rbd:a/b/c/d",
            "rbd:vms/disk0@",
            "rbd:vms/disk0@a@b",
            "rbd:vms/di\0sk",
            "rbd:vms/di\nsk",
        ] {
            assert!(RbdSpec::parse(path).is_err(), "accepted {path:?}");
        }
        let long = format!("rbd:vms/{}", "x".repeat(256));
        assert!(RbdSpec::parse(&long).is_err());
    }
}
