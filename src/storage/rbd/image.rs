//! One open RBD image: its cluster connection, pool context and image handle.
//!
//! Connections are shared: every device that names the same `ceph.conf`, client id and
//! keyring uses one librados client ([`Cluster`]), as SPDK does, because each client starts
//! its own messenger, timer and finisher threads (about fifteen) and its own sessions with
//! the monitors. The image handle is thread-safe (librbd locks internally), so the device's
//! queue workers all submit to the same [`RbdImage`].
//!
//! Connecting gives up after [`CONNECT_TIMEOUT_S`] (librados' default is five minutes, and a
//! `device.add` holds the control plane meanwhile). Once connected, requests to a missing
//! OSD wait for it without a timeout: a cluster-side fault stalls the guest's I/O, which
//! resumes when the cluster recovers, rather than failing it.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, Mutex, Weak};

use super::lib::{self, Api, Image, Ioctx, Rados};
use super::{errno, CephClient, RbdError, RbdSpec};

/// Seconds a new connection may take to reach the monitors and authenticate.
pub const CONNECT_TIMEOUT_S: u32 = 15;

/// A cluster connection made ahead of a device's start ([`connect_ahead`]); while it is
/// held, opening an image with the same client options reuses it instead of connecting.
pub struct Connected {
    _cluster: Arc<Cluster>,
}

/// Connects (or finds the shared connection) for `client` now. The control plane calls this
/// before it takes the registry lock, so a slow or unreachable cluster (up to
/// [`CONNECT_TIMEOUT_S`]) holds only the request that names it, not every other client.
pub fn connect_ahead(client: &CephClient) -> Result<Connected, RbdError> {
    Cluster::get(client).map(|cluster| Connected { _cluster: cluster })
}

/// One librados client, connected.
pub(super) struct Cluster {
    pub(super) api: &'static Api,
    pub(super) handle: Rados,
}

// SAFETY: a connected `rados_t` may be used from any thread (librados is thread-safe); the
// handle is only shut down in `Drop`, when no image or ioctx made from it is left (they hold
// an `Arc` of this cluster).
unsafe impl Send for Cluster {}
// SAFETY: as above; every use through `&Cluster` is a thread-safe librados call.
unsafe impl Sync for Cluster {}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: `handle` came from `rados_create2` and is shut down once, here, after every
        // ioctx made from it was destroyed (each holds an `Arc` of this cluster).
        unsafe { (self.api.rados_shutdown)(self.handle) };
    }
}

pub(super) fn c_string(what: &str, value: &str) -> Result<CString, RbdError> {
    CString::new(value).map_err(|_| RbdError::Call {
        call: format!("{what} `{value}`"),
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    })
}

fn path_string(what: &str, path: &std::path::Path) -> Result<CString, RbdError> {
    c_string(what, &path.to_string_lossy())
}

pub(super) fn check(call: impl FnOnce() -> String, ret: i64) -> Result<(), RbdError> {
    if ret < 0 {
        Err(RbdError::Call {
            call: call(),
            source: errno(ret),
        })
    } else {
        Ok(())
    }
}

