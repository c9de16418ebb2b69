//! One queue of a tap device as a queue-pair worker uses it: frames in and out with `readv`/
//! `writev` straight from and into guest memory, loss of the tap noticed and recovered.
//!
//! The tap fd sits, edge-triggered, in a small private epoll set together with a retry timer;
//! the worker thread's event loop watches that private set. This lets the worker replace the
//! tap fd (after the interface was deleted and came back) without touching the
//! vhost-user-backend event loop, which offers no way to do so from a queue thread.
//!
//! When the tap reports `EBADFD`/`ENXIO`/`ENODEV` (interface deleted), the queue goes down with
//! one log line; every second it checks whether an interface of that name exists again and,
//! if so, reattaches (it never recreates an interface someone deleted). While down, frames from
//! the guest are dropped and counted as `link-down`.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::frame::FrameRef;
use super::header::HEADER_LEN;
use super::stats::Drop;
use crate::devices::sg::host_iovecs;
use crate::storage::GuestIovecs;
use crate::sys::tap::{Tap, TapError};

/// Virtio-net header size the tap is told to use (VERSION_1's 12 bytes).
const VNET_HDR_LEN: i32 = 12;
/// How often a lost tap is looked for.
const RETRY: Duration = Duration::from_secs(1);
const TAP_EVENT: u64 = 1;
const TIMER_EVENT: u64 = 2;

/// Errors setting up a tap queue.
#[derive(Debug, thiserror::Error)]
pub enum TapQueueError {
    /// The tap could not be opened or configured.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The private epoll set or the timer could not be created.
    #[error("cannot set up tap polling")]
    Poll(#[source] std::io::Error),
}

/// What woke the worker.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TapEvents {
    /// The tap may have frames to read.
    pub readable: bool,
    /// The tap came back after being lost.
    pub reattached: bool,
}

/// A tap queue owned by one worker.
#[derive(Debug)]
pub struct TapQueue {
    name: String,
    multi_queue: bool,
    tap: Option<Tap>,
    offloads: u32,
    epoll: Epoll,
    timer: TimerFd,
    /// Scratch iovec list for [`TapQueue::send`], emptied after each frame.
    iovecs: GuestIovecs,
}

