//! The life of a vhost-user device socket, shared by every device kind: listen (server mode),
//! accept one front-end at a time, build a fresh backend for it, serve until it leaves, repeat
//! until stopped.
//!
//! A front-end going away (guest reboot, QEMU restart) is the normal end of a session: the
//! backend is dropped (its workers finish first) and the device waits for the next front-end
//! without restarting the daemon. [`DeviceRunner::stop`] disconnects the current front-end,
//! stops listening and removes the socket.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::DeviceBackend;
use super::device::Device;
use crate::lock::lock;
use crate::sys::poll::{wait_readable, Readable};
use crate::vring::collect_created;

/// Errors starting a device's socket.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The socket could not be created.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The device thread could not be started.
    #[error("cannot start the device thread")]
    Thread(#[source] std::io::Error),
}

/// The longest a front-end may leave a message half-sent, or our reply unread.
const FRONT_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Wakes the device thread and the connected front-end's handler for shutdown.
struct StopSignal {
    requested: AtomicBool,
    eventfd: EventFd,
    /// The connected front-end: the handler's shutdown and a duplicate of the front-end's
    /// socket (shutting it down wakes the relay even mid-message).
    connection: Mutex<
        Option<(
            vhost_user_backend::ShutdownHandle,
            std::os::unix::net::UnixStream,
        )>,
    >,
}

/// A listening device socket and its thread.
pub struct DeviceRunner {
    id: String,
    socket: PathBuf,
    /// A copy of the listener when it was handed to us (socket activation, `--fd`): its path
    /// is not ours to remove, and the copy goes back to `sys::inherited` at stop.
    inherited: Option<std::os::unix::net::UnixListener>,
    stop: Arc<StopSignal>,
    thread: Option<JoinHandle<()>>,
    /// Our own copy of the listening socket (for a live upgrade's hand-over): open as long as
    /// the runner, whatever happens to the thread's.
    listen_copy: std::os::fd::OwnedFd,
    /// Handed to a successor process (live upgrade): its path is no longer ours to remove.
    handed_over: AtomicBool,
}

impl DeviceRunner {
    /// Listens on `socket` and serves front-ends with fresh backends of `device`;
    /// `connected` tracks whether one is attached.
    pub fn start<D: Device>(
        socket: &Path,
        connected: Arc<AtomicBool>,
        device: Arc<D>,
    ) -> Result<Self, RunnerError> {
        let id = device.id().to_string();
        let id = id.as_str();
        let listen_error = |source| RunnerError::Listen {
            path: socket.to_path_buf(),
            source,
        };
        let inherited = crate::sys::inherited::take(socket);
        let mut kept = None;
        let listener = match inherited {
            Some(listener) => {
                kept = Some(listener.try_clone().map_err(listen_error)?);
                Listener::from(listener)
            }
            None => {
                if let Some(parent) = socket.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(listen_error)?;
                }
                crate::sys::socket::clear_stale(socket).map_err(listen_error)?;
                // Never unlink here: `clear_stale` removed only a dead socket; anything
                // that appeared since makes bind fail rather than be replaced. Bound here
                // rather than by `Listener::new`, whose drop removes the path: whether the
                // path goes at stop is ours to decide (not after a live upgrade's hand-over).
                Listener::from(
                    std::os::unix::net::UnixListener::bind(socket).map_err(listen_error)?,
                )
            }
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| listen_error(std::io::Error::other(e)))?;
        // SAFETY: F_DUPFD_CLOEXEC duplicates the listener's fd, open here; the copy is owned
        // at once.
        let copy = unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&listener),
                libc::F_DUPFD_CLOEXEC,
                3,
            )
        };
        if copy < 0 {
            return Err(listen_error(std::io::Error::last_os_error()));
        }
        // SAFETY: `copy` is a new descriptor nobody else owns.
        let listen_copy =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(copy) };
        let stop = Arc::new(StopSignal {
            requested: AtomicBool::new(false),
            eventfd: EventFd::new(EFD_NONBLOCK).map_err(RunnerError::Thread)?,
            connection: Mutex::new(None),
        });
        let thread = {
            let stop = Arc::clone(&stop);
            let id = id.to_string();
            std::thread::Builder::new()
                .name(format!("dev-{id}"))
                .spawn(move || serve(&id, listener, &stop, &connected, &device))
                .map_err(RunnerError::Thread)?
        };
        Ok(Self {
            id: id.to_string(),
            socket: socket.to_path_buf(),
            inherited: kept,
            stop,
            thread: Some(thread),
            listen_copy,
            handed_over: AtomicBool::new(false),
        })
    }

    /// A copy of the listening socket for a successor process (live upgrade).
    pub fn hand_over(&self) -> std::io::Result<(PathBuf, std::os::fd::OwnedFd)> {
        Ok((self.socket.clone(), self.listen_copy.try_clone()?))
    }

    /// A successor takes over: the socket's path is its now (not removed at stop).
    pub fn keep_socket(&self) {
        self.handed_over.store(true, Ordering::Release);
    }

    /// Disconnects the front-end, stops listening and removes the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.requested.store(true, Ordering::Release);
        if let Err(e) = self.stop.eventfd.write(1) {
            log::warn!("{}: cannot wake device thread: {e}", self.id);
        }
        if let Some((handle, front)) = lock(&self.stop.connection).as_ref() {
            handle.shutdown();
            let _ = front.shutdown(std::net::Shutdown::Both);
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("{}: device thread panicked", self.id);
            }
        }
        match self.inherited.take() {
            Some(listener) => crate::sys::inherited::give_back(&self.socket, listener),
            // A successor process listens on it now.
            None if self.handed_over.load(Ordering::Acquire) => {}
            None => {
                let _ = std::fs::remove_file(&self.socket);
            }
        }
    }
}

