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
    /// The ring is out of step (entries possibly still queued): not used again.
    #[error("kick ring broken")]
    Broken,
}

/// The value every kick adds: a static, so a write the kernel has not finished (a kick
/// given up on, still being cancelled) never reads freed memory.
static ONE: [u8; 8] = 1u64.to_ne_bytes();

/// A small io_uring for kicks, restricted before it is enabled to a write linked to a
/// timeout (io_uring's own sandbox: the relay thread that uses it may not create rings, and
/// this one can do nothing else).
pub struct Kicker {
    ring: IoUring,
    /// The timeout the next kick links (read by the kernel when the entry is submitted).
    limit: Box<types::Timespec>,
    /// Each kick's completions carry its number: a late one from an earlier kick is skipped.
    seq: u64,
    /// A kick went wrong in a way that may leave entries in flight: the ring is not used
    /// again (kicks are then given up).
    broken: bool,
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
        Ok(Self {
            ring,
            limit: Box::new(types::Timespec::new()),
            seq: 0,
            broken: false,
        })
    }

    /// Adds 1 to eventfd `fd`'s counter, waiting at most `timeout` for room.
    pub fn kick(&mut self, fd: &impl AsRawFd, timeout: Duration) -> Result<(), KickError> {
        if self.broken {
            return Err(KickError::Broken);
        }
        let result = self.kick_once(fd, timeout);
        if matches!(result, Err(KickError::Ring(_) | KickError::Broken)) {
            self.broken = true;
        }
        result
    }

    fn kick_once(&mut self, fd: &impl AsRawFd, timeout: Duration) -> Result<(), KickError> {
        self.seq = self.seq.wrapping_add(2);
        let (write_id, limit_id) = (self.seq, self.seq.wrapping_add(1));
        *self.limit = types::Timespec::new()
            .sec(timeout.as_secs())
            .nsec(timeout.subsec_nanos());
        let write = opcode::Write::new(types::Fd(fd.as_raw_fd()), ONE.as_ptr(), 8)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(write_id);
        let limit = opcode::LinkTimeout::new(&*self.limit)
            .build()
            .user_data(limit_id);
        // SAFETY: the write reads `ONE`, a static; the timeout reads `*self.limit`, boxed in
        // this `Kicker`, when it is submitted (the kernel copies it then), and a `Kicker`
        // whose entries may still be queued is marked broken and never submits again. Both
        // entries are pushed together (the queue holds 2 and is empty between kicks: every
        // kick waits for both its completions, else the ring is broken).
        unsafe {
            let mut queue = self.ring.submission();
            if queue.push(&write).is_err() || queue.push(&limit).is_err() {
                return Err(KickError::Broken);
            }
        }
        if self.ring.submit()? != 2 {
            return Err(KickError::Broken);
        }
        // Both always complete: the write (done, failed or cancelled by the timeout) and the
        // timeout (fired, or cancelled by the write's completion). A wait cut short (a stop
        // signal, a debugger) returns early: wait again, a bounded number of times.
        let mut written = None;
        let mut seen = 0;
        for _ in 0..1000 {
            for entry in self.ring.completion() {
                if entry.user_data() == write_id {
                    written = Some(entry.result());
                    seen += 1;
                } else if entry.user_data() == limit_id {
                    seen += 1;
                }
            }
            if seen >= 2 {
                return match written {
                    Some(8) => Ok(()),
                    Some(result) => Err(KickError::Write(result.saturating_neg())),
                    None => Err(KickError::Broken),
                };
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(KickError::Ring(e)),
            }
        }
        Err(KickError::Broken)
    }
}

