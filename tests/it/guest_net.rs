//! Real Linux guests (Debian kernel, virtio_net driver, QEMU under TCG) on novacrond's
//! virtio-net: one on a tap whose far end sits in a namespace the test created (two queue
//! pairs), and two guests on one in-daemon switch. Each pings, downloads a 4 MiB file over
//! HTTP (md5 compared with the source) and uploads one (md5 checked by the receiver).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common::daemon::{novactl, Daemon};
use crate::common::guest::{boot_with, vhost_user_net};
use crate::common::netns::NetNs;

const SIZE: usize = 4 << 20;

/// A 4 MiB file of pseudo-random bytes; returns its md5.
fn blob(path: &std::path::Path) -> String {
    crate::common::netns::random_file(path, SIZE)
}

fn stats(daemon: &Daemon, id: &str) -> serde_json::Value {
    let (ok, out, err) = novactl(daemon, &["--json", "device", "stats", id]);
    assert!(ok, "novactl failed: {err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn guest_on_a_tap_reaches_a_peer_in_a_namespace() {
    let mut ns = NetNs::new("nc-guest-tap");
    let daemon = Daemon::start_in_netns(
        &ns.name,
        &[
            "--net",
            "socket={dir}/n0.sock,tap=ncgtap0,mac=52:54:00:12:34:56,queues=2",
        ],
    );
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "ncgtap0"]);
    ns.ip(&["link", "set", "ncgtap0", "up"]);
    let www = daemon.path("www");
    std::fs::create_dir(&www).unwrap();
    let want = blob(&www.join("blob"));
    let www = www.display().to_string();
    ns.spawn(&["busybox", "httpd", "-f", "-p", "8080", "-h", &www]);
    ns.spawn(&["busybox", "nc", "-ll", "-p", "9000", "-e", "md5sum"]);
    ns.wait_tcp("10.77.0.1:8080");
    ns.wait_tcp("10.77.0.1:9000");

    let devices = vhost_user_net("n0", &daemon.path("n0.sock"), 2, "52:54:00:12:34:56");
    let run = boot_with(
        "net-peer",
        &devices,
        &format!("novaip=10.77.0.2 novapeer=10.77.0.1 novasize={SIZE}"),
    );
    run.assert_passed();
    assert!(
        run.console.contains("queues=2"),
        "guest did not get 2 queue pairs"
    );
    assert!(run.console.contains("mac=52:54:00:12:34:56"));
    assert!(run.console.contains("ping ok"));
    assert!(
        run.console.contains(&format!("download md5={want}")),
        "download corrupted"
    );
    let stats = stats(&daemon, "n0");
    let total = &stats["total"];
    assert!(
        total["rx_bytes"].as_u64().unwrap() >= SIZE as u64,
        "{stats}"
    );
    assert!(
        total["tx_bytes"].as_u64().unwrap() >= SIZE as u64,
        "{stats}"
    );
    eprintln!("tap guest run took {:?}; stats {stats}", run.elapsed);
}

#[test]
fn two_guests_on_one_switch_ping_and_transfer() {
    let daemon = Daemon::start(&[
        "--net",
        "socket={dir}/a.sock,switch=t7,mac=52:54:00:00:00:0a",
        "--net",
        "socket={dir}/b.sock,switch=t7,mac=52:54:00:00:00:0b",
    ]);
    let server = vhost_user_net("a", &daemon.path("a.sock"), 1, "52:54:00:00:00:0a");
    let client = vhost_user_net("b", &daemon.path("b.sock"), 1, "52:54:00:00:00:0b");
    let server = std::thread::spawn(move || {
        boot_with(
            "net-switch",
            &server,
            &format!("novarole=server novaip=10.78.0.1 novasize={SIZE}"),
        )
    });
    let client = boot_with(
        "net-switch",
        &client,
        &format!("novarole=client novaip=10.78.0.2 novapeer=10.78.0.1 novasize={SIZE}"),
    );
    let server = server.join().unwrap();
    client.assert_downloaded_from(&server, "switch transfer");
    assert!(client.console.contains("ping ok"));
    let a = stats(&daemon, "a");
    let b = stats(&daemon, "b");
    assert!(
        a["total"]["tx_bytes"].as_u64().unwrap() >= SIZE as u64,
        "{a}"
    );
    assert!(
        b["total"]["rx_bytes"].as_u64().unwrap() >= SIZE as u64,
        "{b}"
    );
    assert_eq!(a["total"]["tx_drops"]["spoofed"], 0, "{a}");
}
