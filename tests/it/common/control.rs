//! A minimal JSON-RPC client for the control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::{json, Value};

/// One control connection.
pub struct Control {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
}

impl Control {
    pub fn connect(socket: &Path) -> Control {
        let stream = UnixStream::connect(socket).expect("connect to control socket");
        let reader = BufReader::new(stream.try_clone().unwrap());
        Control {
            stream,
            reader,
            next_id: 1,
        }
    }

    /// Sends a raw line and returns the parsed response.
    pub fn raw(&mut self, line: &[u8]) -> Value {
        self.stream.write_all(line).unwrap();
        self.stream.write_all(b"\n").unwrap();
        let mut reply = String::new();
        self.reader.read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("bad reply {reply:?}: {e}"))
    }

    /// Calls `method`; returns `Ok(result)` or `Err(error object)`.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let reply = self.raw(&serde_json::to_vec(&request).unwrap());
        assert_eq!(reply["id"], json!(id), "response id");
        match reply.get("error") {
            Some(error) => Err(error.clone()),
            None => Ok(reply["result"].clone()),
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
