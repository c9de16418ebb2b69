//! librbd and librados, loaded at run time (`dlopen`) rather than linked: the daemon starts and
//! serves files on a host without Ceph's client libraries, and only an `rbd:` disk needs them
//! (QEMU does the same with its `block-rbd` module). Every C function the engine calls is
//! declared here, once, with the types of Ceph's `librbd.h`/`librados.h` (Ceph 14+: the
//! vectored `rbd_aio_readv`/`rbd_aio_writev` and `rbd_aio_write_zeroes`).
//!
//! The table is resolved in full on first use; a missing symbol is an error then, never a
//! crash later. Nothing here calls a function: see `image` and `engine` for the `unsafe` uses.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use super::RbdError;

/// `rados_t`.
pub type Rados = *mut c_void;
/// `rados_ioctx_t`.
pub type Ioctx = *mut c_void;
/// `rados_list_ctx_t`.
pub type ListCtx = *mut c_void;
/// `rbd_image_t`.
pub type Image = *mut c_void;
/// `rbd_completion_t`.
pub type AioCompletion = *mut c_void;
/// `rbd_callback_t`.
pub type Callback = unsafe extern "C" fn(AioCompletion, *mut c_void);

/// `librbd_progress_fn_t`.
pub type ProgressCallback = unsafe extern "C" fn(u64, u64, *mut c_void) -> c_int;

/// `RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`: zero the range without deallocating it.
pub const WRITE_ZEROES_THICK: c_int = 1;

/// The functions the engine uses, resolved from `librados.so.2` and `librbd.so.1`.
#[allow(missing_docs)] // each is the C function of the same name
pub struct Api {
    pub rados_create2: unsafe extern "C" fn(*mut Rados, *const c_char, *const c_char, u64) -> c_int,
    pub rados_conf_read_file: unsafe extern "C" fn(Rados, *const c_char) -> c_int,
    pub rados_conf_set: unsafe extern "C" fn(Rados, *const c_char, *const c_char) -> c_int,
    pub rados_connect: unsafe extern "C" fn(Rados) -> c_int,
    pub rados_shutdown: unsafe extern "C" fn(Rados),
    pub rados_ioctx_create: unsafe extern "C" fn(Rados, *const c_char, *mut Ioctx) -> c_int,
    pub rados_ioctx_destroy: unsafe extern "C" fn(Ioctx),
    pub rados_ioctx_set_namespace: unsafe extern "C" fn(Ioctx, *const c_char),
    pub rados_write_full: unsafe extern "C" fn(Ioctx, *const c_char, *const c_char, usize) -> c_int,
    pub rados_read: unsafe extern "C" fn(Ioctx, *const c_char, *mut c_char, usize, u64) -> c_int,
    pub rados_remove: unsafe extern "C" fn(Ioctx, *const c_char) -> c_int,
    pub rados_stat:
        unsafe extern "C" fn(Ioctx, *const c_char, *mut u64, *mut libc::time_t) -> c_int,
    pub rados_nobjects_list_open: unsafe extern "C" fn(Ioctx, *mut ListCtx) -> c_int,
    pub rados_nobjects_list_next: unsafe extern "C" fn(
        ListCtx,
        *mut *const c_char,
        *mut *const c_char,
        *mut *const c_char,
    ) -> c_int,
    pub rados_nobjects_list_close: unsafe extern "C" fn(ListCtx),
    pub rados_lock_exclusive: unsafe extern "C" fn(
        Ioctx,
        *const c_char,
        *const c_char,
        *const c_char,
        *const c_char,
        *mut libc::timeval,
        u8,
    ) -> c_int,
    pub rados_unlock:
        unsafe extern "C" fn(Ioctx, *const c_char, *const c_char, *const c_char) -> c_int,
    #[allow(clippy::type_complexity)]
    pub rados_list_lockers: unsafe extern "C" fn(
        Ioctx,
        *const c_char,
        *const c_char,
        *mut c_int,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
    ) -> isize,
    pub rados_break_lock: unsafe extern "C" fn(
        Ioctx,
        *const c_char,
        *const c_char,
        *const c_char,
        *const c_char,
    ) -> c_int,
    pub rbd_open: unsafe extern "C" fn(Ioctx, *const c_char, *mut Image, *const c_char) -> c_int,
    pub rbd_open_read_only:
        unsafe extern "C" fn(Ioctx, *const c_char, *mut Image, *const c_char) -> c_int,
    pub rbd_close: unsafe extern "C" fn(Image) -> c_int,
    pub rbd_get_size: unsafe extern "C" fn(Image, *mut u64) -> c_int,
    pub rbd_resize2:
        unsafe extern "C" fn(Image, u64, bool, Option<ProgressCallback>, *mut c_void) -> c_int,
    pub rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, Callback, *mut AioCompletion) -> c_int,
    pub rbd_aio_get_return_value: unsafe extern "C" fn(AioCompletion) -> isize,
    pub rbd_aio_release: unsafe extern "C" fn(AioCompletion),
    pub rbd_aio_readv:
        unsafe extern "C" fn(Image, *const libc::iovec, c_int, u64, AioCompletion) -> c_int,
    pub rbd_aio_writev:
        unsafe extern "C" fn(Image, *const libc::iovec, c_int, u64, AioCompletion) -> c_int,
    pub rbd_aio_flush: unsafe extern "C" fn(Image, AioCompletion) -> c_int,
    pub rbd_flush: unsafe extern "C" fn(Image) -> c_int,
    pub rbd_aio_write_zeroes:
        unsafe extern "C" fn(Image, u64, usize, AioCompletion, c_int, c_int) -> c_int,
    /// Keeps both libraries mapped for as long as the pointers above are used (forever).
    _libraries: (libloading::Library, libloading::Library),
}

