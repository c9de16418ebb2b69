//! Kicking an eventfd a front-end gave us, without letting it block the kicking thread.
//!
//! A kick fd is the front-end's: its `O_NONBLOCK` flag belongs to the open file, which the
//! front-end shares and may clear at any time, and it may fill the counter to its maximum. A
//! plain `write` of 1 then blocks until someone reads the fd, which may be never (the backend
//! already dropped its copy). The relay kicks from the thread that also ends the connection, so
//! such a write would hold device removal and shutdown for good.
//!
//! The write goes through a small io_uring instead, linked to a timeout: a write that cannot
//! complete at once is cancelled when the timeout fires (io_uring interrupts the worker
//! blocked in it), and the kick is given up. (`poll` for `POLLOUT` before a plain write, or
//! setting `O_NONBLOCK` first, only narrows the window: the front-end can act in between.)

use std::os::fd::AsRawFd;
use std::time::Duration;

use io_uring::{opcode, register::Restriction, squeue, types, IoUring};

/// How long a kick may wait for room in the counter.
pub const KICK_TIMEOUT: Duration = Duration::from_millis(50);

/// Why a kick was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum KickError {
    /// The ring could not be set up or submitted to.
    #[error("kick ring: {0}")]
    Ring(#[from] std::io::Error),
    /// The write failed or was cancelled by the timeout (`-errno`).
    #[error("kick write: errno {0}")]
    Write(i32),
}

/// A small io_uring for kicks, restricted before it is enabled to a write linked to a
/// timeout (io_uring's own sandbox: the relay thread that uses it may not create rings, and
/// this one can do nothing else).
pub struct Kicker {
    ring: IoUring,
}

impl Kicker {
    /// A restricted kick ring (made on a thread allowed to create rings, then handed over).
    pub fn new() -> Result<Self, KickError> {
        let ring = IoUring::builder().setup_r_disabled().build(2)?;
        let submitter = ring.submitter();
        let mut restrictions = [
            Restriction::sqe_op(opcode::Write::CODE),
            Restriction::sqe_op(opcode::LinkTimeout::CODE),
            Restriction::sqe_flags_allowed(squeue::Flags::IO_LINK.bits()),
        ];
        submitter.register_restrictions(&mut restrictions)?;
        submitter.register_enable_rings()?;
        Ok(Self { ring })
    }

    /// Adds 1 to eventfd `fd`'s counter, waiting at most `timeout` for room.
    pub fn kick(&mut self, fd: &impl AsRawFd, timeout: Duration) -> Result<(), KickError> {
        let value = 1u64.to_ne_bytes();
        let spec = types::Timespec::new()
            .sec(timeout.as_secs())
            .nsec(timeout.subsec_nanos());
        let write = opcode::Write::new(types::Fd(fd.as_raw_fd()), value.as_ptr(), 8)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(1);
        let limit = opcode::LinkTimeout::new(&spec).build().user_data(2);
        // SAFETY: `value` and `spec` outlive the submission: both entries complete before
        // this function returns (`submit_and_wait(2)` below), and nothing else refers to them.
        unsafe {
            let mut queue = self.ring.submission();
            queue
                .push(&write)
                .map_err(|_| std::io::Error::other("kick queue full"))?;
            queue
                .push(&limit)
                .map_err(|_| std::io::Error::other("kick queue full"))?;
        }
        // Both entries always complete: the write (done, failed or cancelled) and its timeout
        // (fired, or cancelled by the write's completion).
        self.ring.submit_and_wait(2)?;
        let mut written = -libc::EIO;
        for entry in self.ring.completion() {
            if entry.user_data() == 1 {
                written = entry.result();
            }
        }
        if written == 8 {
            Ok(())
        } else {
            Err(KickError::Write(written.saturating_neg()))
        }
    }
}

/// What [`consume`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consumed {
    /// The counter was read (and reset).
    Kicks(u64),
    /// It was zero: nothing to read (not an error: the front-end may read its own fd).
    None,
}

