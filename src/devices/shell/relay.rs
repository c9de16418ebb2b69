//! A vhost-user message relay between the front-end and `vhost-user-backend`'s handler, for
//! what that crate gets wrong or lacks.
//!
//! Why this exists: `vhost-user-backend` refuses `VHOST_USER_SET_VRING_ENABLE` until the
//! front-end has acked `VHOST_USER_F_PROTOCOL_FEATURES` with `SET_FEATURES`, and ends the
//! connection when it comes earlier. QEMU's virtio-net sends exactly that: it enables the
//! queue pairs when the guest writes its feature bits (`peer_attach`), which is before the
//! vhost device starts and sends `SET_FEATURES`. The crate's handler is private, so we cannot
//! wrap it per message; we sit between the sockets instead. Early `SET_VRING_ENABLE`s are
//! acknowledged here (if a reply was asked for), remembered, and passed on right after
//! `SET_FEATURES`.
//!
//! Second, QEMU's multi-queue virtio-net runs one vhost device per queue pair over the same
//! connection, and each of them announces the guest's memory with `ADD_MEM_REG` (QEMU 7.2
//! sends `SET_MEM_TABLE` once, but not the slot messages). The crate refuses the second,
//! identical region ("regions intersect") and drops the connection. The relay counts
//! identical regions: the first `ADD_MEM_REG` of a region and the last matching
//! `REM_MEM_REG` pass through, the ones in between are acknowledged here.
//!
//! Third, the backend-request channel (SET_BACKEND_REQ_FD) is passed on and a duplicate is
//! kept for the device: `vhost`'s `Backend` cannot send a config-change message, which a NIC
//! sends when its link goes up or down ([`send_config_change`]).
//!
//! Fourth, inflight tracking: `GET_INFLIGHT_FD` and `SET_INFLIGHT_FD`, which the crate
//! refuses, are answered here for devices that keep an [`InflightSlot`] (see
//! `shell::inflight`); after a `SET_VRING_KICK` on such a device the queue is kicked once (and
//! again when it is enabled), so requests a previous process left in flight are resubmitted
//! even if the guest, waiting for them, never kicks again. Those kicks go through a
//! restricted io_uring with a timeout (`sys::kick`), never a plain write: the front-end owns
//! the eventfd and could make a write block this thread for good.
//!
//! Fifth, guest memory is capped (`shell::memory_cap`): a memory message that would map more
//! than the connection's `mem-max`, or than the daemon's budget leaves, ends the connection
//! before the handler sees it. The relay takes one memory message at a time: it follows each
//! with a `GET_FEATURES` of its own (always answered, in order; the handler only records the
//! features it offers, which every front-end asked for first), reads nothing more from the
//! front-end until that reply comes back, and then settles the connection's share at what is
//! really mapped (`memory_cap::Tables`). The probe's reply is not passed on.
//!
//! Everything else, file descriptors included, passes through unchanged.
//!
//! Only control messages take this path; the data path is shared memory and eventfds.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::inflight::{InflightSlot, GET_INFLIGHT_FD, SET_INFLIGHT_FD};
use super::memory_cap::{region_bytes, table_bytes, MemoryCap, MemoryCapError, Tables};
use crate::ring::dirty::{DirtyLog, LogMap};
use crate::sys::kick::{Kicker, KICK_TIMEOUT};

