//! The control plane end to end: JSON-RPC over the control socket and `novactl` against the
//! real daemon; devices added at run time serve I/O like command-line ones, persist across
//! restarts, and every bad request is refused without changing anything.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::process::Command;

use crate::common::blk::{pattern, BlkClient};
use crate::common::control::Control;
use crate::common::daemon::{novactl, Daemon};
use serde_json::json;

fn add_params(daemon: &Daemon, id: &str) -> serde_json::Value {
    json!({
        "type": "blk",
        "id": id,
        "socket": daemon.path(&format!("{id}.sock")),
        "path": daemon.path(&format!("{id}.img")),
        "size": "8M",
        "queues": 2,
        "serial": format!("SER-{id}"),
    })
}

#[test]
fn add_use_stats_and_remove_at_run_time() {
    let daemon = Daemon::start(&[
        "--blk",
        "socket={dir}/boot.sock,path={dir}/boot.img,size=4M",
    ]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let added = ctl.call("device.add", add_params(&daemon, "vdb")).unwrap();
    assert_eq!(added["id"], "vdb");
    assert_eq!(added["queues"], 2);
    assert_eq!(added["size"], 8 << 20);
    assert_eq!(added["persistent"], true);

    // The new device serves a front-end while the command-line one keeps serving too.
    let mut boot = BlkClient::connect(&daemon.path("boot.sock"));
    let mut vdb = BlkClient::connect(&daemon.path("vdb.sock"));
    vdb.write(0, 8, &pattern(1, 8192));
    boot.write(0, 8, &pattern(2, 4096));
    assert_eq!(vdb.read(0, 8, 8192), pattern(1, 8192));
    assert_eq!(
        &vdb.request(0, crate::common::blk::T_GET_ID, 0, &[], 20)
            .data[..7],
        b"SER-vdb"
    );

    let stats = ctl.call("device.stats", json!({"id": "vdb"})).unwrap();
    assert_eq!(stats["total"]["requests"]["write"], 1);
    assert_eq!(stats["total"]["requests"]["read"], 1);
    assert_eq!(stats["total"]["bytes-written"], 8192);
    assert_eq!(stats["queues"].as_array().unwrap().len(), 2);

    let list = ctl.call("device.list", json!({})).unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["boot", "vdb"]);
    assert_eq!(
        ctl.call("device.get", json!({"id": "vdb"})).unwrap()["connected"],
        true
    );

    // Connected: refused without force, nothing changes.
    assert_eq!(
        ctl.error_kind("device.remove", json!({"id": "vdb"})),
        "busy"
    );
    assert_eq!(vdb.read(0, 8, 8192), pattern(1, 8192));
    ctl.call("device.remove", json!({"id": "vdb", "force": true}))
        .unwrap();
    assert!(!daemon.path("vdb.sock").exists(), "socket left behind");
    assert_eq!(
        ctl.error_kind("device.get", json!({"id": "vdb"})),
        "not-found"
    );
    // The other device never noticed.
    assert_eq!(boot.read(0, 8, 4096), pattern(2, 4096));
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    let daemon = Daemon::start(&[
        "--blk",
        "socket={dir}/boot.sock,path={dir}/boot.img,size=4M",
    ]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let kind = |v: serde_json::Value| v["error"]["data"]["kind"].as_str().unwrap().to_string();
    assert_eq!(kind(ctl.raw(b"{not json")), "parse");
    assert_eq!(
        kind(ctl.raw(br#"{"jsonrpc":"2.0","id":1}"#)),
        "invalid-request"
    );
    assert_eq!(
        kind(ctl.raw(br#"{"jsonrpc":"1.0","id":1,"method":"device.list"}"#)),
        "invalid-request"
    );
    assert_eq!(
        ctl.error_kind("device.frobnicate", json!({})),
        "unknown-method"
    );
    assert_eq!(
        ctl.error_kind("device.list", json!({"verbose": true})),
        "invalid-params"
    );
    assert_eq!(ctl.error_kind("device.get", json!({})), "invalid-params");
    assert_eq!(
        ctl.error_kind("device.get", json!({"id": 5})),
        "invalid-params"
    );
    assert_eq!(
        ctl.error_kind("device.remove", json!({"id": "nope"})),
        "not-found"
    );

    let mut params = add_params(&daemon, "vdc");
    for (key, bad) in [
        ("queues", json!(0)),
        ("queues", json!(-1)),
        ("queue-size", json!(100)),
        ("size", json!("12Q")),
        ("serial", json!("x".repeat(21))),
        ("colour", json!("blue")),
        ("engine", json!(null)),
        ("type", json!("gpu")),
    ] {
        let saved = params[key].clone();
        params[key] = bad.clone();
        assert_eq!(
            ctl.error_kind("device.add", params.clone()),
            "invalid-params",
            "{key}={bad}"
        );
        if saved.is_null() {
            params.as_object_mut().unwrap().remove(key);
        } else {
            params[key] = saved;
        }
    }
    // Duplicate id and socket.
    let mut dup = add_params(&daemon, "boot");
    assert_eq!(ctl.error_kind("device.add", dup.clone()), "exists");
    dup["id"] = json!("other");
    dup["socket"] = json!(daemon.path("boot.sock"));
    assert_eq!(ctl.error_kind("device.add", dup), "exists");
    // A backing that cannot be opened.
    let mut missing = add_params(&daemon, "vdd");
    missing["path"] = json!("/nonexistent/dir/x.img");
    assert_eq!(ctl.error_kind("device.add", missing), "io");
    // Nothing was added by any of that.
    assert_eq!(ctl.device_count(), 1);
    assert!(!daemon.path("vdc.sock").exists() && !daemon.path("vdd.sock").exists());

    // An oversized line is refused and the connection closed; others keep working.
    let mut other = Control::connect(&daemon.path("control.sock"));
    let huge = vec![b'x'; (1 << 20) + 10];
    assert_eq!(kind(ctl.raw(&huge)), "too-large");
    assert_eq!(
        other.call("daemon.info", json!({})).unwrap()["name"],
        "novacrond"
    );
}

#[test]
fn devices_persist_across_restarts_and_corrupt_state_is_fatal() {
    let daemon = Daemon::start(&["--state-dir", "{dir}/state"]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    ctl.call("device.add", add_params(&daemon, "vde")).unwrap();
    {
        let mut c = BlkClient::connect(&daemon.path("vde.sock"));
        c.write(0, 0, &pattern(5, 4096));
        assert_eq!(c.flush(0), 0);
    }
    let (status, dir) = daemon.terminate();
    assert!(status.success());
    assert!(dir.path().join("state/devices.json").exists());

    // Same state dir: the device comes back on the same socket with the same data.
    let daemon = Daemon::start_in(dir, &["--state-dir", "{dir}/state"]);
    let mut c = BlkClient::connect(&daemon.path("vde.sock"));
    assert_eq!(c.read(0, 0, 4096), pattern(5, 4096));
    drop(c);
    let mut daemon = daemon;
    daemon.wait_for_log("vde: front-end disconnected");
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    ctl.call("device.remove", json!({"id": "vde"})).unwrap();
    let (_, dir) = daemon.terminate();
    let state = std::fs::read_to_string(dir.path().join("state/devices.json")).unwrap();
    assert!(
        !state.contains("vde"),
        "removed device still recorded: {state}"
    );

    std::fs::write(
        dir.path().join("state/devices.json"),
        b"{\"version\":1,\"devices\":[",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_novacrond"))
        .args(["--control", "none", "--state-dir"])
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "started with a corrupt state file");
    assert!(String::from_utf8_lossy(&out.stderr).contains("corrupt"));
}

#[test]
fn novactl_drives_the_daemon() {
    let daemon = Daemon::start(&[]);
    let spec = format!(
        "socket={},path={},size=4M",
        daemon.path("vdf.sock").display(),
        daemon.path("vdf.img").display()
    );
    let (ok, out, err) = novactl(&daemon, &["device", "add", "blk", &spec, "serial=S1"]);
    assert!(ok, "{err}");
    assert!(out.contains("vdf"), "{out}");
    let (ok, out, _) = novactl(&daemon, &["device", "ls"]);
    assert!(
        ok && out.contains("vdf") && out.contains("CONNECTED"),
        "{out}"
    );
    let (ok, out, _) = novactl(&daemon, &["--json", "device", "get", "vdf"]);
    assert!(ok);
    let value: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(value["serial"], "S1");
    let (ok, out, _) = novactl(&daemon, &["device", "stats", "vdf"]);
    assert!(ok && out.contains("READS"), "{out}");
    let (ok, _, err) = novactl(&daemon, &["device", "rm", "nope"]);
    assert!(!ok && err.contains("not-found"), "{err}");
    let (ok, out, _) = novactl(&daemon, &["info"]);
    assert!(ok && out.contains("novacrond"), "{out}");
    let (ok, _, _) = novactl(&daemon, &["device", "rm", "vdf"]);
    assert!(ok);
    let (ok, _, _) = novactl(&daemon, &["shutdown"]);
    assert!(ok);
    let (status, _) = daemon.wait_exit();
    assert!(status.success());
}

/// The limit on served connections holds (the next allowed client is told `busy` until one
/// closes), and a stranger's connections (refused: uid not allowed) do not count toward it:
/// however many it holds open, an allowed client is served.
#[test]
fn refused_peers_do_not_count_toward_the_connection_limit() {
    use novacron::control::server::MAX_CONNECTIONS;
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    let daemon = Daemon::start(&[]);
    let socket = daemon.path("control.sock");
    // Allowed clients holding every served connection: the next one is told busy.
    let held: Vec<_> = (0..MAX_CONNECTIONS)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
        .collect();
    let (ok, _, err) = novactl(&daemon, &["info"]);
    assert!(!ok && err.contains("busy"), "{err}");
    // They close: served again (once the server has seen the closes).
    drop(held);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (ok, _, err) = novactl(&daemon, &["info"]);
        if ok {
            break;
        }
        assert!(err.contains("busy"), "{err}");
        assert!(std::time::Instant::now() < deadline, "still busy: {err}");
    }
    // Reachable by a stranger (as if an admin had loosened it); the uid check refuses it.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The stranger opens twice the limit and holds them, sending nothing, until its stdin
    // closes.
    const HOLD: &str = "import socket, sys\n\
        held = []\n\
        for _ in range(int(sys.argv[2])):\n\
        \x20   s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); held.append(s)\n\
        print('ready', flush=True)\n\
        sys.stdin.read()\n";
    let mut stranger = Command::new("setpriv")
        // The system's python3 (a user's, e.g. under /root, is not the stranger's to run).
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["/usr/bin/python3", "-c", HOLD])
        .arg(&socket)
        .arg((2 * MAX_CONNECTIONS).to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux) and /usr/bin/python3 are required");
    let mut ready = String::new();
    std::io::BufReader::new(stranger.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");
    // Queued behind the stranger's connections, an allowed client is served.
    let (ok, _, err) = novactl(&daemon, &["info"]);
    assert!(ok, "an allowed client was kept out by refused peers: {err}");
    drop(stranger.stdin.take());
    stranger.wait().unwrap();
}

#[test]
fn control_socket_is_private_and_checks_peer_uid() {
    let daemon = Daemon::start(&[]);
    let socket = daemon.path("control.sock");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Simulate an admin loosening permissions: the uid check still refuses strangers.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_novactl"))
        .arg("--control")
        .arg(&socket)
        .arg("info")
        .output()
        .expect("setpriv (util-linux) is required");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unauthorized"), "{err}");
    // A symlinked control directory is refused at start-up.
    let real = tempfile::tempdir().unwrap();
    let link = daemon.path("link");
    std::os::unix::fs::symlink(real.path(), &link).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_novacrond"))
        .arg("--control")
        .arg(link.join("control.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("symlink"));
}

#[test]
fn metrics_endpoint_reports_per_queue_counters() {
    let port_arg = crate::common::control::free_port();
    let daemon = Daemon::start(&[
        "--metrics",
        &port_arg,
        "--blk",
        "socket={dir}/m.sock,path={dir}/m.img,size=4M,queues=2",
    ]);
    let mut c = BlkClient::connect(&daemon.path("m.sock"));
    c.write(0, 0, &pattern(1, 4096));
    c.read(0, 0, 4096);
    let h = c.header(crate::common::blk::T_IN, u64::MAX / 1024);
    let s = c.alloc(1);
    let data = c.alloc(512);
    c.roundtrip(0, &[(h, 16, false), (data, 512, true), (s, 1, true)]);

    let response = crate::common::control::scrape(&port_arg, "/metrics");
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    for line in [
        "novacron_blk_connected{device=\"m\"} 1",
        "novacron_blk_requests_total{device=\"m\",queue=\"0\",op=\"write\"} 1",
        "novacron_blk_requests_total{device=\"m\",queue=\"0\",op=\"read\"} 1",
        "novacron_blk_bytes_total{device=\"m\",queue=\"0\",direction=\"write\"} 4096",
        "novacron_blk_rejected_total{device=\"m\",queue=\"0\",reason=\"out-of-range\"} 1",
        "novacron_blk_requests_total{device=\"m\",queue=\"1\",op=\"read\"} 0",
        "novacron_blk_request_latency_seconds_count{device=\"m\",queue=\"0\"} 2",
        "# TYPE novacron_blk_request_latency_seconds histogram",
    ] {
        assert!(response.contains(line), "missing `{line}` in:\n{response}");
    }
    assert!(crate::common::control::scrape(&port_arg, "/other").contains(" 404"));
}

#[test]
fn hot_add_and_remove_do_not_disturb_a_device_serving_io() {
    let daemon = Daemon::start(&[
        "--blk",
        "socket={dir}/busy.sock,path={dir}/busy.img,size=8M",
    ]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let socket = daemon.path("busy.sock");
    let worker = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut c = BlkClient::connect(&socket);
            let mut rounds = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let sector = (rounds % 256) * 8;
                c.write(0, sector, &pattern(rounds, 4096));
                assert_eq!(c.read(0, sector, 4096), pattern(rounds, 4096));
                rounds += 1;
            }
            rounds
        })
    };
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    for i in 0..6 {
        let id = format!("hot{i}");
        ctl.call("device.add", add_params(&daemon, &id)).unwrap();
        let mut c = BlkClient::connect(&daemon.path(&format!("{id}.sock")));
        c.write(0, 0, &pattern(i, 4096));
        ctl.call("device.remove", json!({"id": id, "force": true}))
            .unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    let rounds = worker
        .join()
        .expect("I/O on the busy device failed during hot add/remove");
    assert!(rounds > 0);
}

#[test]
fn idle_control_connections_are_closed() {
    use std::io::Read;
    let daemon = Daemon::start(&["--control-idle-timeout", "0.3"]);
    let mut idle = std::os::unix::net::UnixStream::connect(daemon.path("control.sock")).unwrap();
    idle.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    // The server's close is the signal: read returns 0 (EOF), not a timeout error.
    assert_eq!(idle.read(&mut buf).unwrap(), 0);
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    // An active client is still served.
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    assert_eq!(
        ctl.call("daemon.info", json!({})).unwrap()["name"],
        "novacrond"
    );
}

#[test]
fn only_root_or_the_daemons_uid_may_hand_the_daemon_over() {
    // Before: any allowed uid could call daemon.handover and receive every device's listening
    // socket (and accept another tenant's reconnecting front-end), or name any pid as the
    // service's successor.
    let daemon = Daemon::start(&[
        "--control-allow-uid",
        "65534",
        "--blk",
        "socket={dir}/h.sock,path=null,size=1M",
    ]);
    let socket = daemon.path("control.sock");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |request: &str| {
        let script = format!(
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); \
             s.sendall(b'{request}\\n'); print(s.recv(4096).decode())"
        );
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
            ])
            .arg(&script)
            .arg(&socket)
            .output()
            .expect("setpriv and python3 are required");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let info = as_nobody(r#"{"jsonrpc":"2.0","id":1,"method":"daemon.info"}"#);
    assert!(
        info.contains("novacrond"),
        "an allowed uid is served: {info}"
    );
    for request in [
        r#"{"jsonrpc":"2.0","id":1,"method":"daemon.handover"}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"daemon.shutdown","params":{"successor":1}}"#,
    ] {
        let answer = as_nobody(request);
        assert!(answer.contains("unauthorized"), "{request}: {answer}");
    }
    // Still running, socket still there.
    let (ok, _, err) = novactl(&daemon, &["info"]);
    assert!(ok, "{err}");
    assert!(daemon.path("h.sock").exists());
}

#[test]
fn a_file_disk_grows_through_the_control_socket_and_keeps_its_size_across_a_restart() {
    let args = ["--state-dir", "{dir}/state"];
    let daemon = Daemon::start(&args);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    ctl.call("device.add", add_params(&daemon, "g")).unwrap();
    // Shrinking, a size that is not whole blocks and a disk given size= on the command line
    // are refused.
    assert_eq!(
        ctl.error_kind("device.resize", json!({"id": "g", "size": "4M"})),
        "invalid-params"
    );
    assert_eq!(
        ctl.error_kind("device.resize", json!({"id": "g", "size": 12_000_001})),
        "invalid-params"
    );
    let grown = ctl
        .call("device.resize", json!({"id": "g", "size": "12M"}))
        .unwrap();
    assert_eq!(grown["size"], 12 << 20, "{grown}");
    let image = daemon.path("g.img");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 12 << 20);
    drop(ctl);
    let (_, dir) = daemon.terminate();
    // The recorded size= followed: the restarted daemon opens the grown image.
    let daemon = Daemon::start_in(dir, &args);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let info = ctl.call("device.get", json!({"id": "g"})).unwrap();
    assert_eq!(info["size"], 12 << 20, "{info}");
    drop(ctl);
    let cli = Daemon::start(&["--blk", "socket={dir}/c.sock,path={dir}/c.img,size=4M"]);
    let (ok, _, err) = novactl(&cli, &["device", "resize", "c", "8M"]);
    assert!(!ok && err.contains("command line"), "{err}");
}
