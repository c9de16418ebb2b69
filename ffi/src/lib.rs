//! `libnovacron`: a C client library for the novacrond control socket.
//!
//! The library speaks the daemon's JSON-RPC protocol over its unix socket; it shares no code or
//! memory with the daemon, so it works against any daemon version that speaks the protocol.
//!
//! Conventions for every function:
//! - the return value is an [`NcStatus`]; on anything but `NC_OK`, [`nc_last_error`] and
//!   [`nc_last_error_kind`] describe the failure (thread-local, valid until the next call
//!   from the same thread);
//! - strings passed in are NUL-terminated UTF-8 and are only borrowed for the call;
//! - strings returned through `char **out` are owned by the caller and must be released with
//!   [`nc_string_free`]; `nc_client` handles with [`nc_disconnect`];
//! - no panic crosses the boundary: one is caught and reported as `NC_ERR_INTERNAL`.
//!
//! A client handle is not thread-safe: use one per thread, or lock around it.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use novacron::control::client::{Client, ClientError};
use serde_json::{json, Value};

/// Result codes of every `nc_*` function.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NcStatus {
    /// Success.
    NcOk = 0,
    /// A NULL pointer, invalid UTF-8 or malformed JSON was passed in.
    NcErrInvalidArgument = 1,
    /// The control socket could not be reached.
    NcErrConnect = 2,
    /// Reading or writing the socket failed.
    NcErrIo = 3,
    /// The daemon's reply was not valid JSON-RPC.
    NcErrProtocol = 4,
    /// The daemon refused the request; see `nc_last_error_kind` (e.g. "not-found", "busy").
    NcErrServer = 5,
    /// A bug in the library (a caught panic).
    NcErrInternal = 6,
}

/// Totals of one block device's counters.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NcBlkTotals {
    /// Completed reads.
    pub reads: u64,
    /// Completed writes.
    pub writes: u64,
    /// Completed flushes.
    pub flushes: u64,
    /// Bytes read by the guest.
    pub bytes_read: u64,
    /// Bytes written by the guest.
    pub bytes_written: u64,
    /// Requests failed by the backing.
    pub io_errors: u64,
    /// Requests refused by validation.
    pub rejected: u64,
    /// Requests in flight.
    pub in_flight: u64,
}

/// An open connection to a daemon's control socket.
pub struct NcClient(Client);

struct Failure {
    status: NcStatus,
    kind: String,
    message: String,
}

impl Failure {
    fn new(status: NcStatus, kind: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind: kind.to_string(),
            message: message.into(),
        }
    }
}

/// `value.a.b...`, or `null` when any step is missing.
fn field<'a>(value: &'a Value, path: &[&str]) -> &'a Value {
    path.iter()
        .try_fold(value, |v, key| v.get(key))
        .unwrap_or(&Value::Null)
}

thread_local! {
    static LAST_ERROR: RefCell<(CString, CString)> = RefCell::new((CString::default(), CString::default()));
}

fn set_last_error(kind: &str, message: &str) {
    let clean = |s: &str| CString::new(s.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = (clean(kind), clean(message)));
}

/// Runs `body`, converting failures and panics into a status and the thread's last error.
fn guard(body: impl FnOnce() -> Result<(), Failure>) -> NcStatus {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            set_last_error("", "");
            NcStatus::NcOk
        }
        Ok(Err(failure)) => {
            set_last_error(&failure.kind, &failure.message);
            failure.status
        }
        Err(_) => {
            set_last_error("internal", "internal error in libnovacron");
            NcStatus::NcErrInternal
        }
    }
}

/// Borrows a C string argument.
///
/// # Safety
/// `ptr` is NULL or a valid NUL-terminated string that outlives the returned borrow.
unsafe fn arg<'a>(ptr: *const c_char, name: &str) -> Result<&'a str, Failure> {
    if ptr.is_null() {
        return Err(Failure::new(
            NcStatus::NcErrInvalidArgument,
            "invalid-argument",
            format!("{name} is NULL"),
        ));
    }
    // SAFETY: non-NULL and, by the caller's contract, NUL-terminated and live for 'a.
    unsafe { CStr::from_ptr(ptr) }.to_str().map_err(|_| {
        Failure::new(
            NcStatus::NcErrInvalidArgument,
            "invalid-argument",
            format!("{name} is not UTF-8"),
        )
    })
}

