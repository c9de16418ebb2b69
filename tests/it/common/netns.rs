//! Network namespaces a test creates for its taps and peers, removed when dropped. Traffic
//! only ever goes to addresses inside them or to the test guests.

use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A network namespace with the processes the test started in it.
pub struct NetNs {
    pub name: String,
    children: Vec<Child>,
}

impl NetNs {
    /// Creates `{prefix}-{pid}` with its loopback up.
    pub fn new(prefix: &str) -> NetNs {
        let name = format!("{prefix}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run("ip", &["netns", "add", &name]);
        let ns = NetNs {
            name,
            children: Vec::new(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `ip -n NAME args...`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full);
    }

    /// Starts `args` inside the namespace; killed when the namespace is dropped.
    pub fn spawn(&mut self, args: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {args:?}: {e}"));
        self.children.push(child);
    }

    /// Runs `f` on a fresh thread inside the namespace and waits for it.
    pub fn run_inside<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns only changes this (fresh, short-lived) thread's namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns failed");
            f()
        })
        .join()
        .expect("thread inside the namespace")
    }

    /// Waits until something accepts TCP connections on `addr` inside the namespace.
    pub fn wait_tcp(&self, addr: &str) {
        let addr: std::net::SocketAddr = addr.parse().expect("address");
        self.run_inside(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
                assert!(Instant::now() < deadline, "nothing listens on {addr}");
                std::thread::yield_now();
            }
        });
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {program} (required): {e}"));
    assert!(status.success(), "{program} {args:?} failed");
}

/// Writes `size` pseudo-random bytes to `path` (a file for a guest to download); returns its
/// md5.
pub fn random_file(path: &std::path::Path, size: usize) -> String {
    std::fs::write(path, super::blk::pattern(1, size)).expect("write the file");
    md5sum(path)
}

/// md5 of a file, as `md5sum` prints it.
pub fn md5sum(path: &std::path::Path) -> String {
    let out = Command::new("md5sum").arg(path).output().expect("md5sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("md5sum output")
        .to_string()
}