/// The library names tried, in order (the SONAMEs Debian's `librbd1`/`librados2` install).
const RADOS: &str = "librados.so.2";
const RBD: &str = "librbd.so.1";

/// The loaded API, or why it could not be loaded (the same answer every time).
pub fn api() -> Result<&'static Api, RbdError> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load)
        .as_ref()
        .map_err(|e| RbdError::Library(e.clone()))
}

/// Loads the libraries now, so a later `landlock` sandbox (which may hide `/usr/lib`) does
/// not stop the first `rbd:` disk. Returns whether they are there; not an error when not.
pub fn preload() -> bool {
    api().is_ok()
}

fn load() -> Result<Api, String> {
    // SAFETY: loading runs the libraries' initialisers (C++ static constructors of Ceph's
    // client libraries, which have no preconditions on the loading process).
    let rados = unsafe { libloading::Library::new(RADOS) }.map_err(|e| e.to_string())?;
    // SAFETY: as above.
    let rbd = unsafe { libloading::Library::new(RBD) }.map_err(|e| e.to_string())?;
    macro_rules! symbol {
        ($library:expr, $name:ident) => {{
            // SAFETY: the field's type is the C prototype of the symbol of the same name in
            // Ceph's public headers (`librados.h`, `librbd.h`, stable C ABI since Ceph 14),
            // and the pointer stays valid because `_libraries` keeps both libraries loaded.
            let symbol = unsafe { $library.get(concat!(stringify!($name), "\0").as_bytes()) }
                .map_err(|e| format!("{}: {e}", stringify!($name)))?;
            *symbol
        }};
    }
    Ok(Api {
        rados_create2: symbol!(rados, rados_create2),
        rados_conf_read_file: symbol!(rados, rados_conf_read_file),
        rados_conf_set: symbol!(rados, rados_conf_set),
        rados_connect: symbol!(rados, rados_connect),
        rados_shutdown: symbol!(rados, rados_shutdown),
        rados_ioctx_create: symbol!(rados, rados_ioctx_create),
        rados_ioctx_destroy: symbol!(rados, rados_ioctx_destroy),
        rados_ioctx_set_namespace: symbol!(rados, rados_ioctx_set_namespace),
        rados_write_full: symbol!(rados, rados_write_full),
        rados_read: symbol!(rados, rados_read),
        rados_remove: symbol!(rados, rados_remove),
        rados_stat: symbol!(rados, rados_stat),
        rados_nobjects_list_open: symbol!(rados, rados_nobjects_list_open),
        rados_nobjects_list_next: symbol!(rados, rados_nobjects_list_next),
        rados_nobjects_list_close: symbol!(rados, rados_nobjects_list_close),
        rados_lock_exclusive: symbol!(rados, rados_lock_exclusive),
        rados_unlock: symbol!(rados, rados_unlock),
        rados_list_lockers: symbol!(rados, rados_list_lockers),
        rados_break_lock: symbol!(rados, rados_break_lock),
        rbd_open: symbol!(rbd, rbd_open),
        rbd_open_read_only: symbol!(rbd, rbd_open_read_only),
        rbd_close: symbol!(rbd, rbd_close),
        rbd_get_size: symbol!(rbd, rbd_get_size),
        rbd_resize2: symbol!(rbd, rbd_resize2),
        rbd_aio_create_completion: symbol!(rbd, rbd_aio_create_completion),
        rbd_aio_get_return_value: symbol!(rbd, rbd_aio_get_return_value),
        rbd_aio_release: symbol!(rbd, rbd_aio_release),
        rbd_aio_readv: symbol!(rbd, rbd_aio_readv),
        rbd_aio_writev: symbol!(rbd, rbd_aio_writev),
        rbd_aio_flush: symbol!(rbd, rbd_aio_flush),
        rbd_flush: symbol!(rbd, rbd_flush),
        rbd_aio_write_zeroes: symbol!(rbd, rbd_aio_write_zeroes),
        _libraries: (rados, rbd),
    })
}
