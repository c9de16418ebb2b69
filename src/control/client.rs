//! The one JSON-RPC client of the control socket, used by `novactl`, the C library (`ffi/`)
//! and the tests: one request line out, one response line back, ids checked.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to {} (is novacrond running?)", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    /// An earlier call failed midway; the connection's replies can no longer be matched to
    /// requests (connect again).
    #[error("the connection failed earlier; connect again")]
    Broken,
    /// The daemon hung up without answering.
    #[error("the daemon closed the connection without answering")]
    Closed,
    /// The reply was not a JSON-RPC response to our request.
    #[error("bad reply from the daemon: {0}")]
    Protocol(String),
    /// The daemon refused the request.
    #[error("{message} ({kind})")]
    Server {
        /// The stable error kind (`error.data.kind`).
        kind: String,
        /// The message.
        message: String,
        /// The whole error object.
        error: Value,
    },
}

/// One connection to a daemon's control socket.
pub struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
    /// Set by any failure after a request went out: a late reply would otherwise be taken
    /// for the answer to the next request.
    broken: bool,
}

impl Client {
    /// Connects; `timeout` bounds each read and write (`None`: wait as long as it takes).
    pub fn connect(path: &Path, timeout: Option<Duration>) -> Result<Self, ClientError> {
        let connect = |source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let writer = UnixStream::connect(path).map_err(connect)?;
        writer.set_read_timeout(timeout)?;
        writer.set_write_timeout(timeout)?;
        let reader = BufReader::new(writer.try_clone()?);
        Ok(Self {
            writer,
            reader,
            next_id: 1,
            broken: false,
        })
    }

    /// Sends one raw line and returns the daemon's reply, whatever it is.
    pub fn raw(&mut self, line: &[u8]) -> Result<Value, ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        let reply = self.exchange(line);
        self.broken = reply.is_err();
        reply
    }

    fn exchange(&mut self, line: &[u8]) -> Result<Value, ClientError> {
        let mut out = line.to_vec();
        out.push(b'\n');
        // A daemon that refuses us answers and hangs up: read its answer even if the write
        // failed, and report the write error only when there is none.
        let written = send_all(&self.writer, &out);
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            written?;
            return Err(ClientError::Closed);
        }
        serde_json::from_str(&reply).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Calls `method` with `params`; returns its result.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let reply = self.raw(request.to_string().as_bytes())?;
        // An error the daemon sends before reading our request (an unauthorized peer, say)
        // carries id null, as JSON-RPC allows; anything else must answer our id.
        let reply_id = reply.get("id").unwrap_or(&Value::Null);
        let unread_error = reply_id.is_null() && reply.get("error").is_some();
        if reply_id != &json!(id) && !unread_error {
            self.broken = true;
            return Err(ClientError::Protocol(format!(
                "reply for id {} to request {id}",
                reply_id
            )));
        }
        if let Some(error) = reply.get("error") {
            let text = |v: Option<&Value>, default: &str| {
                v.and_then(Value::as_str).unwrap_or(default).to_string()
            };
            return Err(ClientError::Server {
                kind: text(error.get("data").and_then(|d| d.get("kind")), "error"),
                message: text(error.get("message"), "request refused"),
                error: error.clone(),
            });
        }
        Ok(reply.get("result").cloned().unwrap_or(Value::Null))
    }
}

/// Writes all of `buf` with `MSG_NOSIGNAL`: a daemon that hung up must give us `EPIPE`, not a
/// SIGPIPE that would kill the program using the client (the C library's callers keep
/// SIGPIPE's default action).
fn send_all(stream: &UnixStream, mut buf: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    while !buf.is_empty() {
        // SAFETY: `buf` is a live slice of `buf.len()` readable bytes for the duration of the
        // call; the fd belongs to `stream`, which outlives it.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        match usize::try_from(n) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = buf.get(n..).unwrap_or_default(),
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}
