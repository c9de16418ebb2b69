//! A small split-virtqueue driver (the guest side), enough to post descriptor chains, including
//! deliberately malformed ones, and collect used entries.

use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// One raw descriptor.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// Guest-side state of one split virtqueue.
pub struct Virtq {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub kick: EventFd,
    pub call: EventFd,
    avail_idx: u16,
    used_idx: u16,
    next_desc: u16,
    /// Publish without kicking ([`Virtq::post_quiet`]).
    quiet: bool,
}

impl Virtq {
    /// A queue of `size` entries with rings laid out from guest address `base`.
    pub fn new(size: u16, base: u64) -> Virtq {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 4095) & !4095;
        Virtq {
            size,
            desc,
            avail,
            used,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
            avail_idx: 0,
            used_idx: 0,
            next_desc: 0,
            quiet: false,
        }
    }

    /// Bytes of guest memory the rings occupy from `base`.
    pub fn footprint(size: u16) -> u64 {
        let avail_end = 16 * u64::from(size) + 6 + 2 * u64::from(size);
        ((avail_end + 4095) & !4095) + 6 + 8 * u64::from(size) + 4096
    }

    /// Zeroes the rings (before handing the queue to the device).
    pub fn reset(&mut self, mem: &GuestMemoryMmap<()>) {
        let len = Self::footprint(self.size) as usize;
        mem.write_slice(&vec![0u8; len], GuestAddress(self.desc))
            .unwrap();
        self.avail_idx = 0;
        self.used_idx = 0;
        self.next_desc = 0;
    }

    /// Writes raw descriptors at consecutive table slots (wrapping), links nothing itself.
    /// Returns the index of the first.
    pub fn write_descs(&mut self, mem: &GuestMemoryMmap<()>, descs: &[Desc]) -> u16 {
        let first = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = (first + i as u16) % self.size;
            let at = self.desc + 16 * u64::from(index);
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
            raw[14..16].copy_from_slice(&d.next.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(at)).unwrap();
        }
        self.next_desc = (first + descs.len() as u16) % self.size;
        first
    }

    /// Posts a chain of `(addr, len, writable)` buffers; returns its head.
    pub fn post(&mut self, mem: &GuestMemoryMmap<()>, buffers: &[(u64, u32, bool)]) -> u16 {
        let first = self.next_desc;
        let descs: Vec<Desc> = buffers
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let last = i + 1 == buffers.len();
                Desc {
                    addr,
                    len,
                    flags: if writable { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT },
                    next: (first + i as u16 + 1) % self.size,
                }
            })
            .collect();
        let head = self.write_descs(mem, &descs);
        self.publish(mem, head);
        head
    }

    /// Like [`Self::post`], without the kick (only a device that polls finds it).
    pub fn post_quiet(&mut self, mem: &GuestMemoryMmap<()>, buffers: &[(u64, u32, bool)]) -> u16 {
        self.quiet = true;
        let head = self.post(mem, buffers);
        self.quiet = false;
        head
    }

    /// Puts `head` in the available ring and kicks (unless posting quietly).
    pub fn publish(&mut self, mem: &GuestMemoryMmap<()>, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        // used_event: ask for an interrupt for the next used entry (EVENT_IDX).
        let used_event = self.avail + 4 + 2 * u64::from(self.size);
        mem.write_obj(self.used_idx, GuestAddress(used_event))
            .unwrap();
        fence(Ordering::SeqCst);
        if !self.quiet {
            self.kick.write(1).unwrap();
        }
    }

    /// Puts `heads` in the available ring with one index update, then kicks (any value: a
    /// hostile driver may publish heads beyond the ring).
    pub fn publish_heads(&mut self, mem: &GuestMemoryMmap<()>, heads: &[u16]) {
        for (i, head) in heads.iter().enumerate() {
            let idx = self.avail_idx.wrapping_add(i as u16);
            let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
            mem.write_obj(*head, GuestAddress(slot)).unwrap();
        }
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(heads.len() as u16);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        self.kick.write(1).unwrap();
    }

    /// Puts `head` in the available ring `times` times with one index update, then kicks
    /// (a hostile driver re-publishing a head).
    pub fn publish_repeated(&mut self, mem: &GuestMemoryMmap<()>, head: u16, times: u16) {
        for i in 0..times {
            let idx = self.avail_idx.wrapping_add(i);
            let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
            mem.write_obj(head, GuestAddress(slot)).unwrap();
        }
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(times);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        self.kick.write(1).unwrap();
    }

    /// Whether the device has used entries we have not collected yet.
    pub fn used_pending(&self, mem: &GuestMemoryMmap<()>) -> bool {
        fence(Ordering::SeqCst);
        let device_idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        device_idx != self.used_idx
    }

    /// Waits until `count` used entries arrive (at most `timeout`); returns `(head, len)`s.
    pub fn wait_used(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        count: usize,
        timeout: Duration,
    ) -> Vec<(u16, u32)> {
        let deadline = std::time::Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < count {
            fence(Ordering::SeqCst);
            let device_idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
            while self.used_idx != device_idx && out.len() < count {
                let at = self.used + 4 + 8 * u64::from(self.used_idx % self.size);
                let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
                out.push((id as u16, len));
                self.used_idx = self.used_idx.wrapping_add(1);
            }
            if out.len() >= count {
                break;
            }
            let used_event = self.avail + 4 + 2 * u64::from(self.size);
            mem.write_obj(self.used_idx, GuestAddress(used_event))
                .unwrap();
            fence(Ordering::SeqCst);
            // Entries the device added before it could see the new used_event came without
            // an interrupt: look again before sleeping (as Linux's virtqueue_enable_cb does).
            let device_idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
            if device_idx != self.used_idx {
                continue;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {count} used entries, got {out:?}"
            );
            wait_fd(&self.call, left);
            let _ = self.call.read();
        }
        out
    }
}

fn wait_fd(fd: &EventFd, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd, count 1.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}
