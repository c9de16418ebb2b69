//! RADOS objects as a tiered disk's cold tier (`tier-cold=rados:POOL[/NAMESPACE]/PREFIX`):
//! each cold record is one object, `PREFIX.<16 hex digits>`, named by the record's place in
//! the tier's (virtual, append-only) record space, so the tier's journal and its crash rules
//! are the same as with a cold file. A RADOS write is durable when it is acknowledged, like a
//! written and synced file range.
//!
//! `PREFIX.lock` carries a RADOS exclusive lock while a daemon owns the tier (what `flock`
//! does for a cold file), handed over at a live migration's switchover.
//!
//! Listing (the start-up check, which removes records no journal entry names) walks the
//! pool's namespace: fine for pools of tiered disks, slow in a pool with millions of other
//! objects (give the tier its own namespace).

use std::ffi::{c_char, CStr};
use std::sync::Arc;

use super::image::{c_string, check, Cluster, ClusterKey};
use super::lib::{Api, Ioctx, ListCtx};
use super::{errno, RbdError};

/// The lock's name and the description other clients see.
const LOCK_NAME: &CStr = c"novacron-tier";
const LOCK_DESC: &CStr = c"novacrond tiered disk";
/// How long the lock lasts unless renewed: a daemon that dies without unlocking (a crash,
/// `kill -9`) holds the tier at most this long. Renewed every [`LOCK_RENEW`].
pub const LOCK_SECONDS: i64 = 30;
/// How often an owner renews its lock.
pub const LOCK_RENEW: std::time::Duration = std::time::Duration::from_secs(10);
/// `LIBRADOS_LOCK_FLAG_MAY_RENEW`.
const MAY_RENEW: u8 = 1;

/// Where a cold tier's objects live and how to reach the cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ObjectsSpec {
    /// The pool.
    pub pool: String,
    /// The RADOS namespace (empty: the default one).
    pub namespace: String,
    /// The objects' name prefix (one tier per prefix).
    pub prefix: String,
    /// `ceph.conf`.
    pub conf: Option<std::path::PathBuf>,
    /// The client id.
    pub id: Option<String>,
    /// A keyring file.
    pub keyring: Option<std::path::PathBuf>,
}

impl ObjectsSpec {
    /// The prefix that marks a `tier-cold=` as RADOS objects.
    pub const PREFIX: &'static str = "rados:";

    /// Parses `rados:POOL[/NAMESPACE]/PREFIX`; connection options are the caller's.
    pub fn parse(path: &str) -> Result<Self, RbdError> {
        // The same name rules as an image path, without snapshots.
        let as_image = format!(
            "{}{}",
            super::RbdSpec::PREFIX,
            path.strip_prefix(Self::PREFIX).unwrap_or("\0")
        );
        let spec = super::RbdSpec::parse(&as_image).map_err(|_| RbdError::BadPath {
            path: path.to_string(),
            why: "expected rados:POOL/PREFIX or rados:POOL/NAMESPACE/PREFIX",
        })?;
        if spec.snapshot.is_some() || spec.image.contains('.') {
            return Err(RbdError::BadPath {
                path: path.to_string(),
                why: "the prefix may not contain '@' or '.'",
            });
        }
        Ok(Self {
            pool: spec.pool,
            namespace: spec.namespace,
            prefix: spec.image,
            conf: None,
            id: None,
            keyring: None,
        })
    }

    /// `rados:POOL[/NAMESPACE]/PREFIX`.
    pub fn display(&self) -> String {
        let mut out = format!("{}{}/", Self::PREFIX, self.pool);
        if !self.namespace.is_empty() {
            out.push_str(&self.namespace);
            out.push('/');
        }
        out.push_str(&self.prefix);
        out
    }
}

/// A cold tier's objects, through one pool context.
pub struct ObjectStore {
    api: &'static Api,
    ioctx: Ioctx,
    prefix: String,
    name: String,
    /// This process's lock cookie (another daemon's differs).
    cookie: std::ffi::CString,
    _cluster: Arc<Cluster>,
}