impl Cluster {
    /// The connection for `key`, made now unless a live one is shared. The registry lock is
    /// not held while connecting (up to [`CONNECT_TIMEOUT_S`]): two devices connecting with
    /// the same key at once may each make one, and the later one is shared from then on.
    pub(super) fn get(client: &CephClient) -> Result<Arc<Cluster>, RbdError> {
        static CLUSTERS: Mutex<Option<HashMap<CephClient, Weak<Cluster>>>> = Mutex::new(None);
        let key = client.canonical();
        let lock = || {
            CLUSTERS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some(cluster) = lock()
            .as_ref()
            .and_then(|clusters| clusters.get(&key))
            .and_then(Weak::upgrade)
        {
            return Ok(cluster);
        }
        let cluster = Arc::new(Self::connect(&key)?);
        let mut clusters = lock();
        let clusters = clusters.get_or_insert_with(HashMap::new);
        clusters.retain(|_, cluster| cluster.strong_count() > 0);
        clusters.insert(key, Arc::downgrade(&cluster));
        Ok(cluster)
    }

    fn connect(key: &CephClient) -> Result<Cluster, RbdError> {
        let api = lib::api()?;
        let name = format!("client.{}", key.id.as_deref().unwrap_or("admin"));
        let name_c = c_string("client name", &name)?;
        let mut handle: Rados = std::ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer; the cluster and client names are
        // NUL-terminated strings that outlive the call (librados copies them).
        let ret = unsafe { (api.rados_create2)(&mut handle, c"ceph".as_ptr(), name_c.as_ptr(), 0) };
        check(|| format!("rados_create2({name})"), ret.into())?;
        // From here on `Drop` shuts the handle down on every error path.
        let cluster = Cluster { api, handle };
        let conf = key
            .conf
            .as_deref()
            .map(|p| path_string("ceph-conf", p))
            .transpose()?;
        // SAFETY: `handle` is a created, unconnected cluster; the path is NUL-terminated or
        // null (librados' default search path).
        let ret = unsafe {
            (api.rados_conf_read_file)(
                handle,
                conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        };
        // With no explicit file, librados' default search finding nothing is not an error:
        // the options below and the environment may be enough.
        if key.conf.is_some() {
            check(|| format!("reading {:?}", key.conf), ret.into())?;
        }
        // Set after the file, so a `ceph-conf=` cannot change them: no admin socket or log
        // file of librados' choosing (it would create or append to whatever path the file
        // names), and submissions never blocking the guest's queue worker.
        let timeout = CONNECT_TIMEOUT_S.to_string();
        let mut options = vec![
            ("client_mount_timeout", timeout),
            ("admin_socket", String::new()),
            ("log_file", String::new()),
            ("rbd_non_blocking_aio", "true".to_string()),
        ];
        if let Some(keyring) = &key.keyring {
            options.push(("keyring", keyring.to_string_lossy().into_owned()));
        }
        for (option, value) in options {
            let option_c = c_string("option", option)?;
            let value_c = c_string(option, &value)?;
            // SAFETY: both strings are NUL-terminated and outlive the call (copied).
            let ret = unsafe { (api.rados_conf_set)(handle, option_c.as_ptr(), value_c.as_ptr()) };
            check(|| format!("setting {option}"), ret.into())?;
        }
        // SAFETY: `handle` is configured and not yet connected.
        let ret = unsafe { (api.rados_connect)(handle) };
        check(
            || format!("connecting to the cluster as {name}"),
            ret.into(),
        )?;
        Ok(cluster)
    }
}

/// An open image, shared by a device's queue workers.
pub struct RbdImage {
    api: &'static Api,
    image: Image,
    ioctx: Ioctx,
    /// What `display` prints: `rbd:pool/image[@snap]`.
    name: String,
    /// Keeps the connection up for as long as the image and ioctx are.
    _cluster: Arc<Cluster>,
}

// SAFETY: librbd's `rbd_image_t` is thread-safe (all calls lock the image context
// internally; QEMU and SPDK submit to one image from several threads); the handle is closed
// only in `Drop`, when no engine holds the image any more (they hold an `Arc` of it).
unsafe impl Send for RbdImage {}
// SAFETY: as above.
unsafe impl Sync for RbdImage {}

impl RbdImage {
    /// Connects (or shares a connection) and opens the image; read-only when `readonly` or
    /// a snapshot is named.
    pub fn open(spec: &RbdSpec, readonly: bool) -> Result<Self, RbdError> {
        let cluster = Cluster::get(&spec.client)?;
        let api = cluster.api;
        let pool = c_string("pool", &spec.pool)?;
        let namespace = c_string("namespace", &spec.namespace)?;
        let name = c_string("image", &spec.image)?;
        let snap = spec
            .snapshot
            .as_deref()
            .map(|s| c_string("snapshot", s))
            .transpose()?;
        let mut ioctx: Ioctx = std::ptr::null_mut();
        // SAFETY: the cluster is connected; `pool` is NUL-terminated; `ioctx` is an
        // out-pointer.
        let ret = unsafe { (api.rados_ioctx_create)(cluster.handle, pool.as_ptr(), &mut ioctx) };
        check(|| format!("opening pool {}", spec.pool), ret.into())?;
        // SAFETY: `ioctx` was just created; the namespace is NUL-terminated (copied).
        unsafe { (api.rados_ioctx_set_namespace)(ioctx, namespace.as_ptr()) };
        let snap_ptr = snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let readonly = readonly || spec.snapshot.is_some();
        let open = if readonly {
            api.rbd_open_read_only
        } else {
            api.rbd_open
        };
        let mut image: Image = std::ptr::null_mut();
        // SAFETY: `ioctx` is live; name and snapshot are NUL-terminated or null; `image` is
        // an out-pointer.
        let ret = unsafe { open(ioctx, name.as_ptr(), &mut image, snap_ptr) };
        if let Err(e) = check(|| format!("opening image {}", spec.display()), ret.into()) {
            // SAFETY: created above and used by nothing else.
            unsafe { (api.rados_ioctx_destroy)(ioctx) };
            return Err(e);
        }
        let opened = Self {
            api,
            image,
            ioctx,
            name: spec.display(),
            _cluster: cluster,
        };
        let size = opened.size()?;
        if size == 0 || size % 512 != 0 {
            return Err(RbdError::BadSize(size));
        }
        Ok(opened)
    }

    /// The raw handle, for the engine's aio calls.
    pub(super) fn handle(&self) -> Image {
        self.image
    }

    /// The loaded library.
    pub(super) fn api(&self) -> &'static Api {
        self.api
    }

    /// `rbd:pool/image[@snap]`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The image's size now, in bytes.
    pub fn size(&self) -> Result<u64, RbdError> {
        let mut size = 0u64;
        // SAFETY: the image is open; `size` is a valid out-pointer.
        let ret = unsafe { (self.api.rbd_get_size)(self.image, &mut size) };
        check(|| format!("size of {}", self.name), ret.into())?;
        Ok(size)
    }

    /// Writes back librbd's cache (blocking): what a completed write left there reaches the
    /// cluster before this returns.
    pub fn flush(&self) -> Result<(), RbdError> {
        // SAFETY: the image is open; a synchronous flush has no buffers of ours.
        let ret = unsafe { (self.api.rbd_flush)(self.image) };
        check(|| format!("flushing {}", self.name), ret.into())
    }

    /// Grows the image to `size` bytes; librbd refuses a shrink (another client may have
    /// grown the image beyond what this device knows).
    pub fn grow(&self, size: u64) -> Result<(), RbdError> {
        // SAFETY: the image is open; librbd serialises the resize with in-flight I/O; no
        // progress callback.
        let ret =
            unsafe { (self.api.rbd_resize2)(self.image, size, false, None, std::ptr::null_mut()) };
        check(|| format!("resizing {} to {size}", self.name), ret.into())
    }
}

impl Drop for RbdImage {
    fn drop(&mut self) {
        // SAFETY: no engine holds this image any more (they hold `Arc`s of it, and each
        // drained its ops before dropping it), so no I/O is in flight; closed once, here.
        let ret = unsafe { (self.api.rbd_close)(self.image) };
        if ret < 0 {
            log::warn!("{}: close: {}", self.name, errno(ret.into()));
        }
        // SAFETY: the image opened from this ioctx is closed; destroyed once, here.
        unsafe { (self.api.rados_ioctx_destroy)(self.ioctx) };
    }
}