fn client<'a>(ptr: *mut NcClient) -> Result<&'a mut NcClient, Failure> {
    // SAFETY: a non-NULL handle comes from nc_connect and is used by one thread at a time
    // (documented), so a unique borrow for this call is sound.
    unsafe { ptr.as_mut() }.ok_or_else(|| {
        Failure::new(
            NcStatus::NcErrInvalidArgument,
            "invalid-argument",
            "client is NULL",
        )
    })
}

fn give_string(out: *mut *mut c_char, value: &Value) -> Result<(), Failure> {
    if out.is_null() {
        return Ok(());
    }
    let text = CString::new(value.to_string())
        .map_err(|_| Failure::new(NcStatus::NcErrProtocol, "protocol", "reply contains NUL"))?;
    // SAFETY: `out` is non-NULL and, by contract, points to writable storage for a pointer.
    unsafe { *out = text.into_raw() };
    Ok(())
}

impl NcClient {
    fn call(&mut self, method: &str, params: Value) -> Result<Value, Failure> {
        self.0.call(method, params).map_err(|e| match e {
            ClientError::Server { kind, message, .. } => {
                Failure::new(NcStatus::NcErrServer, &kind, message)
            }
            ClientError::Protocol(_) => {
                Failure::new(NcStatus::NcErrProtocol, "protocol", e.to_string())
            }
            ClientError::Connect { .. } => {
                Failure::new(NcStatus::NcErrConnect, "connect", e.to_string())
            }
            ClientError::Io(_) | ClientError::Closed | ClientError::Broken => {
                Failure::new(NcStatus::NcErrIo, "io", e.to_string())
            }
        })
    }
}

/// Connects to the control socket at `socket_path`; on success `*out` receives a handle to
/// release with `nc_disconnect`.
///
/// # Safety
/// `socket_path` is a NUL-terminated string; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn nc_connect(
    socket_path: *const c_char,
    out: *mut *mut NcClient,
) -> NcStatus {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let path = unsafe { arg(socket_path, "socket_path") }?;
        if out.is_null() {
            return Err(Failure::new(
                NcStatus::NcErrInvalidArgument,
                "invalid-argument",
                "out is NULL",
            ));
        }
        let client = Client::connect(std::path::Path::new(path), Some(Duration::from_secs(60)))
            .map_err(|e| match e {
                ClientError::Connect { source, .. } => Failure::new(
                    NcStatus::NcErrConnect,
                    "connect",
                    format!("{path}: {source}"),
                ),
                other => Failure::new(NcStatus::NcErrIo, "io", other.to_string()),
            })?;
        let handle = Box::new(NcClient(client));
        // SAFETY: checked non-NULL above; writable by contract.
        unsafe { *out = Box::into_raw(handle) };
        Ok(())
    })
}

/// Closes a connection. NULL is ignored.
///
/// # Safety
/// `client` is NULL or a handle from `nc_connect` not yet disconnected.
#[no_mangle]
pub unsafe extern "C" fn nc_disconnect(client: *mut NcClient) {
    if !client.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: the handle came from Box::into_raw in nc_connect and is freed once.
            drop(unsafe { Box::from_raw(client) });
        }));
    }
}

/// Calls any method: `params_json` is a JSON object (or NULL for none); on success the
/// result's JSON goes to `*out_json` (if `out_json` is not NULL).
///
/// # Safety
/// Pointers as described in the crate documentation.
#[no_mangle]
pub unsafe extern "C" fn nc_call(
    client: *mut NcClient,
    method: *const c_char,
    params_json: *const c_char,
    out_json: *mut *mut c_char,
) -> NcStatus {
    guard(|| {
        let client = self::client(client)?;
        // SAFETY: forwarded from this function's contract.
        let method = unsafe { arg(method, "method") }?;
        let params = if params_json.is_null() {
            json!({})
        } else {
            // SAFETY: forwarded from this function's contract.
            let text = unsafe { arg(params_json, "params_json") }?;
            serde_json::from_str(text).map_err(|e| {
                Failure::new(
                    NcStatus::NcErrInvalidArgument,
                    "invalid-argument",
                    format!("params_json: {e}"),
                )
            })?
        };
        let result = client.call(method, params)?;
        give_string(out_json, &result)
    })
}