/// Reads (and resets) eventfd `fd`'s counter without blocking, whatever the file's
/// `O_NONBLOCK` flag says: a kick fd is shared with the front-end, which may clear that flag
/// and read the counter to zero between our `epoll` wake-up and our read, and a blocking read
/// there would hold the queue's lock (and every sender into that queue) for good.
/// `preadv2(RWF_NOWAIT)` is refused by kernels whose eventfd has no `read_iter` (before
/// 6.8): those get a `poll` first, which narrows that window but cannot close it.
pub fn consume(fd: &impl AsRawFd) -> std::io::Result<Consumed> {
    let mut value = [0u8; 8];
    let iov = libc::iovec {
        iov_base: value.as_mut_ptr().cast(),
        iov_len: value.len(),
    };
    // SAFETY: one iovec over `value`, which outlives the call; offset -1 is the file
    // position (an eventfd has none).
    let n = unsafe { libc::preadv2(fd.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
    if n == 8 {
        return Ok(Consumed::Kicks(u64::from_ne_bytes(value)));
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EAGAIN) => Ok(Consumed::None),
        Some(libc::EOPNOTSUPP | libc::EINVAL) => consume_after_poll(fd),
        _ if n >= 0 => Err(std::io::Error::other("short eventfd read")),
        _ => Err(error),
    }
}

fn consume_after_poll(fd: &impl AsRawFd) -> std::io::Result<Consumed> {
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, a zero timeout.
    if unsafe { libc::poll(&mut poll, 1, 0) } <= 0 || poll.revents & libc::POLLIN == 0 {
        return Ok(Consumed::None);
    }
    let mut value = [0u8; 8];
    // SAFETY: 8 bytes into `value`.
    let n = unsafe { libc::read(fd.as_raw_fd(), value.as_mut_ptr().cast(), 8) };
    match n {
        8 => Ok(Consumed::Kicks(u64::from_ne_bytes(value))),
        _ if std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) => {
            Ok(Consumed::None)
        }
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;

    fn eventfd(flags: libc::c_int) -> File {
        // SAFETY: eventfd has no preconditions.
        let fd = unsafe { libc::eventfd(0, flags) };
        assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd, owned from here on.
        unsafe { File::from_raw_fd(fd) }
    }

    #[test]
    fn a_kick_adds_one() {
        let mut fd = eventfd(0);
        Kicker::new().unwrap().kick(&fd, KICK_TIMEOUT).unwrap();
        let mut value = [0u8; 8];
        fd.read_exact(&mut value).unwrap();
        assert_eq!(u64::from_ne_bytes(value), 1);
    }

    #[test]
    fn a_full_blocking_eventfd_costs_the_timeout_not_the_thread() {
        // Blocking mode (the front-end cleared O_NONBLOCK) and a full counter: a plain write
        // would block until a read that never comes.
        let mut fd = eventfd(0);
        fd.write_all(&(u64::MAX - 1).to_ne_bytes()).unwrap();
        let (done, result) = std::sync::mpsc::channel();
        let kicked = fd.try_clone().unwrap();
        let mut kicker = Kicker::new().unwrap();
        std::thread::spawn(move || {
            let _ = done.send(kicker.kick(&kicked, Duration::from_millis(20)).is_err());
        });
        // Generous: the kick gives up after 20 ms; a hang fails here instead of hanging.
        let gave_up = result
            .recv_timeout(Duration::from_secs(10))
            .expect("the kick returned");
        assert!(gave_up, "no room: the kick is given up");
        let mut value = [0u8; 8];
        fd.read_exact(&mut value).unwrap();
        assert_eq!(u64::from_ne_bytes(value), u64::MAX - 1, "nothing added");
    }

    #[test]
    fn consuming_an_empty_blocking_eventfd_does_not_block() {
        let mut fd = eventfd(0);
        assert_eq!(consume(&fd).unwrap(), Consumed::None);
        fd.write_all(&3u64.to_ne_bytes()).unwrap();
        assert_eq!(consume(&fd).unwrap(), Consumed::Kicks(3));
        assert_eq!(consume(&fd).unwrap(), Consumed::None, "read and reset");
    }

    #[test]
    fn the_ring_does_nothing_but_kicks_and_is_reused() {
        let mut kicker = Kicker::new().unwrap();
        // Restricted: any other operation is refused.
        let nop = opcode::Nop::new().build().user_data(9);
        // SAFETY: a NOP refers to no memory.
        unsafe { kicker.ring.submission().push(&nop).unwrap() };
        kicker.ring.submit_and_wait(1).unwrap();
        let refused = kicker.ring.completion().next().unwrap().result();
        assert_eq!(refused, -libc::EACCES);
        let mut fd = eventfd(0);
        for _ in 0..3 {
            kicker.kick(&fd, KICK_TIMEOUT).unwrap();
        }
        let mut value = [0u8; 8];
        fd.read_exact(&mut value).unwrap();
        assert_eq!(u64::from_ne_bytes(value), 3);
    }
}