impl TapQueue {
    /// Opens (creating if needed) queue of tap `name`.
    pub fn open(name: &str, multi_queue: bool) -> Result<Self, TapQueueError> {
        let tap = open_configured(name, multi_queue)?;
        let epoll = Epoll::new().map_err(TapQueueError::Poll)?;
        let timer = TimerFd::new()
            .map_err(|e| TapQueueError::Poll(std::io::Error::from_raw_os_error(e.errno())))?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TIMER_EVENT),
            )
            .map_err(TapQueueError::Poll)?;
        let queue = Self {
            name: name.to_string(),
            multi_queue,
            tap: None,
            offloads: 0,
            epoll,
            timer,
            iovecs: GuestIovecs::default(),
        };
        queue.watch(&tap).map_err(TapQueueError::Poll)?;
        Ok(Self {
            tap: Some(tap),
            ..queue
        })
    }

    /// Makes the tap persistent or not (`Tap::set_persist`), through this queue's fd.
    pub fn set_persist(&self, on: bool) -> Result<(), TapError> {
        match &self.tap {
            Some(tap) => tap.set_persist(on),
            None => Err(TapError::Ioctl(
                "TUNSETPERSIST",
                std::io::Error::from_raw_os_error(libc::ENODEV),
            )),
        }
    }

    /// The fd the worker's event loop watches (level-triggered readable).
    pub fn poll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the tap is attached.
    pub fn is_up(&self) -> bool {
        self.tap.is_some()
    }

    /// Sets the offloads the guest accepts (kept for reattaching).
    pub fn set_offloads(&mut self, flags: u32) {
        self.offloads = flags;
        if let Some(tap) = &self.tap {
            if let Err(e) = tap.set_offload(flags) {
                log::warn!("tap {}: {e}", self.name);
            }
        }
    }

    /// Collects what happened since the last call; reattaches a lost tap when it is back.
    pub fn events(&mut self) -> TapEvents {
        let mut ready = [EpollEvent::default(); 4];
        let mut events = TapEvents::default();
        let count = match self.epoll.wait(0, &mut ready) {
            Ok(count) => count,
            Err(e) => {
                log::warn!("tap {}: epoll: {e}", self.name);
                0
            }
        };
        for event in ready.iter().take(count) {
            match event.data() {
                TAP_EVENT => events.readable = true,
                TIMER_EVENT => {
                    let _ = self.timer.clear();
                    if self.try_reattach() {
                        events.reattached = true;
                        events.readable = true;
                    }
                }
                _ => {}
            }
        }
        events
    }

    /// `readv` of one frame into `iovecs`. `Ok(None)`: no frame waiting (or the tap is gone).
    pub fn read_frame(&mut self, iovecs: &[libc::iovec]) -> Option<usize> {
        let tap = self.tap.as_ref()?;
        let count = libc::c_int::try_from(iovecs.len()).ok()?;
        // SAFETY: every iovec points into mapped guest memory, device-writable by the
        // descriptors it came from, and the caller holds that memory mapping (and the rx
        // ring lock) until it has published or put back the chains; readv writes at most
        // `iov_len` bytes into each.
        let n = unsafe { libc::readv(tap.file().as_raw_fd(), iovecs.as_ptr(), count) };
        match usize::try_from(n) {
            Ok(n) => Some(n),
            Err(_) => {
                self.on_error(std::io::Error::last_os_error());
                None
            }
        }
    }

    /// Writes one frame: our checked copy of its header, then its bytes, straight from guest
    /// memory (one `writev`, no copy) or from ours.
    pub fn send(&mut self, frame: &FrameRef<'_>) -> Result<(), Drop> {
        if !self.is_up() {
            return Err(Drop::LinkDown);
        }
        let header = frame.header().to_bytes();
        self.iovecs.0.clear();
        self.iovecs.0.push(libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: HEADER_LEN,
        });
        // A guest's frame leaves with the Ethernet header checked with it (our copy), the
        // rest straight from guest memory.
        let mapped = match frame {
            FrameRef::Guest { memory, frame, .. } => {
                let mut from = 0u64;
                if frame.frame_len >= 14 {
                    self.iovecs.0.push(libc::iovec {
                        iov_base: frame.eth.as_ptr() as *mut libc::c_void,
                        iov_len: frame.eth.len(),
                    });
                    from = 14;
                }
                host_iovecs(
                    memory,
                    &frame.spans,
                    (HEADER_LEN as u64).saturating_add(from),
                    u64::from(frame.frame_len).saturating_sub(from),
                    &mut self.iovecs.0,
                )
                .map_err(Drop::from)
            }
            FrameRef::Bytes { frame, .. } => {
                self.iovecs.0.push(libc::iovec {
                    iov_base: frame.as_ptr() as *mut libc::c_void,
                    iov_len: frame.len(),
                });
                Ok(())
            }
        };
        let written = mapped.and_then(|()| self.write_iovecs().map_err(|_| Drop::TapError));
        self.iovecs.0.clear();
        written
    }

    /// `writev` of the frame in `self.iovecs`.
    fn write_iovecs(&mut self) -> Result<(), std::io::Error> {
        let Some(tap) = self.tap.as_ref() else {
            return Err(std::io::Error::from_raw_os_error(libc::ENODEV));
        };
        let count = libc::c_int::try_from(self.iovecs.0.len())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: every iovec points into memory the caller of `send` keeps mapped for the
        // duration of the call (its guest memory snapshot or its own frame bytes, and the
        // header on `send`'s stack); writev only reads through them.
        let n = unsafe { libc::writev(tap.file().as_raw_fd(), self.iovecs.0.as_ptr(), count) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            self.on_error(std::io::Error::from_raw_os_error(
                e.raw_os_error().unwrap_or(0),
            ));
            return Err(e);
        }
        Ok(())
    }

    fn on_error(&mut self, e: std::io::Error) {
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => {}
            Some(libc::EBADFD) | Some(libc::ENXIO) | Some(libc::ENODEV) => self.lost(&e),
            _ => log::debug!("tap {}: {e}", self.name),
        }
    }

    fn lost(&mut self, e: &std::io::Error) {
        if let Some(tap) = self.tap.take() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                tap.file().as_raw_fd(),
                EpollEvent::default(),
            );
            log::warn!(
                "tap {}: lost ({e}); link down until an interface of that name exists again",
                self.name
            );
            if let Err(e) = self.timer.reset(RETRY, Some(RETRY)) {
                log::error!("tap {}: cannot arm the retry timer: {e}", self.name);
            }
        }
    }

    fn try_reattach(&mut self) -> bool {
        if self.tap.is_some() {
            let _ = self.timer.reset(Duration::ZERO, None);
            return false;
        }
        if !std::path::Path::new("/sys/class/net")
            .join(&self.name)
            .exists()
        {
            return false;
        }
        match open_configured(&self.name, self.multi_queue) {
            Ok(tap) => {
                if let Err(e) = tap.set_offload(self.offloads) {
                    log::warn!("tap {}: {e}", self.name);
                }
                if let Err(e) = self.watch(&tap) {
                    log::warn!("tap {}: {e}", self.name);
                    return false;
                }
                self.tap = Some(tap);
                let _ = self.timer.reset(Duration::ZERO, None);
                log::info!("tap {}: back, link up", self.name);
                true
            }
            Err(e) => {
                log::debug!("tap {}: not back yet: {e}", self.name);
                false
            }
        }
    }

    fn watch(&self, tap: &Tap) -> std::io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            tap.file().as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TAP_EVENT),
        )
    }
}

fn open_configured(name: &str, multi_queue: bool) -> Result<Tap, TapError> {
    let tap = Tap::open(name, multi_queue)?;
    tap.set_vnet_hdr_size(VNET_HDR_LEN)?;
    // Until the guest says otherwise, the tap must not hand us offloaded frames.
    tap.set_offload(0)?;
    Ok(tap)
}