/// Kicks eventfd `fd` without a ring (a host without io_uring): a plain write, only while
/// the fd is non-blocking (a front-end that clears the flag between this check and the
/// write still blocks the caller: the race the ring closes).
pub fn kick_without_ring(fd: &impl AsRawFd) -> Result<(), KickError> {
    // SAFETY: F_GETFL only reads the status flags of an fd the caller holds.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 || flags & libc::O_NONBLOCK == 0 {
        return Err(KickError::Write(libc::EWOULDBLOCK));
    }
    // SAFETY: 8 bytes from a static.
    let n = unsafe { libc::write(fd.as_raw_fd(), ONE.as_ptr().cast(), 8) };
    if n == 8 {
        Ok(())
    } else {
        Err(KickError::Write(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        ))
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
/// `preadv2(RWF_NOWAIT)` is refused by kernels whose eventfd does not support it (older
/// ones): those get a `poll` first, which narrows that window but cannot close it.
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
    if n >= 0 {
        return Err(std::io::Error::other("short eventfd read"));
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EAGAIN) => Ok(Consumed::None),
        Some(libc::EOPNOTSUPP | libc::EINVAL) => consume_after_poll(fd),
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

/// Eventfds and bounded waits for tests of code that must not block on them.
#[cfg(test)]
pub mod testing {
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use std::time::Duration;

    /// A fresh eventfd (`flags`: `EFD_NONBLOCK` or 0, the mode a hostile front-end picks).
    pub fn eventfd(flags: libc::c_int) -> File {
        // SAFETY: eventfd has no preconditions.
        let fd = unsafe { libc::eventfd(0, flags) };
        assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd, owned from here on.
        unsafe { File::from_raw_fd(fd) }
    }

    /// The counter, read and reset without blocking (0 when empty).
    pub fn count(file: &File) -> u64 {
        match super::consume(file).expect("eventfd read") {
            super::Consumed::Kicks(n) => n,
            super::Consumed::None => 0,
        }
    }

    /// Fills the counter to its maximum: one more write of 1 would block.
    pub fn fill(file: &File) {
        use std::io::Write;
        (&*file)
            .write_all(&(u64::MAX - 1).to_ne_bytes())
            .expect("fill eventfd");
    }

    /// `f()`, run on its own thread; panics if it has not returned within 10 s (a call that
    /// blocks fails the test instead of hanging it).
    pub fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(f());
        });
        result
            .recv_timeout(Duration::from_secs(10))
            .expect("returned within 10 s")
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{count, eventfd, fill, within_10s};
    use super::*;

    #[test]
    fn a_kick_adds_one() {
        let fd = eventfd(0);
        Kicker::new().unwrap().kick(&fd, KICK_TIMEOUT).unwrap();
        assert_eq!(count(&fd), 1);
    }

    #[test]
    fn a_full_blocking_eventfd_costs_the_timeout_not_the_thread() {
        // Blocking mode (the front-end cleared O_NONBLOCK) and a full counter: a plain write
        // would block until a read that never comes.
        let fd = eventfd(0);
        fill(&fd);
        let kicked = fd.try_clone().unwrap();
        let mut kicker = Kicker::new().unwrap();
        let gave_up = within_10s(move || kicker.kick(&kicked, Duration::from_millis(20)).is_err());
        assert!(gave_up, "no room: the kick is given up");
        assert_eq!(count(&fd), u64::MAX - 1, "nothing added");
    }

    #[test]
    fn consuming_an_empty_blocking_eventfd_does_not_block() {
        use std::io::Write;
        let mut fd = eventfd(0);
        let reader = fd.try_clone().unwrap();
        assert_eq!(
            within_10s(move || consume(&reader).unwrap()),
            Consumed::None
        );
        fd.write_all(&3u64.to_ne_bytes()).unwrap();
        assert_eq!(consume(&fd).unwrap(), Consumed::Kicks(3));
        assert_eq!(consume(&fd).unwrap(), Consumed::None, "read and reset");
    }

    #[test]
    fn without_a_ring_only_a_non_blocking_fd_is_kicked() {
        let fd = eventfd(libc::EFD_NONBLOCK);
        kick_without_ring(&fd).unwrap();
        assert_eq!(count(&fd), 1);
        // Made blocking by its owner: not written at all (a full counter would block).
        let blocking = eventfd(0);
        assert!(matches!(
            kick_without_ring(&blocking),
            Err(KickError::Write(libc::EWOULDBLOCK))
        ));
        assert_eq!(count(&blocking), 0);
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
        let fd = eventfd(0);
        for _ in 0..3 {
            kicker.kick(&fd, KICK_TIMEOUT).unwrap();
        }
        assert_eq!(count(&fd), 3);
    }
}
