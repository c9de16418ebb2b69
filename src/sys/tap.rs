//! Linux tap devices for virtio-net (issue 4): open or create a tap by name with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (and `IFF_MULTI_QUEUE` for several queue pairs), set
//! the virtio-net header size and the offloads the guest negotiated.
//!
//! Frames read from and written to the fd carry a virtio-net header of the configured size in
//! front, exactly the layout the guest's buffers use, so the data path can `readv`/`writev`
//! straight between guest memory and the tap.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// `_IOW('T', 203, int)`.
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;

/// `TUN_F_*` offload flags for [`Tap::set_offload`].
pub mod offload {
    /// The tap may deliver frames with partial checksums.
    pub const CSUM: u32 = 0x01;
    /// TCPv4 segmentation offload.
    pub const TSO4: u32 = 0x02;
    /// TCPv6 segmentation offload.
    pub const TSO6: u32 = 0x04;
    /// TSO with ECN.
    pub const TSO_ECN: u32 = 0x08;
}

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty or longer than 15 bytes.
    #[error("bad tap name `{0}`")]
    BadName(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun")]
    Open(#[source] std::io::Error),
    /// An ioctl failed.
    #[error("{0} failed")]
    Ioctl(&'static str, #[source] std::io::Error),
}

/// `struct ifreq` as TUNSETIFF uses it: name and flags, padded to the kernel's 40 bytes.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Whether a network interface called `name` exists (in our network namespace).
pub fn exists(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: if_nametoindex reads a NUL-terminated name; 0 means no such interface.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// An open tap queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (creating if needed) tap `name`; `multi_queue` must match for every queue of the
    /// same tap.
    pub fn open(name: &str, multi_queue: bool) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        if multi_queue {
            req.flags |= IFF_MULTI_QUEUE;
        }
        for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        // A live upgrade's previous process may still hold the tap (`sys::takeover`).
        super::takeover::retry_while_busy(
            || {
                // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is a live,
                // correctly laid out and sized (40 bytes) value, and the fd is the tun device
                // we just opened.
                let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
                if rc < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            },
            |e| e.raw_os_error() == Some(libc::EBUSY),
        )
        .map_err(|e| TapError::Ioctl("TUNSETIFF", e))?;
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes the interface outlive its last open fd (`on`), or go with it (`off`): a
    /// persistent tap keeps its host-side addresses, bridge membership and firewall hooks
    /// while the daemon restarts.
    pub fn set_persist(&self, on: bool) -> Result<(), TapError> {
        self.ioctl_by_value("TUNSETPERSIST", TUNSETPERSIST, libc::c_ulong::from(on))
    }

    /// An ioctl whose argument is passed by value (no memory): `name` for the error.
    fn ioctl_by_value(
        &self,
        name: &'static str,
        request: libc::c_ulong,
        arg: libc::c_ulong,
    ) -> Result<(), TapError> {
        // SAFETY: `request` is one of the tun ioctls that take their argument by value, so no
        // memory is read or written; the fd is our open tun device.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), request, arg) };
        if rc < 0 {
            return Err(TapError::Ioctl(name, std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The tap fd (non-blocking).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Sets the virtio-net header size the tap prepends and expects (12 for VERSION_1).
    pub fn set_vnet_hdr_size(&self, size: i32) -> Result<(), TapError> {
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points to `size`.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &size) };
        if rc < 0 {
            return Err(TapError::Ioctl(
                "TUNSETVNETHDRSZ",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Tells the tap which offloads the guest accepts (`offload::*` flags).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        self.ioctl_by_value("TUNSETOFFLOAD", TUNSETOFFLOAD, libc::c_ulong::from(flags))
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn ifreq_has_the_kernels_size() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        assert!(matches!(Tap::open("", false), Err(TapError::BadName(_))));
        assert!(matches!(
            Tap::open("a-name-that-is-far-too-long", false),
            Err(TapError::BadName(_))
        ));
    }
}