// SAFETY: an ioctx may be used from several threads at once (librados locks internally); it
// is destroyed only in `Drop`, and the cluster it came from outlives it (held by `Arc`).
unsafe impl Send for ObjectStore {}
// SAFETY: as above.
unsafe impl Sync for ObjectStore {}

impl ObjectStore {
    /// Connects (or shares a connection) and opens the pool. `owner` names this tier's
    /// owner on this host (the hot file's path): it goes into the lock's cookie, so a lock
    /// left by a dead daemon of this host for this disk can be recognised and broken.
    pub fn open(spec: &ObjectsSpec, owner: &str) -> Result<Self, RbdError> {
        let cluster = Cluster::get(ClusterKey::of(&spec.conf, &spec.id, &spec.keyring))?;
        let api = cluster.api;
        let pool = c_string("pool", &spec.pool)?;
        let namespace = c_string("namespace", &spec.namespace)?;
        let mut ioctx: Ioctx = std::ptr::null_mut();
        // SAFETY: the cluster is connected; `pool` is NUL-terminated; `ioctx` an out-pointer.
        let ret = unsafe { (api.rados_ioctx_create)(cluster.handle, pool.as_ptr(), &mut ioctx) };
        check(|| format!("opening pool {}", spec.pool), ret.into())?;
        // SAFETY: `ioctx` was just created; the namespace is NUL-terminated (copied).
        unsafe { (api.rados_ioctx_set_namespace)(ioctx, namespace.as_ptr()) };
        let cookie = format!("{}-{:x}", owner_tag(owner), rand_u64());
        Ok(Self {
            api,
            ioctx,
            prefix: spec.prefix.clone(),
            name: spec.display(),
            cookie: c_string("cookie", &cookie)?,
            _cluster: cluster,
        })
    }

    fn object(&self, offset: u64) -> std::ffi::CString {
        // Cannot fail: the prefix was checked for NUL bytes when the spec was parsed.
        c_string("object", &format!("{}.{offset:016x}", self.prefix)).unwrap_or_default()
    }

    fn lock_object(&self) -> std::ffi::CString {
        c_string("object", &format!("{}.lock", self.prefix)).unwrap_or_default()
    }

    fn io_error(ret: i64) -> std::io::Error {
        errno(ret)
    }