/// Adds a device: `params_json` as for `device.add`, e.g.
/// `{"type":"blk","socket":"/run/novacron/vdb.sock","path":"/var/lib/vdb.img","size":"20G"}`.
/// The new device's description goes to `*out_json` (if not NULL).
///
/// # Safety
/// Pointers as described in the crate documentation.
#[no_mangle]
pub unsafe extern "C" fn nc_device_add(
    client: *mut NcClient,
    params_json: *const c_char,
    out_json: *mut *mut c_char,
) -> NcStatus {
    // SAFETY: same contract, forwarded.
    unsafe { nc_call(client, c"device.add".as_ptr(), params_json, out_json) }
}

/// Removes device `id`; `force` disconnects a connected front-end.
///
/// # Safety
/// Pointers as described in the crate documentation.
#[no_mangle]
pub unsafe extern "C" fn nc_device_remove(
    client: *mut NcClient,
    id: *const c_char,
    force: bool,
) -> NcStatus {
    guard(|| {
        let client = self::client(client)?;
        // SAFETY: forwarded from this function's contract.
        let id = unsafe { arg(id, "id") }?;
        client
            .call("device.remove", json!({"id": id, "force": force}))
            .map(drop)
    })
}

/// Lists devices as a JSON array in `*out_json`.
///
/// # Safety
/// Pointers as described in the crate documentation.
#[no_mangle]
pub unsafe extern "C" fn nc_device_list(
    client: *mut NcClient,
    out_json: *mut *mut c_char,
) -> NcStatus {
    // SAFETY: same contract, forwarded; NULL params means none.
    unsafe { nc_call(client, c"device.list".as_ptr(), std::ptr::null(), out_json) }
}

/// A block device's counter totals, as a struct.
///
/// # Safety
/// Pointers as described in the crate documentation; `out` points to an `NcBlkTotals`.
#[no_mangle]
pub unsafe extern "C" fn nc_device_stats(
    client: *mut NcClient,
    id: *const c_char,
    out: *mut NcBlkTotals,
) -> NcStatus {
    guard(|| {
        let client = self::client(client)?;
        // SAFETY: forwarded from this function's contract.
        let id = unsafe { arg(id, "id") }?;
        if out.is_null() {
            return Err(Failure::new(
                NcStatus::NcErrInvalidArgument,
                "invalid-argument",
                "out is NULL",
            ));
        }
        let stats = client.call("device.stats", json!({"id": id}))?;
        let total = field(&stats, &["total"]);
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let totals = NcBlkTotals {
            reads: n(field(total, &["requests", "read"])),
            writes: n(field(total, &["requests", "write"])),
            flushes: n(field(total, &["requests", "flush"])),
            bytes_read: n(field(total, &["bytes-read"])),
            bytes_written: n(field(total, &["bytes-written"])),
            io_errors: n(field(total, &["io-errors"])),
            rejected: n(field(total, &["rejected"])),
            in_flight: n(field(total, &["in-flight"])),
        };
        // SAFETY: checked non-NULL; points to an NcBlkTotals by contract.
        unsafe { *out = totals };
        Ok(())
    })
}

/// Releases a string returned by this library. NULL is ignored.
///
/// # Safety
/// `s` is NULL or a string from this library not yet freed.
#[no_mangle]
pub unsafe extern "C" fn nc_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: the string came from CString::into_raw in this library and is freed once.
        drop(unsafe { CString::from_raw(s) });
    }
}

/// The last failure's message on this thread ("" after a success). Valid until the next
/// `nc_*` call on this thread; do not free.
#[no_mangle]
pub extern "C" fn nc_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().1.as_ptr())
}

/// The last failure's stable kind on this thread ("not-found", "busy", "invalid-params",
/// "connect", "io", ...; "" after a success). Same lifetime rules as `nc_last_error`.
#[no_mangle]
pub extern "C" fn nc_last_error_kind() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().0.as_ptr())
}
