//! The control socket server: a mio event loop on its own thread, never touching the data
//! path except through the registry lock.
//!
//! Safety limits: the socket is created mode 0600 in a directory we create mode 0700 (an
//! existing directory must be ours, not a symlink, and not group/world-writable); every peer's
//! uid (`SO_PEERCRED`) must be on the allow-list; a request line may be at most
//! [`MAX_LINE`] bytes; idle connections are closed (default [`IDLE_TIMEOUT`]); at most
//! [`MAX_CONNECTIONS`] are served at once (more are told `busy` and closed). Refused peers
//! (uid not allowed, or busy) do not count toward that limit: at most [`MAX_CONNECTIONS`] more
//! of them wait for their answer, each for at most [`REFUSED_TIMEOUT`] (an allowed client
//! refused as busy while that many wait is closed without an answer).

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};

use super::methods;
use super::protocol::{Response, RpcError, SERVER_ERROR};
use crate::registry::Registry;
use crate::sys::peer::{effective_uid, peer_credentials};

/// Longest request line accepted.
pub const MAX_LINE: usize = 1 << 20;
/// Default for [`ControlConfig::idle_timeout`].
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most simultaneous control connections.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a refused peer has, from its connection, to send a request and read the refusal.
pub const REFUSED_TIMEOUT: Duration = Duration::from_secs(5);
/// Replies queued for a client that does not read them, beyond which it is not served.
pub const MAX_OUTPUT: usize = 4 << 20;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONNECTION: usize = 2;

/// Errors setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket's directory is not safe to use.
    #[error("refusing control directory {path}: {reason}")]
    UnsafeDirectory {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A filesystem or socket call failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Control socket settings.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Socket path.
    pub socket: PathBuf,
    /// Uids allowed to connect (the daemon's own uid and root are always allowed).
    pub allow_uids: Vec<u32>,
    /// Connections with no traffic for this long are closed.
    pub idle_timeout: Duration,
}

/// A running control server.
pub struct ControlServer {
    socket: PathBuf,
    /// Handed to us (socket activation): the path is not ours to remove.
    inherited: bool,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Binds the socket and starts serving.
    pub fn start(
        config: ControlConfig,
        registry: Arc<Mutex<Registry>>,
    ) -> Result<Self, ControlError> {
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| ControlError::Io {
                action,
                path,
                source,
            }
        };
        // Socket activation: systemd (or whoever started us) made the socket and owns its
        // path and mode; peers are still checked by uid on every connection.
        let inherited = crate::sys::inherited::take(&config.socket);
        let is_inherited = inherited.is_some();
        let listener = match inherited {
            Some(listener) => {
                listener
                    .set_nonblocking(true)
                    .map_err(io("cannot use inherited", &config.socket))?;
                UnixListener::from_std(listener)
            }
            None => {
                prepare_directory(&config.socket)?;
                crate::sys::socket::clear_stale(&config.socket).map_err(|e| {
                    ControlError::UnsafeDirectory {
                        path: config.socket.clone(),
                        reason: e.to_string(),
                    }
                })?;
                let listener = UnixListener::bind(&config.socket)
                    .map_err(io("cannot bind", &config.socket))?;
                std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o600))
                    .map_err(io("cannot chmod", &config.socket))?;
                listener
            }
        };

        let poll = Poll::new().map_err(io("cannot create poll for", &config.socket))?;
        let waker = Arc::new(
            Waker::new(poll.registry(), WAKER)
                .map_err(io("cannot create waker for", &config.socket))?,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let mut allow = config.allow_uids.clone();
        allow.extend([0, effective_uid()]);
        super::handover::listening(&config.socket, std::os::fd::AsRawFd::as_raw_fd(&listener));
        let mut server = Server {
            poll,
            listener,
            registry,
            allow,
            connections: HashMap::new(),
            next_token: FIRST_CONNECTION,
            stop: Arc::clone(&stop),
            idle_timeout: config.idle_timeout,
            notify: {
                let waker = Arc::clone(&waker);
                Arc::new(move || {
                    let _ = waker.wake();
                })
            },
        };
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || server.run())
            .map_err(io("cannot start thread for", &config.socket))?;
        log::info!("control socket on {}", config.socket.display());
        Ok(Self {
            socket: config.socket,
            inherited: is_inherited,
            stop,
            waker,
            thread: Some(thread),
        })
    }

    /// Stops serving and removes the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        super::handover::stopped();
        if !self.inherited && !super::handover::handed_over() {
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

/// Creates the socket's directory 0700, or checks an existing one is safe.
fn prepare_directory(socket: &Path) -> Result<(), ControlError> {
    let Some(dir) = socket.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    let unsafe_dir = |reason: String| ControlError::UnsafeDirectory {
        path: dir.to_path_buf(),
        reason,
    };
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| ControlError::Io {
                action: "cannot create",
                path: dir.to_path_buf(),
                source,
            }),
        Err(source) => Err(ControlError::Io {
            action: "cannot inspect",
            path: dir.to_path_buf(),
            source,
        }),
        Ok(meta) => {
            if meta.file_type().is_symlink() {
                return Err(unsafe_dir("is a symlink".into()));
            }
            if !meta.is_dir() {
                return Err(unsafe_dir("is not a directory".into()));
            }
            if meta.uid() != effective_uid() {
                return Err(unsafe_dir(format!("owned by uid {}, not us", meta.uid())));
            }
            if meta.mode() & 0o022 != 0 {
                return Err(unsafe_dir("is group- or world-writable".into()));
            }
            Ok(())
        }
    }
}

struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    last_active: Instant,
    /// Close once the output is flushed.
    closing: bool,
    /// Set for peers we will not serve: their first request gets this error, then we close.
    /// With it, when the connection is closed whatever the peer sends meanwhile
    /// ([`REFUSED_TIMEOUT`] after it was accepted).
    refused: Option<(RpcError, Instant)>,
    /// A request answered later (its id and where the answer comes from): the connection's
    /// next requests wait for it, so answers keep their order.
    waiting: Option<(serde_json::Value, methods::Pending)>,
    /// Descriptors to send with the next bytes written (`daemon.handover`'s answer).
    fds_out: Vec<std::os::fd::OwnedFd>,
    /// The peer is root or our own uid (may hand the daemon over).
    trusted: bool,
}

struct Server {
    poll: Poll,
    listener: UnixListener,
    registry: Arc<Mutex<Registry>>,
    allow: Vec<u32>,
    connections: HashMap<Token, Connection>,
    next_token: usize,
    stop: Arc<AtomicBool>,
    idle_timeout: Duration,
    /// Wakes this loop when a deferred answer is ready.
    notify: methods::Notify,
}

impl Server {
    fn run(&mut self) {
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut self.listener, LISTENER, Interest::READABLE)
        {
            log::error!("control: cannot register listener: {e}");
            return;
        }
        let mut events = Events::with_capacity(64);
        while !self.stop.load(Ordering::Acquire) {
            let tick = self
                .idle_timeout
                .clamp(Duration::from_millis(50), Duration::from_secs(1));
            if let Err(e) = self.poll.poll(&mut events, Some(tick)) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                log::error!("control: poll failed: {e}");
                return;
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => self.answer_deferred(),
                    token => self.service(token),
                }
            }
            self.expire_idle();
        }
    }

    fn accept(&mut self) {
        loop {
            let (mut stream, _) = match self.listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("control: accept failed: {e}");
                    return;
                }
            };
            let peer_uid = peer_credentials(&stream).map(|c| c.uid).ok();
            // Root and our own uid may also hand the daemon over (live upgrade).
            let trusted = peer_uid.is_some_and(|uid| uid == 0 || uid == effective_uid());
            let refusal = match peer_credentials(&stream) {
                Ok(cred) if self.allow.contains(&cred.uid) => None,
                Ok(cred) => {
                    log::warn!("control: refused uid {} (pid {})", cred.uid, cred.pid);
                    Some(RpcError::new(
                        SERVER_ERROR,
                        "unauthorized",
                        "uid not allowed",
                    ))
                }
                Err(e) => Some(RpcError::new(
                    SERVER_ERROR,
                    "unauthorized",
                    format!("no peer credentials: {e}"),
                )),
            };
            // Only served connections count toward the limit: peers that are refused (a uid
            // not allowed, or too many already) wait for their answer apart, and cannot keep
            // an allowed client out by holding connections open.
            let refused = self
                .connections
                .values()
                .filter(|c| c.refused.is_some())
                .count();
            let served = self.connections.len().saturating_sub(refused);
            let refusal = refusal.or_else(|| {
                (served >= MAX_CONNECTIONS)
                    .then(|| RpcError::new(SERVER_ERROR, "busy", "too many control connections"))
            });
            if refusal.is_some() && refused >= MAX_CONNECTIONS {
                // Under a flood of refused peers, do not even queue an answer.
                continue;
            }
            let token = Token(self.next_token);
            // Wrapping past usize::MAX would take centuries of connections; skip the reserved
            // tokens if it ever happens.
            self.next_token = self.next_token.checked_add(1).unwrap_or(FIRST_CONNECTION);
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                token,
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::warn!("control: cannot register connection: {e}");
                continue;
            }
            self.connections.insert(
                token,
                Connection {
                    stream,
                    input: Vec::new(),
                    output: Vec::new(),
                    last_active: Instant::now(),
                    closing: false,
                    refused: refusal.map(|error| {
                        (error, {
                            let now = Instant::now();
                            now.checked_add(self.idle_timeout.min(REFUSED_TIMEOUT))
                                .unwrap_or(now)
                        })
                    }),
                    waiting: None,
                    fds_out: Vec::new(),
                    trusted,
                },
            );
        }
    }

    fn service(&mut self, token: Token) {
        let Some(conn) = self.connections.get_mut(&token) else {
            return;
        };
        // Input is read a bounded chunk at a time and served line by line; a client that
        // does not read its replies gets no more served (nor read) until it does, so both
        // buffers stay bounded whatever it sends.
        let mut open = true;
        loop {
            if !deliver_deferred(conn) {
                break;
            }
            if conn.output.len() >= MAX_OUTPUT || conn.closing {
                break;
            }
            let (alive, capped) = read_available(conn);
            open &= alive;
            while conn.output.len() < MAX_OUTPUT {
                let Some(end) = conn.input.iter().position(|&b| b == b'\n') else {
                    break;
                };
                if conn.closing {
                    conn.input.clear();
                    break;
                }
                if end > MAX_LINE {
                    conn.input.truncate(MAX_LINE.saturating_add(1));
                    break;
                }
                let line: Vec<u8> = conn.input.drain(..=end).collect();
                let line = line.strip_suffix(b"\n").unwrap_or(&line);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let response = match &conn.refused {
                    Some((error, _)) => {
                        conn.closing = true;
                        Response::err(serde_json::Value::Null, error.clone())
                    }
                    None => match methods::handle_line(
                        &self.registry,
                        line,
                        &self.notify,
                        conn.trusted && conn.fds_out.is_empty(),
                    ) {
                        methods::Handled::Now(response) => response,
                        methods::Handled::NowWithFds(response, fds) => {
                            conn.fds_out.extend(fds);
                            response
                        }
                        methods::Handled::Later { id, pending } => {
                            conn.waiting = Some((id, pending));
                            break;
                        }
                    },
                };
                conn.output.extend_from_slice(&encode(&response));
            }
            if conn.waiting.is_some() {
                break;
            }
            if conn.input.len() > MAX_LINE && !conn.input.contains(&b'\n') {
                let error = RpcError::new(
                    SERVER_ERROR,
                    "too-large",
                    format!("request line over {MAX_LINE} bytes"),
                );
                conn.output
                    .extend_from_slice(&encode(&Response::err(serde_json::Value::Null, error)));
                conn.input.clear();
                conn.closing = true;
                break;
            }
            if !capped || !open {
                break;
            }
        }
        open &= write_pending(conn);
        if !open || (conn.closing && conn.output.is_empty()) {
            self.close(token);
        }
    }

    /// Serves again every connection whose deferred answer is ready.
    fn answer_deferred(&mut self) {
        let ready: Vec<Token> = self
            .connections
            .iter()
            .filter(|(_, c)| c.waiting.is_some())
            .map(|(t, _)| *t)
            .collect();
        for token in ready {
            self.service(token);
        }
    }

    fn expire_idle(&mut self) {
        // A client waiting for a deferred answer is not idle.
        let now = Instant::now();
        let idle: Vec<Token> = self
            .connections
            .iter()
            .filter(|(_, c)| match c.refused {
                Some((_, deadline)) => now > deadline,
                None => c.waiting.is_none() && c.last_active.elapsed() > self.idle_timeout,
            })
            .map(|(t, _)| *t)
            .collect();
        for token in idle {
            self.close(token);
        }
    }

    fn close(&mut self, token: Token) {
        if let Some(mut conn) = self.connections.remove(&token) {
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
    }
}

