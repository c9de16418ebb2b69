//! RADOS objects as a tiered disk's cold tier (`tier-cold=rados:POOL[/NAMESPACE]/PREFIX`):
//! each cold record is one object, `PREFIX.<16 hex digits>`, named by the record's place in
//! the tier's (virtual, append-only) record space, so the tier's journal and its crash rules
//! are the same as with a cold file. A RADOS write is durable when it is acknowledged, like a
//! written and synced file range.
//!
//! `PREFIX.lock` carries a RADOS exclusive lock while a daemon owns the tier (what `flock`
//! does for a cold file), handed over at a live migration's switchover. It lasts
//! [`LOCK_SECONDS`] and a thread of the store renews it every [`LOCK_RENEW`] with
//! MUST_RENEW: a renewal that fails (the lock expired or was broken) marks it lost, and the
//! tier stops moving and journalling (`TierStore::keep_cold_lock`).
//!
//! Listing (the start-up check, which removes records no journal entry names) walks the
//! pool's namespace: fine for pools of tiered disks, slow in a pool with millions of other
//! objects (give the tier its own namespace).

// Cluster- and client-controlled numbers flow through here: no indexing or arithmetic that
// can panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::ffi::{c_char, CStr, CString};
use std::sync::{Arc, Condvar, Mutex};

use super::image::{c_string, check, Cluster};
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
/// `LIBRADOS_LOCK_FLAG_MAY_RENEW`: take the lock, or renew it if we hold it.
const MAY_RENEW: u8 = 1;
/// `LIBRADOS_LOCK_FLAG_MUST_RENEW`: renew only; fail if we no longer hold it.
const MUST_RENEW: u8 = 2;

/// Where a cold tier's objects live and how to reach the cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ObjectsSpec {
    /// The pool.
    pub pool: String,
    /// The RADOS namespace (empty: the default one).
    pub namespace: String,
    /// The objects' name prefix (one tier per prefix).
    pub prefix: String,
    /// How to reach the cluster.
    pub client: super::CephClient,
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
            client: super::CephClient::default(),
        })
    }

    /// `rados:POOL[/NAMESPACE]/PREFIX`.
    pub fn display(&self) -> String {
        super::pool_path(Self::PREFIX, &self.pool, &self.namespace, &self.prefix)
    }
}

/// The pool context, as shared with the lock's renewal thread.
struct Pool {
    api: &'static Api,
    ioctx: Ioctx,
    /// Keeps the connection up for as long as the ioctx (dropped after it).
    _cluster: Arc<Cluster>,
}

// SAFETY: an ioctx may be used from several threads at once (librados locks internally); it
// is destroyed only in `Drop`, when no thread uses it (the renewal thread holds an `Arc` and
// is joined before the store lets its own go).
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: created in `ObjectStore::open`, used by nothing else now; destroyed once.
        unsafe { (self.api.rados_ioctx_destroy)(self.ioctx) };
    }
}

/// The tier lock's state, shared with its renewal thread.
#[derive(Default)]
struct LockState {
    /// We hold the lock (and the thread renews it).
    held: bool,
    /// A renewal failed: someone else may own the tier now.
    lost: bool,
    /// The store is going away.
    stop: bool,
}

struct Lock {
    pool: Arc<Pool>,
    object: CString,
    cookie: CString,
    name: String,
    state: Mutex<LockState>,
    wake: Condvar,
}

impl Lock {
    fn state(&self) -> std::sync::MutexGuard<'_, LockState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `rados_lock_exclusive` for [`LOCK_SECONDS`] with `flags`.
    fn call(&self, flags: u8) -> i32 {
        let mut duration = libc::timeval {
            tv_sec: LOCK_SECONDS,
            tv_usec: 0,
        };
        // SAFETY: the ioctx is open; every string is NUL-terminated; `duration` is a valid
        // timeval read during the call.
        unsafe {
            (self.pool.api.rados_lock_exclusive)(
                self.pool.ioctx,
                self.object.as_ptr(),
                LOCK_NAME.as_ptr(),
                self.cookie.as_ptr(),
                LOCK_DESC.as_ptr(),
                &mut duration,
                flags,
            )
        }
    }

    /// The renewal thread: every [`LOCK_RENEW`] while held, renew (MUST_RENEW: a lock that
    /// expired or was broken is not silently taken again); a failure marks it lost.
    fn renew_until_stopped(&self) {
        let mut state = self.state();
        loop {
            let (next, _) = self
                .wake
                .wait_timeout(state, LOCK_RENEW)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            state = next;
            if state.stop {
                return;
            }
            if !state.held {
                continue;
            }
            let ret = self.call(MUST_RENEW);
            if ret < 0 {
                state.held = false;
                state.lost = true;
                log::error!(
                    "{}: the cold tier's lock could not be renewed ({}): moves stop",
                    self.name,
                    errno(ret.into())
                );
            }
        }
    }
}