impl Drop for DeviceRunner {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

fn serve<D: Device>(
    id: &str,
    mut listener: Listener,
    stop: &StopSignal,
    connected: &AtomicBool,
    device: &Arc<D>,
) {
    loop {
        match wait_readable(listener.as_raw_fd(), stop.eventfd.as_raw_fd()) {
            Ok(Readable::First) => {}
            Ok(Readable::Second) => break,
            Err(e) => {
                log::error!("{id}: waiting for a front-end failed: {e}");
                break;
            }
        }
        if stop.requested.load(Ordering::Acquire) {
            break;
        }
        if let Err(e) = serve_connection(id, &mut listener, stop, connected, device) {
            log::error!("{id}: connection ended with an error: {e}");
        }
    }
    log::info!("{id}: stopped");
}

/// A listener on a fresh abstract socket and a stream already connected to it.
///
/// The name carries 128 random bits: abstract sockets have no permissions, so a process in
/// our network namespace that guessed the name could connect between our bind and our own
/// connect and be accepted by the handler as the front-end (a predictable pid/counter name
/// allowed exactly that).
fn private_pair(id: &str) -> std::io::Result<(Listener, std::os::unix::net::UnixStream)> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
    let random = crate::sys::random::bytes::<16>()?;
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let name = format!("novacron-{id}-{hex}");
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    let stream = UnixStream::connect_addr(&addr)?;
    Ok((Listener::from(listener), stream))
}

