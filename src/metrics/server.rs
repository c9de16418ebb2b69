//! The `/metrics` HTTP endpoint: one thread, one connection at a time, each bounded in size
//! and time, answering `GET /metrics` with [`super::render`].
//!
//! Why not a general HTTP server crate: the one we used (`tiny_http`) starts a thread per
//! connection with no limit or timeout, so any local client could make the daemon grow
//! threads. A scraper needs one request line and one response; this serves exactly that, and
//! a slow or silent client costs at most [`IO_TIMEOUT`] of the metrics thread in total (one
//! deadline per connection, not per read), never memory or threads, and never the data path.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::registry::Registry;
use crate::sys::poll::{wait_readable, Readable};

/// Longest a client may take, in total, to send its request and read the response.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read (a scraper sends a few hundred bytes).
const MAX_REQUEST: usize = 8 << 10;

/// Errors starting the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address could not be bound.
    #[error("cannot serve metrics on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server thread could not start.
    #[error("cannot start the metrics thread")]
    Thread(#[source] std::io::Error),
}

/// A running metrics endpoint.
pub struct MetricsServer {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Serves `/metrics` on `addr` from `registry`.
    pub fn start(addr: SocketAddr, registry: Arc<Mutex<Registry>>) -> Result<Self, MetricsError> {
        let listener =
            // A live upgrade's previous process may still hold the port (`sys::takeover`).
            crate::sys::takeover::retry_while_busy(
                || TcpListener::bind(addr),
                |e| e.kind() == std::io::ErrorKind::AddrInUse,
            )
            .map_err(|source| MetricsError::Bind { addr, source })?;
        let bound = listener.local_addr().unwrap_or(addr);
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(MetricsError::Thread)?);
        let exposition = super::exposition(registry);
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("metrics".into())
                .spawn(move || serve(&listener, &stop, &exposition))
                .map_err(MetricsError::Thread)?
        };
        log::info!("metrics on http://{bound}/metrics");
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops serving.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Err(e) = self.stop.write(1) {
            log::warn!("metrics: cannot signal stop: {e}");
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

fn serve(
    listener: &TcpListener,
    stop: &EventFd,
    exposition: &prometheus_client::registry::Registry,
) {
    loop {
        match wait_readable(listener.as_raw_fd(), stop.as_raw_fd()) {
            Ok(Readable::First) => {}
            Ok(Readable::Second) => return,
            Err(e) => {
                log::error!("metrics: {e}");
                return;
            }
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = answer(stream, exposition) {
                    log::debug!("metrics: client: {e}");
                }
            }
            Err(e) => log::debug!("metrics: accept: {e}"),
        }
    }
}

/// A connection's whole time budget: every read and write gets what is left of it, so a
/// client trickling bytes cannot hold the endpoint longer than [`IO_TIMEOUT`] in total.
struct Deadline(Instant);

impl Deadline {
    fn remaining(&self) -> std::io::Result<Duration> {
        self.0
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::TimedOut, "client too slow"))
    }
}

/// Reads one request head and answers it; the connection is closed afterwards.
fn answer(
    mut stream: TcpStream,
    exposition: &prometheus_client::registry::Registry,
) -> std::io::Result<()> {
    let now = Instant::now();
    let deadline = Deadline(now.checked_add(IO_TIMEOUT).unwrap_or(now));
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        stream.set_read_timeout(Some(deadline.remaining()?))?;
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if head.len() > MAX_REQUEST {
            return respond(
                &mut stream,
                &deadline,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut words = line.split(|b| *b == b' ');
    let (method, path) = (words.next(), words.next());
    match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => respond(
            &mut stream,
            &deadline,
            "200 OK",
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            &super::render(exposition),
        ),
        (Some(b"GET"), Some(_)) => respond(
            &mut stream,
            &deadline,
            "404 Not Found",
            "text/plain",
            "try /metrics\n",
        ),
        _ => respond(
            &mut stream,
            &deadline,
            "405 Method Not Allowed",
            "text/plain",
            "",
        ),
    }
}

fn respond(
    stream: &mut TcpStream,
    deadline: &Deadline,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    for part in [head.as_bytes(), body.as_bytes()] {
        let mut done = 0usize;
        while let Some(rest) = part.get(done..).filter(|r| !r.is_empty()) {
            stream.set_write_timeout(Some(deadline.remaining()?))?;
            match stream.write(rest)? {
                0 => return Err(std::io::ErrorKind::WriteZero.into()),
                n => done = done.saturating_add(n),
            }
        }
    }
    Ok(())
}