/// A cold tier's objects, through one pool context.
pub struct ObjectStore {
    pool: Arc<Pool>,
    prefix: String,
    name: String,
    lock: Arc<Lock>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl ObjectStore {
    /// Connects (or shares a connection) and opens the pool. `owner` is the tier's hot file:
    /// its identity on this machine goes into the lock's cookie, so a lock left by a dead
    /// daemon of this machine for this disk can be recognised and broken.
    pub fn open(spec: &ObjectsSpec, owner: &std::path::Path) -> Result<Self, RbdError> {
        let cluster = Cluster::get(&spec.client)?;
        let api = cluster.api;
        let pool = c_string("pool", &spec.pool)?;
        let namespace = c_string("namespace", &spec.namespace)?;
        let mut ioctx: Ioctx = std::ptr::null_mut();
        // SAFETY: the cluster is connected; `pool` is NUL-terminated; `ioctx` an out-pointer.
        let ret = unsafe { (api.rados_ioctx_create)(cluster.handle, pool.as_ptr(), &mut ioctx) };
        check(|| format!("opening pool {}", spec.pool), ret.into())?;
        let pool = Arc::new(Pool {
            api,
            ioctx,
            _cluster: cluster,
        });
        // SAFETY: `ioctx` was just created; the namespace is NUL-terminated (copied).
        unsafe { (api.rados_ioctx_set_namespace)(ioctx, namespace.as_ptr()) };
        // Random, so no other process (of any host) ever holds the same cookie.
        let random = crate::sys::random::bytes::<8>().map_err(|source| RbdError::Call {
            call: "drawing a lock cookie".into(),
            source,
        })?;
        let cookie = format!("{}-{:x}", owner_tag(owner), u64::from_le_bytes(random));
        let lock = Arc::new(Lock {
            pool: Arc::clone(&pool),
            object: c_string("object", &format!("{}.lock", spec.prefix))?,
            cookie: c_string("cookie", &cookie)?,
            name: spec.display(),
            state: Mutex::new(LockState::default()),
            wake: Condvar::new(),
        });
        let renewing = Arc::clone(&lock);
        let renewer = std::thread::Builder::new()
            .name("tier-lock".into())
            .spawn(move || renewing.renew_until_stopped())
            .map_err(|source| RbdError::Call {
                call: "starting the lock renewal thread".into(),
                source,
            })?;
        Ok(Self {
            pool,
            prefix: spec.prefix.clone(),
            name: spec.display(),
            lock,
            renewer: Some(renewer),
        })
    }

    fn api(&self) -> &'static Api {
        self.pool.api
    }

    fn ioctx(&self) -> Ioctx {
        self.pool.ioctx
    }

    fn object(&self, offset: u64) -> CString {
        // Cannot fail: the prefix was checked for NUL bytes when the spec was parsed.
        c_string("object", &format!("{}.{offset:016x}", self.prefix)).unwrap_or_default()
    }