fn serve_connection<D: Device>(
    id: &str,
    listener: &mut Listener,
    stop: &StopSignal,
    connected: &AtomicBool,
    device: &Arc<D>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let memory = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
    let backend = Arc::new(DeviceBackend::new(Arc::clone(device), memory.clone())?);
    backend.set_this();
    let (daemon, vrings) =
        collect_created(|| VhostUserDaemon::new(id.to_string(), Arc::clone(&backend), memory));
    // Declared after `backend`, so dropped before it on every path: the crate's handlers go
    // first, then the backend (which closes the exit fds the crate took).
    let mut daemon = daemon.map_err(|e| format!("{e}"))?;
    backend.vrings_created(&vrings);
    // The vrings hold the front-end's kick and call fds: keep no copy past the session.
    drop(vrings);
    for (index, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        for (thread, fd, event) in backend.listeners() {
            if thread == index {
                handler.register_listener(fd, EventSet::IN, event)?;
            }
        }
    }
    // The front-end talks to our relay; the relay talks to the handler over a private
    // (abstract, per-process) socket. See `relay` for why.
    let Some(front) = listener.accept()? else {
        return Ok(());
    };
    // A front-end that stops halfway through a message, or stops reading our replies, holds
    // the relay for this long at most (the relay only reads after poll says data is there).
    front.set_read_timeout(Some(FRONT_IO_TIMEOUT))?;
    front.set_write_timeout(Some(FRONT_IO_TIMEOUT))?;
    let front_handle = front.try_clone()?;
    let (mut inner, back) = private_pair(id)?;
    daemon.start(&mut inner).map_err(|e| format!("{e}"))?;
    // Accepted: the private listener has done its job.
    drop(inner);
    // The ring the relay kicks inflight devices' queues through (made here: the relay's own
    // filter forbids creating rings).
    let kicker = match backend.device().inflight_slot() {
        Some(_) => crate::sys::kick::Kicker::new()
            .map_err(|e| log::warn!("{id}: no kick ring, queues kicked by plain writes: {e}"))
            .ok(),
        None => None,
    };
    // This connection's share of the daemon's guest-memory budget.
    let mut memory = super::memory_cap::MemoryCap::new(
        super::memory_cap::Pool::daemon(),
        backend.device().memory_max(),
    );
    let relay = {
        let id = id.to_string();
        let backend = Arc::clone(&backend);
        std::thread::Builder::new()
            .name(format!("relay-{id}"))
            .spawn(move || {
                // The relay parses whatever the front-end sends: it runs under the narrow
                // (worker) filter too — it moves messages and fds between two sockets, and
                // creates inflight regions (memfds).
                crate::sandbox::enter_relay();
                let channel = |stream| backend.device().backend_channel(stream);
                let inflight = backend.device().inflight_slot();
                let log = backend.dirty_log();
                let announce = |mac| backend.device().announce(mac);
                let hooks = super::relay::Hooks {
                    inflight,
                    log,
                    announce: &announce,
                    kicker,
                    memory: &mut memory,
                    mapped: backend.tables(),
                };
                let relayed = super::relay::relay(front, back, channel, hooks);
                if let Err(e) = relayed {
                    log::warn!("{id}: vhost-user relay: {e}");
                }
                // Given back to the pool when the mappings are gone (below, after the
                // backend is dropped).
                memory
            })?
    };
    *lock(&stop.connection) = daemon
        .shutdown_handle()
        .map(|handle| (handle, front_handle.try_clone()))
        .and_then(|(handle, front)| front.ok().map(|front| (handle, front)));
    if stop.requested.load(Ordering::Acquire) {
        daemon.request_shutdown();
    }
    log::info!("{id}: front-end connected");
    connected.store(true, Ordering::Release);
    let result = daemon.wait();
    connected.store(false, Ordering::Release);
    *lock(&stop.connection) = None;
    backend.signal_exit();
    // The handler is gone; make sure the relay is too, even if the front-end is mid-message.
    let _ = front_handle.shutdown(std::net::Shutdown::Both);
    // (A relay that panicked gave its share back as it unwound.)
    let memory = relay
        .join()
        .map_err(|_| log::error!("{id}: relay thread panicked"))
        .ok();
    drop(front_handle);
    // Dropping the daemon joins its worker threads; closing the backend then lets the
    // workers release what they hold (engines drain, taps go back to the device), here and
    // now, before the next front-end is accepted (a busy-poll group member may still hold a
    // reference to the backend for the rest of its pass; it finds the backend closed).
    drop(daemon);
    backend.close();
    drop(backend);
    // The connection's mappings are gone with the handler and the backend.
    drop(memory);
    log::info!("{id}: front-end disconnected");
    match result {
        // A front-end going away (guest shutdown, QEMU killed) is the normal end of a session.
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(format!("{e}").into()),
    }
}
