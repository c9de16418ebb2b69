//! Running under systemd, with the test playing systemd's side: the notify protocol (READY,
//! STATUS, repeated WATCHDOG pings when a watchdog interval is set — their spacing is not
//! timed here —, STOPPING; SIGHUP logged and answered, not fatal) and socket activation (a
//! device socket and the control socket handed over as fds 3 and 4, served, re-served after
//! the device is removed and added again, and left in place at exit: they belong to the
//! manager).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::time::{Duration, Instant};

use crate::common::blk::*;
use crate::common::control::Control;
use crate::common::daemon::Daemon;

/// Receives notify datagrams until one contains `line` (10 s at most); returns all seen.
fn until(socket: &UnixDatagram, line: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = message.lines().any(|l| l == line);
            seen.push(message);
            if hit {
                return;
            }
        }
    }
    panic!("no `{line}` from the daemon in 10 s; got {seen:?}");
}

#[test]
fn the_daemon_tells_systemd_it_is_ready_alive_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let manager = UnixDatagram::bind(&notify_path).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut daemon = Daemon::start_in_with_env(
        dir,
        &["--blk", "socket={dir}/d0.sock,path=null,size=1M"],
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            // 300 ms: pings every 150 ms.
            ("WATCHDOG_USEC", "300000"),
        ],
    );
    let mut seen = Vec::new();
    until(&manager, "READY=1", &mut seen);
    assert!(
        seen.iter()
            .any(|m| m.contains("STATUS=serving 1 device(s)")),
        "{seen:?}"
    );
    let pings_before = seen.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    until(&manager, "WATCHDOG=1", &mut seen);
    until(&manager, "WATCHDOG=1", &mut seen);
    assert!(seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= pings_before + 2);
    // SIGHUP reloads nothing and ends nothing: the daemon says so and keeps pinging.
    daemon.signal(libc::SIGHUP);
    daemon.wait_for_log("SIGHUP: nothing to reload");
    until(&manager, "WATCHDOG=1", &mut seen);
    let mut c = BlkClient::connect(&daemon.path("d0.sock"));
    assert_eq!(
        c.read(0, 0, 512),
        vec![0u8; 512],
        "still serving after SIGHUP"
    );
    drop(c);
    let (status, _) = daemon.terminate();
    assert!(status.success());
    until(&manager, "STOPPING=1", &mut seen);
}

#[test]
fn sockets_from_socket_activation_are_served_and_left_to_the_manager() {
    let dir = tempfile::tempdir().unwrap();
    let device_path = dir.path().join("activated.sock");
    let control_path = dir.path().join("control.sock");
    let device = UnixListener::bind(&device_path).unwrap();
    let control = UnixListener::bind(&control_path).unwrap();
    let mut daemon = Daemon::start_with_fds(
        dir,
        &[
            "--blk",
            "socket={dir}/activated.sock,path={dir}/d.img,size=1M",
            "--control",
            "{dir}/control.sock",
        ],
        &[("LISTEN_FDS", "2"), ("LISTEN_FDNAMES", "blk:control")],
        &[(device.as_raw_fd(), 3), (control.as_raw_fd(), 4)],
        true,
    );
    daemon.wait_for_log("2 socket(s) from socket activation");
    let mut c = BlkClient::connect(&device_path);
    let data = pattern(7, 4096);
    c.write(0, 8, &data);
    assert_eq!(c.read(0, 8, 4096), data);
    drop(c);
    daemon.wait_for_log("activated: front-end disconnected");
    let mut control_client = Control::connect(&control_path);
    assert_eq!(control_client.device_count(), 1);
    // Removed and added again on the same path: the inherited socket is served again (the
    // manager still listens on its copy, so binding the path anew would fail).
    let id = device_path
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    control_client
        .call("device.remove", serde_json::json!({"id": id}))
        .unwrap();
    control_client
        .call(
            "device.add",
            serde_json::json!({
                "type": "blk",
                "socket": device_path.display().to_string(),
                "path": "null",
                "size": "1M",
            }),
        )
        .unwrap();
    let mut c = BlkClient::connect(&device_path);
    assert_eq!(c.read(0, 0, 512), vec![0u8; 512]);
    drop(c);
    drop(control_client);
    let (status, dir) = daemon.terminate();
    assert!(status.success());
    // The manager's sockets stay where they are (systemd keeps listening on them).
    assert!(dir.path().join("activated.sock").exists());
    assert!(dir.path().join("control.sock").exists());
    drop((device, control));
}