    /// Writes the record at `offset` (replacing any object of that name); durable once this
    /// returns.
    pub fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let object = self.object(offset);
        // SAFETY: the ioctx is open; `data` is valid for `len` bytes and only read.
        let ret = unsafe {
            (self.api().rados_write_full)(
                self.ioctx(),
                object.as_ptr(),
                data.as_ptr().cast(),
                data.len(),
            )
        };
        if ret < 0 {
            return Err(errno(ret.into()));
        }
        Ok(())
    }

    /// Reads the record at `offset` into `buf`; `UnexpectedEof` when the object is shorter
    /// or missing (a truncated or lost record).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let object = self.object(offset);
        // SAFETY: the ioctx is open; `buf` is valid for writes of `len` bytes.
        let ret = unsafe {
            (self.api().rados_read)(
                self.ioctx(),
                object.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
            )
        };
        let whole = usize::try_from(ret).is_ok_and(|n| n == buf.len());
        if ret == -libc::ENOENT || (ret >= 0 && !whole) {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if ret < 0 {
            return Err(errno(ret.into()));
        }
        Ok(())
    }

    /// Removes the record at `offset` (already gone: fine).
    pub fn remove(&self, offset: u64) -> std::io::Result<()> {
        let object = self.object(offset);
        // SAFETY: the ioctx is open; the name is NUL-terminated.
        let ret = unsafe { (self.api().rados_remove)(self.ioctx(), object.as_ptr()) };
        if ret < 0 && ret != -libc::ENOENT {
            return Err(errno(ret.into()));
        }
        Ok(())
    }

    /// The offsets of every record object of this tier, sorted (one listing, no stats).
    pub fn record_offsets(&self) -> std::io::Result<Vec<u64>> {
        let mut offsets = Vec::new();
        let mut ctx: ListCtx = std::ptr::null_mut();
        // SAFETY: the ioctx is open; `ctx` is an out-pointer, closed below.
        let ret = unsafe { (self.api().rados_nobjects_list_open)(self.ioctx(), &mut ctx) };
        if ret < 0 {
            return Err(errno(ret.into()));
        }
        let wanted = format!("{}.", self.prefix);
        let result = loop {
            let mut entry: *const c_char = std::ptr::null();
            // SAFETY: `ctx` is an open listing; `entry` is an out-pointer valid until the
            // next call; key and namespace are not asked for (null).
            let ret = unsafe {
                (self.api().rados_nobjects_list_next)(
                    ctx,
                    &mut entry,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            if ret == -libc::ENOENT {
                break Ok(());
            }
            if ret < 0 {
                break Err(errno(ret.into()));
            }
            if entry.is_null() {
                break Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            // SAFETY: librados returns a NUL-terminated name valid until the next call; it
            // is read at once.
            let name = unsafe { CStr::from_ptr(entry) }.to_bytes();
            if let Some(offset) = name.strip_prefix(wanted.as_bytes()).and_then(parse_offset) {
                offsets.push(offset);
            }
        };
        // SAFETY: opened above, closed once.
        unsafe { (self.api().rados_nobjects_list_close)(ctx) };
        result?;
        offsets.sort_unstable();
        Ok(offsets)
    }

    /// Where the next record may go: past the highest record object.
    pub fn end(&self) -> std::io::Result<u64> {
        let Some(&last) = self.record_offsets()?.last() else {
            return Ok(0);
        };
        let object = self.object(last);
        let mut size = 0u64;
        let mut mtime: libc::time_t = 0;
        // SAFETY: the ioctx is open; both out-pointers are valid.
        let ret = unsafe {
            (self.api().rados_stat)(self.ioctx(), object.as_ptr(), &mut size, &mut mtime)
        };
        if ret < 0 && ret != -libc::ENOENT {
            return Err(errno(ret.into()));
        }
        Ok(last.saturating_add(size).max(last.saturating_add(1)))
    }

    /// Takes the tier's exclusive lock (renewed from then on by the store's thread);
    /// `false` when another client holds it.
    pub fn lock(&self) -> std::io::Result<bool> {
        let mut state = self.lock.state();
        match self.lock.call(MAY_RENEW) {
            // EEXIST: we hold it already.
            r if r == 0 || r == -libc::EEXIST => {
                state.held = true;
                state.lost = false;
                self.lock.wake.notify_all();
                Ok(true)
            }
            r if r == -libc::EBUSY => Ok(false),
            r => Err(errno(r.into())),
        }
    }

    /// Whether a renewal failed since the lock was taken (another owner may write the tier).
    pub fn lost(&self) -> bool {
        self.lock.state().lost
    }

    /// Breaks a lock on this tier that a dead daemon of this machine left for the same disk
    /// (its cookie carries our owner tag). The caller holds the disk's hot file locked, so no
    /// live process of this machine owns the tier. Returns whether one was broken.
    pub fn break_stale(&self) -> std::io::Result<bool> {
        let ours = self.lock.cookie.to_bytes();
        let tag = ours
            .iter()
            .rposition(|&b| b == b'-')
            .and_then(|end| ours.get(..end))
            .unwrap_or_default();
        let mut broken = false;
        for (client, cookie) in self.lockers()? {
            let theirs = cookie.to_bytes();
            let same_owner = theirs
                .iter()
                .rposition(|&b| b == b'-')
                .and_then(|end| theirs.get(..end))
                .is_some_and(|t| t == tag);
            if !same_owner || theirs == ours {
                continue;
            }
            // SAFETY: the ioctx is open; every string is NUL-terminated.
            let ret = unsafe {
                (self.api().rados_break_lock)(
                    self.ioctx(),
                    self.lock.object.as_ptr(),
                    LOCK_NAME.as_ptr(),
                    client.as_ptr(),
                    cookie.as_ptr(),
                )
            };
            match ret {
                0 => {
                    log::warn!(
                        "{}: broke the lock a dead daemon of this machine left ({})",
                        self.name,
                        client.to_string_lossy()
                    );
                    broken = true;
                }
                r if r == -libc::ENOENT => {}
                r => return Err(errno(r.into())),
            }
        }
        Ok(broken)
    }

    /// (client, cookie) of every holder of the tier's lock.
    fn lockers(&self) -> std::io::Result<Vec<(CString, CString)>> {
        let mut lens = [256usize, 4096, 4096, 4096];
        for _ in 0..2 {
            let [mut tag_len, mut clients_len, mut cookies_len, mut addrs_len] = lens;
            let (mut tag, mut clients, mut cookies, mut addrs) = (
                vec![0u8; tag_len],
                vec![0u8; clients_len],
                vec![0u8; cookies_len],
                vec![0u8; addrs_len],
            );
            let mut exclusive: std::ffi::c_int = 0;
            // SAFETY: the ioctx is open; every buffer is valid for writes of the length
            // passed with it, and librados writes at most that many bytes (ERANGE and the
            // needed lengths otherwise).
            let ret = unsafe {
                (self.api().rados_list_lockers)(
                    self.ioctx(),
                    self.lock.object.as_ptr(),
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
            let code = i64::try_from(ret).unwrap_or(i64::MIN);
            if code == i64::from(libc::ERANGE).wrapping_neg() {
                lens = [tag_len, clients_len, cookies_len, addrs_len];
                continue;
            }
            if code == i64::from(libc::ENOENT).wrapping_neg() {
                return Ok(Vec::new());
            }
            if ret < 0 {
                return Err(errno(code));
            }
            let clients = nul_separated(&clients, clients_len);
            let cookies = nul_separated(&cookies, cookies_len);
            return Ok(clients.into_iter().zip(cookies).collect());
        }
        Err(std::io::Error::from_raw_os_error(libc::ERANGE))
    }

    /// Releases the tier's lock (not held: fine); the renewals stop.
    pub fn unlock(&self) {
        let mut state = self.lock.state();
        state.held = false;
        // SAFETY: the ioctx is open; every string is NUL-terminated.
        let ret = unsafe {
            (self.api().rados_unlock)(
                self.ioctx(),
                self.lock.object.as_ptr(),
                LOCK_NAME.as_ptr(),
                self.lock.cookie.as_ptr(),
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
        self.lock.state().stop = true;
        self.lock.wake.notify_all();
        if let Some(renewer) = self.renewer.take() {
            if renewer.join().is_err() {
                log::error!("{}: the lock renewal thread panicked", self.name);
            }
        }
    }
}

/// The `count` NUL-terminated strings in the first `len` bytes of `buf` (empty ones kept,
/// so two parallel lists stay aligned).
fn nul_separated(buf: &[u8], len: usize) -> Vec<CString> {
    let used = buf.get(..len.min(buf.len())).unwrap_or_default();
    let used = used.strip_suffix(&[0]).unwrap_or(used);
    if used.is_empty() {
        return Vec::new();
    }
    used.split(|&b| b == 0)
        .map(|part| CString::new(part).unwrap_or_default())
        .collect()
}

/// A record object's offset: exactly 16 lowercase hex digits.
fn parse_offset(hex: &[u8]) -> Option<u64> {
    if hex.len() != 16 || !hex.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// This machine and disk, as a lock cookie prefix: the machine id (else the host name) and
/// the hot file's canonical path, device and inode, hashed (no `-`: the random part follows
/// the last one).
fn owner_tag(owner: &std::path::Path) -> String {
    let machine = std::fs::read_to_string("/etc/machine-id")
        .map(|id| id.trim().to_string())
        .unwrap_or_default();
    let machine = if machine.is_empty() {
        let mut host = [0u8; 256];
        // SAFETY: gethostname writes at most `len` bytes into the buffer.
        let rc = unsafe { libc::gethostname(host.as_mut_ptr().cast(), host.len()) };
        let end = host.iter().position(|&b| b == 0).unwrap_or(host.len());
        if rc == 0 {
            String::from_utf8_lossy(host.get(..end).unwrap_or_default()).into_owned()
        } else {
            String::new()
        }
    } else {
        machine
    };
    let path = std::fs::canonicalize(owner).unwrap_or_else(|_| owner.to_path_buf());
    let (dev, ino) = std::fs::metadata(&path).map_or((0, 0), |m| {
        use std::os::unix::fs::MetadataExt;
        (m.dev(), m.ino())
    });
    let identity = format!("{machine}\0{}\0{dev}\0{ino}", path.display());
    format!("{:08x}", crc32c::crc32c(identity.as_bytes()))
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
        assert_eq!(spec.display(), "rados:cold/vm1-disk0");
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
