//! A minimal JSON-RPC client for the control socket.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use novacron::control::client::{Client, ClientError};
use serde_json::{json, Value};

/// One control connection (over the daemon's own client).
pub struct Control(Client);

impl Control {
    pub fn connect(socket: &Path) -> Control {
        Control(Client::connect(socket, Some(Duration::from_secs(60))).expect("connect"))
    }

    /// Sends a raw line and returns the parsed response.
    pub fn raw(&mut self, line: &[u8]) -> Value {
        self.0.raw(line).expect("a reply")
    }

    /// Calls `method`; returns `Ok(result)` or `Err(error object)`.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        match self.0.call(method, params) {
            Ok(result) => Ok(result),
            Err(ClientError::Server { error, .. }) => Err(error),
            Err(e) => panic!("control call {method}: {e}"),
        }
    }

    /// Calls `method` expecting failure; returns the error's `data.kind`.
    pub fn error_kind(&mut self, method: &str, params: Value) -> String {
        let error = self.call(method, params).expect_err("call succeeded");
        error["data"]["kind"].as_str().unwrap().to_string()
    }

    /// How many devices `device.list` reports.
    pub fn device_count(&mut self) -> usize {
        let list = self.call("device.list", json!({})).unwrap();
        list.as_array().expect("device.list returns an array").len()
    }
}

/// A free loopback port for `--metrics` (released just before the daemon binds it).
pub fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a loopback port")
        .local_addr()
        .expect("local address")
        .port()
        .to_string()
}

/// `GET path` from the metrics endpoint on `port`; the whole HTTP response.
pub fn scrape(port: &str, path: &str) -> String {
    use std::io::Read;
    let port: u16 = port.parse().expect("port");
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}

/// Counter `key` (`rx_bytes`, `tx_bytes`, ...) of NIC `id`, all queue pairs, as `daemon`
/// reports it now.
pub fn nic_bytes(daemon: &super::daemon::Daemon, id: &str, key: &str) -> u64 {
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let stats = ctl.call("device.stats", json!({ "id": id })).unwrap();
    stats["total"][key].as_u64().unwrap_or(0)
}
