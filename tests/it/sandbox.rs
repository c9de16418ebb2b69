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

/// CAP_NET_ADMIN (12) and CAP_DAC_OVERRIDE (1), as /proc shows capability sets.
const ROOT_CAPS: &str = "0000000000001002";
/// CAP_NET_ADMIN only.
const USER_CAPS: &str = "0000000000001000";

#[test]
fn a_root_daemon_keeps_only_the_capabilities_it_needs() {
    // Before: the daemon ran with every capability root has (CAP_SYS_ADMIN, CAP_SETUID, ...).
    let daemon = Daemon::start(&["--blk", "socket={dir}/d0.sock,path={dir}/d0.img,size=1M"]);
    let mut c = BlkClient::connect(&daemon.path("d0.sock"));
    c.write(0, 0, &pattern(1, 4096));
    for (name, status) in daemon.thread_status() {
        for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
            assert_eq!(field(&status, set), ROOT_CAPS, "thread {name} {set}");
        }
        assert_eq!(
            field(&status, "CapInh:"),
            "0000000000000000",
            "thread {name}"
        );
        assert_eq!(
            field(&status, "CapAmb:"),
            "0000000000000000",
            "thread {name}"
        );
    }
}

#[test]
fn with_user_the_daemon_runs_unprivileged_and_still_makes_taps() {
    use crate::common::control::Control;
    use crate::common::netns::NetNs;
    const NOBODY: u32 = 65534;
    let ns = NetNs::new("nc-user");
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let daemon = Daemon::start_in_dir_and_netns(
        dir,
        &ns.name,
        &[
            "--user",
            "nobody",
            "--blk",
            "socket={dir}/d0.sock,path={dir}/d0.img,size=1M",
            "--net",
            "socket={dir}/n0.sock,tap=ncuser0",
        ],
    );
    for (name, status) in daemon.thread_status() {
        let uids: Vec<&str> = field(&status, "Uid:").split_whitespace().collect();
        assert_eq!(uids, ["65534"; 4], "thread {name}");
        let gids: Vec<&str> = field(&status, "Gid:").split_whitespace().collect();
        assert_eq!(gids, ["65534"; 4], "thread {name}");
        assert_eq!(field(&status, "Groups:"), "65534", "thread {name}");
        for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
            assert_eq!(field(&status, set), USER_CAPS, "thread {name} {set}");
        }
    }
    // Files it creates are the user's; its disk serves.
    let image = std::fs::metadata(daemon.path("d0.img")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&image), NOBODY);
    let mut c = BlkClient::connect(&daemon.path("d0.sock"));
    c.write(0, 0, &pattern(3, 4096));
    assert_eq!(c.read(0, 0, 4096), pattern(3, 4096));
    // A tap made at run time, with the one capability kept.
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    ctl.call(
        "device.add",
        serde_json::json!({"type": "net", "id": "n1", "socket": daemon.path("n1.sock"), "tap": "ncuser1"}),
    )
    .unwrap();
    ns.ip(&["link", "show", "ncuser1"]);
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
    // Read-only too: an existing file is opened O_PATH, checked, then reopened through
    // /proc/self/fd (read-only inside the roots), and the roots still judge the file itself.
    let refused = control.call(
        "device.add",
        serde_json::json!({
            "type": "blk",
            "socket": root.join("x.sock").display().to_string(),
            "path": victim.display().to_string(),
            "readonly": true,
        }),
    );
    let refused = format!("{refused:?}");
    assert!(
        refused.contains("Permission denied"),
        "read-only outside the roots: {refused}"
    );
    // An existing file inside the roots opens that way.
    std::fs::write(root.join("e.img"), pattern(4, 1 << 20)).unwrap();
    let socket = root.join("e.sock");
    let e = socket.display().to_string();
    control
        .call(
            "device.add",
            serde_json::json!({"type": "blk", "socket": e, "path": format!("{root_arg}/e.img")}),
        )
        .unwrap();
    let mut c = BlkClient::connect(&socket);
    assert!(c.read(0, 0, 4096) == pattern(4, 1 << 20)[..4096], "served");
    drop(c);
    control
        .call(
            "device.remove",
            serde_json::json!({"id": "e", "force": true}),
        )
        .unwrap();
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

#[test]
fn a_daemon_started_with_a_bounded_capability_set_still_starts() {
    // systemd's CapabilityBoundingSet leaves no CAP_SETPCAP: the daemon must not try to drop
    // from the bounding set what is already gone (that needs CAP_SETPCAP even so).
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new("setpriv")
        .args([
            "--bounding-set=-all,+net_admin,+dac_override",
            "--inh-caps=-all",
            env!("CARGO_BIN_EXE_novacrond"),
            "--control",
        ])
        .arg(dir.path().join("c.sock"))
        .arg("--blk")
        .arg(format!(
            "socket={},path=null,size=1M",
            dir.path().join("d.sock").display()
        ))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux) is required");
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        let ready = line.contains("novacrond ready");
        seen.push(line);
        if ready {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.last().is_some_and(|l| l.contains("novacrond ready")),
        "the daemon did not start: {seen:#?}"
    );
}