/// Reads what is available, up to a line's worth at a time: `(alive, capped)`, alive false
/// when the peer closed or the socket failed, capped true when it stopped at the cap with
/// more perhaps waiting (the caller serves what it has, then reads on).
fn read_available(conn: &mut Connection) -> (bool, bool) {
    let mut buf = [0u8; 8192];
    loop {
        match conn.stream.read(&mut buf) {
            Ok(0) => return (false, false),
            Ok(n) => {
                conn.last_active = Instant::now();
                conn.input
                    .extend_from_slice(buf.get(..n).unwrap_or_default());
                if conn.input.len() > MAX_LINE {
                    return (true, true);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return (true, false),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return (false, false),
        }
    }
}

/// Queues a deferred answer that has arrived; false while the connection still waits for it.
fn deliver_deferred(conn: &mut Connection) -> bool {
    let Some((id, pending)) = &conn.waiting else {
        return true;
    };
    let response = match pending.try_recv() {
        Ok(Ok(result)) => Response::ok(id.clone(), result),
        Ok(Err(error)) => Response::err(id.clone(), error),
        Err(std::sync::mpsc::TryRecvError::Empty) => return false,
        Err(std::sync::mpsc::TryRecvError::Disconnected) => Response::err(
            id.clone(),
            RpcError::new(SERVER_ERROR, "io", "the work ended without an answer"),
        ),
    };
    conn.output.extend_from_slice(&encode(&response));
    conn.waiting = None;
    conn.last_active = Instant::now();
    true
}

/// Writes queued output; false when the socket failed.
fn write_pending(conn: &mut Connection) -> bool {
    if !conn.fds_out.is_empty() && !conn.output.is_empty() {
        use std::os::fd::{AsRawFd, FromRawFd};
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        // The std view of our socket, for SCM_RIGHTS; never closed through it.
        // SAFETY: the fd is the connection's open socket, which `conn` keeps; ManuallyDrop
        // keeps this second owner from closing it.
        let stream = std::mem::ManuallyDrop::new(unsafe {
            std::os::unix::net::UnixStream::from_raw_fd(conn.stream.as_raw_fd())
        });
        let fds: Vec<std::os::fd::RawFd> = conn.fds_out.iter().map(AsRawFd::as_raw_fd).collect();
        match stream.send_with_fds(&[conn.output.as_slice()], &fds) {
            Ok(n) => {
                conn.output.drain(..n);
                conn.fds_out.clear();
            }
            Err(e) if e.errno() == libc::EAGAIN => return true,
            Err(_) => return false,
        }
    }
    while !conn.output.is_empty() {
        match conn.stream.write(&conn.output) {
            Ok(0) => return false,
            Ok(n) => {
                conn.output.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    true
}

fn encode(response: &Response) -> Vec<u8> {
    let mut line = serde_json::to_vec(response).unwrap_or_else(|_| {
        br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":"cannot encode response","data":{"kind":"internal"}}}"#.to_vec()
    });
    line.push(b'\n');
    line
}
