//! What a host installs: the package layout (`scripts/package.sh`, and a `.deb` built from
//! it), QEMU's vhost-user backend descriptors checked against the interop spec's schema and
//! against what the installed entry points answer to `--print-capabilities`, the backend
//! program conventions (`--fd`, `--socket-path`, `--type`, the name of the entry point), and
//! the systemd template unit's own command line started the way systemd would start it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::common::blk::*;
use crate::common::control::Control;
use crate::common::daemon::Daemon;

/// `scripts/package.sh` into a fresh root from the test build's binaries; with a `.deb`.
fn install() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let deb = dir.path().join("novacron.deb");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_novacrond")).parent().unwrap();
    let lib_dir = crate::common::ffi::build_libnovacron().join("debug");
    let status = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/package.sh"))
        .arg("--root")
        .arg(&root)
        .arg("--bin-dir")
        .arg(bin_dir)
        .arg("--lib-dir")
        .arg(&lib_dir)
        .arg("--deb")
        .arg(&deb)
        .arg("--fast")
        .status()
        .expect("run scripts/package.sh");
    assert!(status.success(), "package.sh failed");
    let listing = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for path in [
        "./usr/bin/novacrond",
        "./usr/lib/x86_64-linux-gnu/libnovacron.so",
        "./usr/libexec/novacron/vhost-user-blk",
        "./usr/share/qemu/vhost-user/50-novacrond-vhost-user-blk.json",
        "./usr/share/qemu/vhost-user/50-novacrond-vhost-user-net.json",
        "./lib/systemd/system/novacrond@.service",
        "./usr/share/novacron/prometheus/novacron-rules.yml",
    ] {
        assert!(
            listing.contains(path),
            "{path} missing from the .deb:\n{listing}"
        );
    }
    (dir, root)
}

/// The device types QEMU's docs/interop/vhost-user.json allows (`VHostUserBackendType`).
const SPEC_TYPES: [&str; 15] = [
    "9p",
    "balloon",
    "block",
    "caif",
    "console",
    "crypto",
    "gpu",
    "input",
    "net",
    "rng",
    "rpmsg",
    "rproc-serial",
    "scsi",
    "vsock",
    "fs",
];

#[test]
fn qemu_backend_descriptors_follow_the_spec_and_match_their_binaries() {
    let (_dir, root) = install();
    let descriptors = root.join("usr/share/qemu/vhost-user");
    let mut types = Vec::new();
    for entry in std::fs::read_dir(&descriptors).unwrap() {
        let path = entry.unwrap().path();
        let d: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let d = d.as_object().expect("a descriptor is a JSON object");
        // `VhostUserBackend`: description, type, binary mandatory; tags optional; no others.
        for key in d.keys() {
            assert!(
                ["description", "type", "binary", "tags"].contains(&key.as_str()),
                "{}: unknown member {key}",
                path.display()
            );
        }
        assert!(d["description"].is_string());
        let kind = d["type"].as_str().unwrap();
        assert!(SPEC_TYPES.contains(&kind), "type {kind} not in the spec");
        let binary = d["binary"].as_str().unwrap();
        assert!(binary.starts_with('/'), "binary must be an absolute path");
        if let Some(tags) = d.get("tags") {
            assert!(tags.as_array().unwrap().iter().all(Value::is_string));
        }
        // The installed entry point answers --print-capabilities for that type.
        let installed = root.join(binary.trim_start_matches('/'));
        let out = Command::new(&installed)
            .arg("--print-capabilities")
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", installed.display()));
        assert!(out.status.success());
        let caps: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(caps["type"], kind, "{}", installed.display());
        let allowed: &[&str] = match kind {
            "block" => &["read-only", "blk-file"],
            _ => &[],
        };
        for feature in caps["features"].as_array().into_iter().flatten() {
            assert!(allowed.contains(&feature.as_str().unwrap()), "{feature}");
        }
        types.push(kind.to_string());
    }
    types.sort();
    assert_eq!(types, ["block", "net"]);
}

