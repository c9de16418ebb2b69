//! The sandbox is on by default: every thread of a serving daemon runs with no_new_privs and a
//! seccomp filter, and the queue workers (guest-facing) with a second, narrower one;
//! `--sandbox off` runs without. (That forbidden calls are refused is tested in-process by
//! `sandbox::tests`, on threads of their own; the whole suite runs sandboxed.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common::blk::*;
use crate::common::daemon::Daemon;

fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in status"))
}

#[test]
fn every_thread_is_filtered_and_queue_workers_twice() {
    let daemon = Daemon::start(&[
        "--blk",
        "socket={dir}/d0.sock,path={dir}/d0.img,size=1M,queues=2",
        "--net",
        "socket={dir}/n0.sock,switch=s0",
    ]);
    let options = ConnectOptions {
        queues: 2,
        ..Default::default()
    };
    let mut c = BlkClient::connect_with(&daemon.path("d0.sock"), options);
    // Both queues serve a request, so both worker threads have run.
    c.write(0, 0, &pattern(1, 4096));
    c.write(1, 8, &pattern(2, 4096));
    assert!(c.read(1, 0, 4096) == pattern(1, 4096), "data read back");
    let threads = daemon.thread_status();
    let filters = |status: &str| -> u32 { field(status, "Seccomp_filters:").parse().unwrap() };
    for (name, status) in &threads {
        assert_eq!(field(status, "Seccomp:"), "2", "thread {name} unfiltered");
        assert_eq!(field(status, "NoNewPrivs:"), "1", "thread {name}");
        assert!(filters(status) >= 1, "thread {name}");
    }
    // The two queue workers and the connection's relay: each under the narrow filter too.
    let narrowed = |prefix: &str| {
        let matching: Vec<_> = threads
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .collect();
        assert!(!matching.is_empty(), "no {prefix} thread: {threads:?}");
        for (name, status) in &matching {
            assert!(filters(status) >= 2, "{name} lacks the narrow filter");
        }
        matching.len()
    };
    assert_eq!(narrowed("vring_worker"), 2, "{threads:?}");
    narrowed("relay-");
    drop(c);
}

#[test]
fn sandbox_off_runs_unfiltered() {
    let daemon = Daemon::start(&[
        "--sandbox",
        "off",
        "--blk",
        "socket={dir}/d0.sock,path=null,size=1M",
    ]);
    for (name, status) in daemon.thread_status() {
        assert_eq!(field(&status, "Seccomp:"), "0", "thread {name}");
    }
}

#[test]
fn with_fs_roots_nothing_outside_them_is_reachable() {
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim.img");
    let host_data = pattern(9, 1 << 20);
    std::fs::write(&victim, &host_data).unwrap();
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("root");
    std::fs::create_dir(&root).unwrap();
    // A directory link inside the root pointing out of it (the final component of a path
    // through it is a plain file, so only the roots stop it).
    std::os::unix::fs::symlink(outside.path(), root.join("outdir")).unwrap();
    let root_arg = root.display().to_string();
    let mut daemon = Daemon::start(&[
        "--fs-root",
        &root_arg,
        "--control",
        &format!("{root_arg}/control.sock"),
        "--blk",
        &format!("socket={root_arg}/d0.sock,path={root_arg}/d0.img,size=1M"),
    ]);
    daemon.wait_for_log("files reachable only beneath");
    let mut c = BlkClient::connect(&root.join("d0.sock"));
    c.write(0, 0, &pattern(3, 4096));
    assert!(
        c.read(0, 0, 4096) == pattern(3, 4096),
        "inside the root: served"
    );
    drop(c);
    let add =
        |control: &mut crate::common::control::Control, socket: &std::path::Path, path: &str| {
            control.call(
                "device.add",
                serde_json::json!({
                    "type": "blk",
                    "socket": socket.display().to_string(),
                    "path": path,
                    "size": "1M",
                }),
            )
        };
    let candidates = [
        victim.display().to_string(),
        outside.path().join("new.img").display().to_string(),
        root.join("outdir/victim.img").display().to_string(),
    ];
    let mut control = crate::common::control::Control::connect(&root.join("control.sock"));
    for path in &candidates {
        let refused = add(&mut control, &root.join("x.sock"), path);
        assert!(refused.is_err(), "{path} was reachable: {refused:?}");
    }
    // A socket outside the roots cannot be made either.
    let refused = add(
        &mut control,
        &outside.path().join("x.sock"),
        &format!("{root_arg}/y.img"),
    );
    assert!(refused.is_err(), "a socket outside the roots: {refused:?}");
    assert!(std::fs::read(&victim).unwrap() == host_data);
    assert!(!outside.path().join("new.img").exists());
    assert!(!outside.path().join("x.sock").exists());
    assert_eq!(control.device_count(), 1);
    drop(control);
    drop(daemon);
    // The same requests to a daemon without roots succeed: the refusals above are the roots'.
    let free = Daemon::start(&[]);
    let mut control = crate::common::control::Control::connect(&free.path("control.sock"));
    for (i, path) in candidates.iter().enumerate() {
        let socket = free.path(&format!("x{i}.sock"));
        add(&mut control, &socket, path).unwrap();
        control
            .call("device.remove", serde_json::json!({"id": format!("x{i}")}))
            .unwrap();
    }
}