    /// Writes the record at `offset` (replacing any object of that name); durable once this
    /// returns.
    pub fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let object = self.object(offset);
        // SAFETY: the ioctx is open; `data` is valid for `len` bytes and only read.
        let ret = unsafe {
            (self.api.rados_write_full)(
                self.ioctx,
                object.as_ptr(),
                data.as_ptr().cast(),
                data.len(),
            )
        };
        if ret < 0 {
            return Err(Self::io_error(ret.into()));
        }
        Ok(())
    }

    /// Reads the record at `offset` into `buf`; `UnexpectedEof` when the object is shorter
    /// or missing (a truncated or lost record).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let object = self.object(offset);
        // SAFETY: the ioctx is open; `buf` is valid for writes of `len` bytes.
        let ret = unsafe {
            (self.api.rados_read)(
                self.ioctx,
                object.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
            )
        };
        if ret == -libc::ENOENT || (ret >= 0 && ret.unsigned_abs() as usize != buf.len()) {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if ret < 0 {
            return Err(Self::io_error(ret.into()));
        }
        Ok(())
    }

    /// Removes the record at `offset` (already gone: fine).
    pub fn remove(&self, offset: u64) -> std::io::Result<()> {
        let object = self.object(offset);
        // SAFETY: the ioctx is open; the name is NUL-terminated.
        let ret = unsafe { (self.api.rados_remove)(self.ioctx, object.as_ptr()) };
        if ret < 0 && ret != -libc::ENOENT {
            return Err(Self::io_error(ret.into()));
        }
        Ok(())
    }

    /// Every record object of this tier: (offset, size).
    pub fn records(&self) -> std::io::Result<Vec<(u64, u64)>> {
        let mut names = Vec::new();
        let mut ctx: ListCtx = std::ptr::null_mut();
        // SAFETY: the ioctx is open; `ctx` is an out-pointer, closed below.
        let ret = unsafe { (self.api.rados_nobjects_list_open)(self.ioctx, &mut ctx) };
        if ret < 0 {
            return Err(Self::io_error(ret.into()));
        }
        let wanted = format!("{}.", self.prefix);
        loop {
            let mut entry: *const c_char = std::ptr::null();
            // SAFETY: `ctx` is an open listing; `entry` is an out-pointer valid until the
            // next call; key and namespace are not asked for (null).
            let ret = unsafe {
                (self.api.rados_nobjects_list_next)(
                    ctx,
                    &mut entry,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            if ret == -libc::ENOENT {
                break;
            }
            if ret < 0 || entry.is_null() {
                // SAFETY: opened above, closed once.
                unsafe { (self.api.rados_nobjects_list_close)(ctx) };
                return Err(Self::io_error(ret.into()));
            }
            // SAFETY: librados returns a NUL-terminated name valid until the next call; it
            // is copied at once.
            let name = unsafe { CStr::from_ptr(entry) }
                .to_string_lossy()
                .into_owned();
            let offset = name
                .strip_prefix(&wanted)
                .filter(|hex| hex.len() == 16)
                .and_then(|hex| u64::from_str_radix(hex, 16).ok());
            if let Some(offset) = offset {
                names.push(offset);
            }
        }
        // SAFETY: opened above, closed once.
        unsafe { (self.api.rados_nobjects_list_close)(ctx) };
        let mut records = Vec::with_capacity(names.len());
        for offset in names {
            let object = self.object(offset);
            let mut size = 0u64;
            let mut mtime: libc::time_t = 0;
            // SAFETY: the ioctx is open; both out-pointers are valid.
            let ret = unsafe {
                (self.api.rados_stat)(self.ioctx, object.as_ptr(), &mut size, &mut mtime)
            };
            if ret == -libc::ENOENT {
                continue;
            }
            if ret < 0 {
                return Err(Self::io_error(ret.into()));
            }
            records.push((offset, size));
        }
        records.sort_unstable();
        Ok(records)
    }

    /// Takes (or renews) the tier's exclusive lock for [`LOCK_SECONDS`]; `false` when
    /// another client holds it.
    pub fn lock(&self) -> std::io::Result<bool> {
        let object = self.lock_object();
        let mut duration = libc::timeval {
            tv_sec: LOCK_SECONDS,
            tv_usec: 0,
        };
        // SAFETY: the ioctx is open; every string is NUL-terminated; `duration` is a valid
        // timeval read during the call.
        let ret = unsafe {
            (self.api.rados_lock_exclusive)(
                self.ioctx,
                object.as_ptr(),
                LOCK_NAME.as_ptr(),
                self.cookie.as_ptr(),
                LOCK_DESC.as_ptr(),
                &mut duration,
                MAY_RENEW,
            )
        };
        match ret {
            // EEXIST: we hold it already.
            0 => Ok(true),
            r if r == -libc::EEXIST => Ok(true),
            r if r == -libc::EBUSY => Ok(false),
            r => Err(Self::io_error(r.into())),
        }
    }

    /// Breaks a lock on this tier that a dead daemon of this host left for the same disk
    /// (its cookie starts with our owner tag). The caller holds the disk's hot file locked,
    /// so no live process of this host owns the tier. Returns whether one was broken.
    pub fn break_stale(&self) -> std::io::Result<bool> {
        let object = self.lock_object();
        let mut exclusive: std::ffi::c_int = 0;
        let (mut tag, mut clients, mut cookies, mut addrs) = (
            vec![0u8; 256],
            vec![0u8; 4096],
            vec![0u8; 4096],
            vec![0u8; 4096],
        );
        let (mut tag_len, mut clients_len, mut cookies_len, mut addrs_len) =
            (tag.len(), clients.len(), cookies.len(), addrs.len());
        // SAFETY: the ioctx is open; every buffer is valid for writes of the length passed
        // with it, and librados writes at most that many bytes (ERANGE otherwise).
        let ret = unsafe {
            (self.api.rados_list_lockers)(
                self.ioctx,
                object.as_ptr(),
                LOCK_NAME.as_ptr(),
                &mut exclusive,
                tag.as_mut_ptr().cast(),
                &mut tag_len,
                clients.as_mut_ptr().cast(),
                &mut clients_len,
                cookies.as_mut_ptr().cast(),
                &mut cookies_len,
                addrs.as_mut_ptr().cast(),
                &mut addrs_len,
            )
        };
        if ret < 0 {
            return Err(Self::io_error(i64::try_from(ret).unwrap_or(-5)));
        }
        let split = |buf: &[u8], len: usize| -> Vec<std::ffi::CString> {
            buf.get(..len.min(buf.len()))
                .unwrap_or_default()
                .split(|&b| b == 0)
                .filter(|part| !part.is_empty())
                .filter_map(|part| std::ffi::CString::new(part).ok())
                .collect()
        };
        let ours = self.cookie.to_string_lossy();
        let tag_prefix = ours.rsplit_once('-').map_or("", |(tag, _)| tag).to_string();
        let mut broken = false;
        for (client, cookie) in split(&clients, clients_len)
            .into_iter()
            .zip(split(&cookies, cookies_len))
        {
            let theirs = cookie.to_string_lossy();
            let same_owner = theirs
                .rsplit_once('-')
                .is_some_and(|(tag, _)| tag == tag_prefix);
            if !same_owner || theirs == ours {
                continue;
            }
            // SAFETY: the ioctx is open; every string is NUL-terminated.
            let ret = unsafe {
                (self.api.rados_break_lock)(
                    self.ioctx,
                    object.as_ptr(),
                    LOCK_NAME.as_ptr(),
                    client.as_ptr(),
                    cookie.as_ptr(),
                )
            };
            if ret < 0 && ret != -libc::ENOENT {
                return Err(Self::io_error(ret.into()));
            }
            log::warn!(
                "{}: broke the lock a previous daemon of this host left ({})",
                self.name,
                client.to_string_lossy()
            );
            broken = true;
        }
        Ok(broken)
    }

    /// Releases the tier's lock (not held: fine).
    pub fn unlock(&self) {
        let object = self.lock_object();
        // SAFETY: the ioctx is open; every string is NUL-terminated.
        let ret = unsafe {
            (self.api.rados_unlock)(
                self.ioctx,
                object.as_ptr(),
                LOCK_NAME.as_ptr(),
                self.cookie.as_ptr(),
            )
        };
        if ret < 0 && ret != -libc::ENOENT {
            log::warn!("{}: unlock: {}", self.name, errno(ret.into()));
        }
    }

    /// `rados:POOL[/NAMESPACE]/PREFIX`.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ObjectStore {
    fn drop(&mut self) {
        // SAFETY: created in `open`, used by nothing else now; destroyed once.
        unsafe { (self.api.rados_ioctx_destroy)(self.ioctx) };
    }
}

/// This host and disk, as a lock cookie prefix (no `-` at the end: the random part follows
/// the last one).
fn owner_tag(owner: &str) -> String {
    let mut host = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer.
    let rc = unsafe { libc::gethostname(host.as_mut_ptr().cast(), host.len()) };
    let host = if rc == 0 {
        let end = host.iter().position(|&b| b == 0).unwrap_or(host.len());
        String::from_utf8_lossy(host.get(..end).unwrap_or_default()).into_owned()
    } else {
        String::new()
    };
    // Hashed: the cookie stays short and holds no path.
    let digest = crc32c::crc32c(format!("{host}\0{owner}").as_bytes());
    format!("{host}:{digest:08x}")
}

/// A per-process random number for the lock cookie.
fn rand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `len` bytes into the buffer.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got != 8 {
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    }
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let spec = ObjectsSpec::parse("rados:cold/vm1-disk0").unwrap();
        assert_eq!(
            (spec.pool.as_str(), spec.prefix.as_str()),
            ("cold", "vm1-disk0")
        );
        let spec = ObjectsSpec::parse("rados:cold/tenant1/vm1").unwrap();
        assert_eq!(spec.namespace, "tenant1");
        assert_eq!(spec.display(), "rados:cold/tenant1/vm1");
        for bad in [
            "cold/vm1",
            "rados:cold",
            "rados:cold/a.b",
            "rados:cold/v@s",
            "rados:/x",
        ] {
            assert!(ObjectsSpec::parse(bad).is_err(), "accepted {bad}");
        }
    }
}