/// vhost-user header: request, flags, payload size (each a little-endian u32).
const HEADER_LEN: usize = 12;
/// Largest payload the protocol allows (the `vhost` crate's `MAX_MSG_SIZE`).
const MAX_PAYLOAD: usize = 0x1000;
/// Most file descriptors one message carries.
const MAX_FDS: usize = 32;
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const SET_LOG_BASE: u32 = 6;
const RESET_OWNER: u32 = 4;
const SET_VRING_ADDR: u32 = 9;
const RESET_DEVICE: u32 = 34;
const GET_VRING_BASE: u32 = 11;
const SET_LOG_FD: u32 = 7;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_ENABLE: u32 = 18;
const SEND_RARP: u32 = 19;
const SET_BACKEND_REQ_FD: u32 = 21;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;
const VERSION_1: u32 = 0x1;
/// Most queue enables held before SET_FEATURES (two per queue pair of the largest device).
const MAX_EARLY_ENABLES: usize = 256;
/// Most queues whose kick fds the relay keeps (inflight devices).
const MAX_KICKS: usize = 256;
/// Most distinct memory regions tracked (vhost-user's slot limit is far below).
const MAX_REGIONS: usize = 512;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// Errors relaying messages.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A socket failed.
    #[error("relay socket")]
    Io(#[from] std::io::Error),
    /// A message was malformed (size over the protocol limit).
    #[error("malformed vhost-user message (payload of {0} bytes)")]
    Malformed(u32),
    /// A `GET_FEATURES` with a payload, descriptors or flags the handler would not answer
    /// (the relay counts the replies it expects, so it may not pass one on).
    #[error("GET_FEATURES the handler would not answer")]
    UnanswerableGetFeatures,
    /// A request that must carry a file descriptor came without one.
    #[error("vhost-user request {0} without its file descriptor")]
    MissingFd(u32),
    /// The front-end sent more of something than any front-end needs; the connection is
    /// dropped rather than the relay's memory grown.
    #[error("too many {0}")]
    Excess(&'static str),
    /// A message's descriptors failed the checks; the connection is dropped.
    #[error("front-end refused")]
    Refused(#[from] super::checks::CheckError),
    /// An inflight message was refused; the connection is dropped.
    #[error(transparent)]
    Inflight(#[from] super::inflight::InflightError),
    /// A dirty-log message was refused; the connection is dropped.
    #[error(transparent)]
    Log(#[from] crate::ring::dirty::DirtyError),
    /// A memory table maps more than the device or the daemon allows; the connection is
    /// dropped.
    #[error(transparent)]
    Memory(#[from] super::memory_cap::MemoryCapError),
}

/// One message with the descriptors that came with it (closed when dropped).
struct Message {
    header: [u8; HEADER_LEN],
    payload: Vec<u8>,
    files: Vec<File>,
}

impl Message {
    fn field(&self, index: usize) -> u32 {
        let start = index.saturating_mul(4);
        self.header
            .get(start..start.saturating_add(4))
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, u32::from_le_bytes)
    }

    fn request(&self) -> u32 {
        self.field(0)
    }

    fn flags(&self) -> u32 {
        self.field(1)
    }

    /// The payload's little-endian u32 at byte `at`.
    fn field_at(&self, at: usize) -> Option<u32> {
        self.payload
            .get(at..at.saturating_add(4))
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
    }

    fn new(request: u32, flags: u32, payload: Vec<u8>) -> Self {
        let size = u32::try_from(payload.len()).unwrap_or(0);
        let mut header = [0u8; HEADER_LEN];
        for (dst, src) in header.iter_mut().zip(
            request
                .to_le_bytes()
                .into_iter()
                .chain(flags.to_le_bytes())
                .chain(size.to_le_bytes()),
        ) {
            *dst = src;
        }
        Self {
            header,
            payload,
            files: Vec::new(),
        }
    }
}

/// Reads one message; `Ok(None)` at end of stream.
fn read_message(socket: &mut UnixStream) -> Result<Option<Message>, RelayError> {
    let mut header = [0u8; HEADER_LEN];
    let mut fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    }];
    // SAFETY: the single iovec points to `header`, a live local buffer of exactly `iov_len`
    // bytes that nothing else references during the call.
    let (got, fd_count) = unsafe { socket.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    // Own the received descriptors at once so every path closes them.
    let files: Vec<File> = fds
        .iter()
        .take(fd_count)
        // SAFETY: recvmsg just created these descriptors for us; nothing else owns them.
        .map(|fd| unsafe { File::from_raw_fd(*fd) })
        .collect();
    if got == 0 {
        return Ok(None);
    }
    if let Some(rest) = header.get_mut(got..) {
        socket.read_exact(rest)?;
    }
    let mut message = Message {
        header,
        payload: Vec::new(),
        files,
    };
    let size = message.field(2);
    let len = usize::try_from(size).unwrap_or(usize::MAX);
    if len > MAX_PAYLOAD {
        return Err(RelayError::Malformed(size));
    }
    message.payload = vec![0u8; len];
    socket.read_exact(&mut message.payload)?;
    Ok(Some(message))
}

fn write_message(socket: &mut UnixStream, message: &Message) -> Result<(), RelayError> {
    let mut bytes = Vec::with_capacity(HEADER_LEN.saturating_add(message.payload.len()));
    bytes.extend_from_slice(&message.header);
    bytes.extend_from_slice(&message.payload);
    let fds: Vec<RawFd> = message.files.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = if fds.is_empty() {
        socket.write(&bytes)?
    } else {
        socket
            .send_with_fds(&[bytes.as_slice()], &fds)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?
    };
    if let Some(rest) = bytes.get(sent..) {
        socket.write_all(rest)?;
    }
    Ok(())
}

/// A memory region as `ADD_MEM_REG`/`REM_MEM_REG` describe it: guest address, size and the
/// front-end's address (the payload after 8 bytes of padding).
fn region_key(payload: &[u8]) -> Option<[u8; 24]> {
    payload.get(8..32)?.try_into().ok()
}

/// Passes a memory message to the handler and follows it with a GET_FEATURES of our own: its
/// reply, which the handler sends once it is done with everything before, is not passed on.
fn pass_and_probe(back: &mut UnixStream, message: &Message) -> Result<(), RelayError> {
    write_message(back, message)?;
    write_message(back, &Message::new(GET_FEATURES, VERSION_1, Vec::new()))
}

fn ack(front: &mut UnixStream, message: &Message) -> Result<(), RelayError> {
    if message.flags() & FLAG_NEED_REPLY == 0 {
        return Ok(());
    }
    let reply = Message::new(
        message.request(),
        VERSION_1 | FLAG_REPLY,
        0u64.to_le_bytes().to_vec(),
    );
    write_message(front, &reply)
}

/// What the relay needs from the device behind it.
pub struct Hooks<'a> {
    /// The device's inflight slot (disks): the inflight messages are answered here.
    pub inflight: Option<&'a InflightSlot>,
    /// Where the dirty-page log the front-end hands over (`SET_LOG_BASE`) goes.
    pub log: &'a DirtyLog,
    /// Hears `SEND_RARP`'s MAC.
    pub announce: &'a dyn Fn([u8; 6]),
    /// The ring inflight devices' queues are kicked through (none: plain writes).
    pub kicker: Option<Kicker>,
    /// How much guest memory this connection may have mapped (`shell::memory_cap`).
    pub memory: &'a mut MemoryCap,
    /// The memory tables the handler installed (kept by the backend's `update_memory`).
    pub mapped: &'a Tables,
}

/// Relays between `front` (the front-end) and `back` (our handler) until either side closes.
/// When the front-end sets up the backend-request channel (SET_BACKEND_REQ_FD), a duplicate of
/// that socket is handed to `on_backend_channel` (for device-initiated messages such as a
/// config-change notification, which `vhost-user-backend`'s `Backend` cannot send). A device
/// with `inflight` gets the inflight messages answered (its slot is cleared first: the new
/// front-end brings its own region, or none). The dirty-page log the front-end hands over
/// (`SET_LOG_BASE`) goes into `log`; `announce` hears `SEND_RARP`'s MAC. A memory table that
/// would map more than `memory` allows ends the connection before the handler maps it.
pub fn relay(
    mut front: UnixStream,
    mut back: UnixStream,
    mut on_backend_channel: impl FnMut(UnixStream),
    hooks: Hooks<'_>,
) -> Result<(), RelayError> {
    let Hooks {
        inflight,
        log,
        announce,
        mut kicker,
        memory,
        mapped,
    } = hooks;
    if let Some(slot) = inflight {
        slot.clear();
    }
    // Each queue's kick fd (inflight devices), to kick again when the queue is enabled.
    let mut kicks: Vec<Option<File>> = Vec::new();
    let mut features_set = false;
    let mut early_enables: Vec<Vec<u8>> = Vec::new();
    let mut regions: std::collections::HashMap<[u8; 24], u32> = std::collections::HashMap::new();
    // Each running ring's addresses (SET_VRING_ADDR, until its GET_VRING_BASE).
    let mut ring_addrs: std::collections::HashMap<u32, [u8; 24]> = std::collections::HashMap::new();
    // One memory message at a time: a GET_FEATURES probe follows each to the handler, which
    // answers in order, and the front-end is not read until the probe's reply (`probing`)
    // says the handler is done with it; then the connection's share is settled at what the
    // handler has mapped. Replies to the front-end's own GET_FEATURES, still on their way,
    // come first (`front_get_features` of them).
    let mut probing = false;
    let mut front_get_features: u32 = 0;
    let result = loop {
        let mut fds = [
            libc::pollfd {
                // A negative fd is left out of the poll.
                fd: if probing { -1 } else { front.as_raw_fd() },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: back.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfd structs and the count passed matches.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break Err(e.into());
        }
        let [front_poll, back_poll] = fds;
        if front_poll.revents != 0 {
            let Some(message) = read_message(&mut front)? else {
                break Ok(());
            };
            log::trace!(
                "vhost-user request {} flags {:#x} size {} fds {}",
                message.request(),
                message.flags(),
                message.payload.len(),
                message.files.len()
            );
            if let Err(e) =
                super::checks::check(message.request(), &message.payload, &message.files)
            {
                log::warn!("front-end message refused, dropping the connection: {e}");
                break Err(e.into());
            }
            if matches!(
                message.request(),
                SET_MEM_TABLE | ADD_MEM_REG | REM_MEM_REG | RESET_OWNER | RESET_DEVICE
            ) {
                // Ring addresses are translated through the memory table, and a reset
                // forgets them: the next SET_VRING_ADDR is a new start, whatever it says.
                ring_addrs.clear();
            }
            match message.request() {
                SET_VRING_ENABLE if !features_set => {
                    if early_enables.len() >= MAX_EARLY_ENABLES {
                        break Err(RelayError::Excess("SET_VRING_ENABLE before SET_FEATURES"));
                    }
                    ack(&mut front, &message)?;
                    early_enables.push(message.payload);
                }
                SET_BACKEND_REQ_FD => {
                    if let Some(file) = message.files.first() {
                        match file.try_clone() {
                            Ok(copy) => on_backend_channel(UnixStream::from(
                                std::os::fd::OwnedFd::from(copy),
                            )),
                            Err(e) => log::warn!("cannot keep the backend channel: {e}"),
                        }
                    }
                    write_message(&mut back, &message)?;
                }
                GET_FEATURES => {
                    // Counted only as the handler answers it (anything else ends the
                    // connection there too): the probe's reply is told apart by this count.
                    if !message.payload.is_empty()
                        || !message.files.is_empty()
                        || message.flags() & !FLAG_NEED_REPLY != VERSION_1
                    {
                        break Err(RelayError::UnanswerableGetFeatures);
                    }
                    front_get_features = front_get_features.saturating_add(1);
                    write_message(&mut back, &message)?;
                }
                SET_MEM_TABLE => {
                    // A table replaces every region mapped before (slot messages included);
                    // the handler maps it before it drops the old one. Checked as if the
                    // current table were let go (it is, unless requests hold it: then it
                    // counts from the settlement on); the pool takes both meanwhile.
                    let now = mapped.mapped();
                    let reserved = table_bytes(&message.payload)
                        .ok_or(MemoryCapError::Malformed)
                        .and_then(|new| {
                            memory.reserve(
                                now.older.saturating_add(new),
                                now.total().saturating_add(new),
                            )
                        });
                    if let Err(e) = reserved {
                        break Err(e.into());
                    }
                    regions.clear();
                    crate::sys::sigbus::memory_update_coming();
                    pass_and_probe(&mut back, &message)?;
                    probing = true;
                }
                ADD_MEM_REG => {
                    let new =
                        region_key(&message.payload).is_some_and(|k| !regions.contains_key(&k));
                    if new && regions.len() >= MAX_REGIONS {
                        break Err(RelayError::Excess("memory regions"));
                    }
                    if new {
                        let reserved = message
                            .payload
                            .get(8..)
                            .and_then(region_bytes)
                            .and_then(|bytes| mapped.mapped().total().checked_add(bytes))
                            .ok_or(MemoryCapError::Overflow)
                            .and_then(|kept| memory.reserve(kept, kept));
                        if let Err(e) = reserved {
                            break Err(e.into());
                        }
                    }
                    crate::sys::sigbus::memory_update_coming();
                    let count = region_key(&message.payload)
                        .map(|key| regions.entry(key).or_insert(0))
                        .map(|count| {
                            *count = count.saturating_add(1);
                            *count
                        });
                    if count.is_some_and(|c| c > 1) {
                        ack(&mut front, &message)?;
                    } else {
                        pass_and_probe(&mut back, &message)?;
                        probing = true;
                    }
                }
                REM_MEM_REG => {
                    let remaining = region_key(&message.payload).and_then(|key| {
                        let count = regions.get_mut(&key)?;
                        *count = count.saturating_sub(1);
                        let left = *count;
                        if left == 0 {
                            regions.remove(&key);
                        }
                        Some(left)
                    });
                    if remaining.is_some_and(|left| left > 0) {
                        ack(&mut front, &message)?;
                    } else {
                        pass_and_probe(&mut back, &message)?;
                        probing = true;
                    }
                }
                SET_LOG_BASE => {
                    // Answered here (vhost-user-backend would need a bitmap type in every
                    // guest memory access): map it, then acknowledge, always (the front-end
                    // waits for this reply before it starts the migration's first pass).
                    let Some(file) = message.files.into_iter().next() else {
                        break Err(RelayError::MissingFd(SET_LOG_BASE));
                    };
                    log.set_map(LogMap::from_message(&message.payload, file)?);
                    let reply = Message::new(
                        SET_LOG_BASE,
                        VERSION_1 | FLAG_REPLY,
                        0u64.to_le_bytes().to_vec(),
                    );
                    write_message(&mut front, &reply)?;
                }
                SET_VRING_ADDR => {
                    let index = message.field_at(0);
                    let addrs: Option<[u8; 24]> =
                        message.payload.get(8..32).and_then(|b| b.try_into().ok());
                    match (index, addrs) {
                        (Some(index), Some(addrs)) if ring_addrs.get(&index) == Some(&addrs) => {
                            // The same running ring with its log flag changed (a migration
                            // starts or ends). Nothing for us to redo (used rings are logged by
                            // address whatever the flag says), and passing it on would make
                            // vhost-user-backend re-read the used index from guest memory
                            // while a worker publishes: the index would go back and entries
                            // would be overwritten.
                            ack(&mut front, &message)?;
                        }
                        (Some(index), Some(addrs)) => {
                            if ring_addrs.len() < MAX_KICKS || ring_addrs.contains_key(&index) {
                                ring_addrs.insert(index, addrs);
                            }
                            write_message(&mut back, &message)?;
                        }
                        _ => write_message(&mut back, &message)?,
                    }
                }
                GET_VRING_BASE => {
                    if let Some(index) = message.field_at(0) {
                        ring_addrs.remove(&index);
                    }
                    write_message(&mut back, &message)?;
                }
                SEND_RARP => {
                    // The guest's MAC in the first 6 bytes of a u64 (vhost-user-backend
                    // refuses the message): the device announces it after a migration.
                    if let Some(mac) = message
                        .payload
                        .get(..6)
                        .and_then(|b| <[u8; 6]>::try_from(b).ok())
                    {
                        announce(mac);
                    }
                    ack(&mut front, &message)?;
                }
                SET_LOG_FD => {
                    // A notification fd for log changes; nothing here uses it (closed).
                    ack(&mut front, &message)?;
                }
                GET_INFLIGHT_FD if inflight.is_some() => {
                    if let Some(slot) = inflight {
                        let (payload, fd) = slot.get(&message.payload)?;
                        let mut reply =
                            Message::new(GET_INFLIGHT_FD, VERSION_1 | FLAG_REPLY, payload);
                        reply.files.push(fd);
                        write_message(&mut front, &reply)?;
                    }
                }
                SET_INFLIGHT_FD if inflight.is_some() => {
                    if let Some(slot) = inflight {
                        slot.set(&message.payload, message.files.first())?;
                        ack(&mut front, &message)?;
                    }
                }
                SET_VRING_KICK if inflight.is_some_and(|s| s.current().is_some()) => {
                    write_message(&mut back, &message)?;
                    // One kick of our own (and another at SET_VRING_ENABLE): requests left
                    // in flight get resubmitted, and ones published while we were away get
                    // served, even if the guest, waiting for them, never kicks again.
                    if let Some(kick) = message.files.first() {
                        kick_queue(kicker.as_mut(), kick);
                        let index = message
                            .payload
                            .first()
                            .map_or(usize::MAX, |&i| usize::from(i));
                        if index < MAX_KICKS {
                            if kicks.len() <= index {
                                kicks.resize_with(index.saturating_add(1), || None);
                            }
                            if let Some(slot) = kicks.get_mut(index) {
                                *slot = kick.try_clone().ok();
                            }
                        }
                    }
                }
                SET_VRING_ENABLE if !kicks.is_empty() => {
                    write_message(&mut back, &message)?;
                    if let (Some(index), Some(1)) = (message.field_at(0), message.field_at(4)) {
                        let kick = usize::try_from(index).ok().and_then(|i| kicks.get(i));
                        if let Some(Some(kick)) = kick {
                            kick_queue(kicker.as_mut(), kick);
                        }
                    }
                }
                SET_FEATURES => {
                    features_set = true;
                    write_message(&mut back, &message)?;
                    for payload in early_enables.drain(..) {
                        write_message(
                            &mut back,
                            &Message::new(SET_VRING_ENABLE, VERSION_1, payload),
                        )?;
                    }
                }
                _ => write_message(&mut back, &message)?,
            }
        }
        if back_poll.revents != 0 {
            let Some(message) = read_message(&mut back)? else {
                break Ok(());
            };
            log::trace!("vhost-user reply {}", message.request());
            if message.request() == GET_FEATURES {
                if front_get_features == 0 && probing {
                    // The probe's reply: the handler is done with the memory message.
                    probing = false;
                    memory.settle(mapped.mapped().total());
                    continue;
                }
                front_get_features = front_get_features.saturating_sub(1);
            }
            write_message(&mut front, &message)?;
        }
    };
    let _ = front.shutdown(std::net::Shutdown::Both);
    let _ = back.shutdown(std::net::Shutdown::Both);
    result
}

/// Kicks a queue through its front-end's kick eventfd, giving up after [`KICK_TIMEOUT`]: the
/// front-end owns that fd and can make a plain write block for good (`sys::kick`), and this
/// thread must stay free to end the connection.
fn kick_queue(kicker: Option<&mut Kicker>, kick: &File) {
    let kicked = match kicker {
        Some(kicker) => kicker.kick(kick, KICK_TIMEOUT),
        // A host without io_uring: a plain write while the fd is non-blocking (one race left).
        None => crate::sys::kick::kick_without_ring(kick),
    };
    if let Err(e) = kicked {
        log::debug!("queue kick given up: {e}");
    }
}

/// What became of a config-change message.
#[derive(Debug)]
pub enum Sent {
    /// All of it went.
    Whole,
    /// None of it went (the front-end's socket buffer is full, or memory is short): the
    /// channel is still framed.
    Nothing(std::io::Error),
    /// Part of it went, or the connection is gone: drop the channel.
    Broken(std::io::Error),
}

/// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (no reply asked) on a backend channel, in one
/// `send(MSG_DONTWAIT)`: it never blocks, whatever the socket's file flags say (the front-end
/// holds the other end and shares the open file: it can clear `O_NONBLOCK` on it), and never
/// raises SIGPIPE.
pub fn send_config_change(channel: &UnixStream) -> Sent {
    const CONFIG_CHANGE_MSG: u32 = 2;
    let mut header = [0u8; HEADER_LEN];
    for (dst, src) in header.iter_mut().zip(
        CONFIG_CHANGE_MSG
            .to_le_bytes()
            .into_iter()
            .chain(VERSION_1.to_le_bytes()),
    ) {
        *dst = src;
    }
    // SAFETY: the buffer is valid for its length; the fd is the stream's, open while borrowed.
    let sent = unsafe {
        libc::send(
            channel.as_raw_fd(),
            header.as_ptr().cast(),
            header.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    match usize::try_from(sent) {
        Ok(n) if n == header.len() => Sent::Whole,
        Ok(n) => Sent::Broken(std::io::Error::other(format!(
            "sent {n} of {} bytes",
            header.len()
        ))),
        Err(_) => {
            let e = std::io::Error::last_os_error();
            // Only a dead connection loses the channel; nothing was sent otherwise (a full
            // buffer, ENOBUFS/ENOMEM under memory pressure), and its framing is intact.
            match e.raw_os_error() {
                Some(
                    libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN | libc::EBADF | libc::ENOTSOCK,
                ) => Sent::Broken(e),
                _ => Sent::Nothing(e),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
#[path = "relay_tests.rs"]
mod tests;