#[test]
fn the_backend_conventions_serve_block_on_an_fd_and_net_on_a_socket_path() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let socket = dir.path().join("blk.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let daemon = Daemon::start_with_fds(
        dir,
        &[
            "--fd",
            "3",
            "--blk-file",
            "{dir}/disk.img",
            "--read-only",
            "--net",
            "socket={dir}/other.sock,switch=s0",
        ],
        &[],
        &[(listener.as_raw_fd(), 3)],
        false,
    );
    let mut c = BlkClient::connect(&socket);
    assert_eq!(c.capacity_sectors(), 2048);
    assert_eq!(c.read(0, 0, 512), vec![0u8; 512]);
    drop(c);
    drop(daemon);
    // --type net with --socket-path and --switch: a net device on that socket.
    let daemon = Daemon::start(&[
        "--type",
        "net",
        "--socket-path",
        "{dir}/net.sock",
        "--switch",
        "s0",
        "--mac",
        "52:54:00:12:34:56",
    ]);
    let mut control = Control::connect(&daemon.path("control.sock"));
    let list = control.call("device.list", serde_json::json!({})).unwrap();
    let device = &list.as_array().unwrap()[0];
    assert_eq!(device["type"], "net", "{list}");
    assert_eq!(device["mac"], "52:54:00:12:34:56", "{list}");
    // Missing pieces are refused with a reason.
    let out = Command::new(env!("CARGO_BIN_EXE_novacrond"))
        .args(["--type", "net", "--socket-path", "/nonexistent/x.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tap IFNAME or --switch NAME"));
    drop(listener);
}

/// `KEY=value` lines of a unit's `[Service]` section.
fn service_keys(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn the_instance_unit_starts_the_daemon_as_systemd_would() {
    let (dir, root) = install();
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/novacrond@.service")).unwrap();
    let keys = service_keys(&unit);
    let get = |k: &str| {
        keys.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{k}= missing"))
    };
    assert_eq!(get("Type"), "notify");
    assert_eq!(get("Restart"), "on-failure");
    assert!(get("WatchdogSec").ends_with('s'));
    assert_eq!(get("RuntimeDirectory"), "novacron/%i");
    // ExecStart with %i = vm1 and the example instance file's NOVACROND_ARGS, the host's
    // /run and /var/lib moved under the test directory.
    let conf =
        std::fs::read_to_string(root.join("usr/share/doc/novacron/instance.conf.example")).unwrap();
    let args_line = conf
        .lines()
        .find_map(|l| l.strip_prefix("NOVACROND_ARGS="))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let base = dir.path().display().to_string();
    let expand = |word: &str| {
        word.replace("%i", "vm1")
            .replace("/run/", &format!("{base}/run/"))
            .replace("/var/lib/", &format!("{base}/var/lib/"))
    };
    let exec = get("ExecStart");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/bin/novacrond"));
    let mut argv: Vec<String> = Vec::new();
    for word in words {
        if word == "$NOVACROND_ARGS" {
            argv.extend(args_line.split_whitespace().map(expand));
        } else {
            argv.push(expand(word));
        }
    }
    // What systemd creates before starting the unit.
    std::fs::create_dir_all(dir.path().join("run/novacron/vm1")).unwrap();
    std::fs::create_dir_all(dir.path().join("var/lib/novacron/vm1")).unwrap();
    let notify = dir.path().join("notify.sock");
    let manager = UnixDatagram::bind(&notify).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_novacrond"))
        .args(&argv)
        .env("NOTIFY_SOCKET", &notify)
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = manager
        .recv(&mut buf)
        .expect("READY=1 from the unit's command line");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.contains("READY=1"), "{message}");
    let mut control = Control::connect(&dir.path().join("run/novacron/vm1/control.sock"));
    assert_eq!(control.device_count(), 2, "the example's disk and NIC");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}
