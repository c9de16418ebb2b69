//! A front-end that is not ours drives the switch: DPDK's `dpdk-testpmd` with two
//! `virtio_user` ports (DPDK's own virtio driver over vhost-user, anonymous memory, no
//! hugepages) forwarding frames in a loop through two switch ports with two queue pairs each.
//! testpmd polls its rings and asks for no interrupts, and only kicks when the device asks for
//! kicks: a device that ever leaves a ring with kicks off and stops looking at it stops that
//! direction of the loop for good (it once did, after a wake-up that found a ring drained).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::daemon::{novactl, Daemon};

fn stats(daemon: &Daemon, id: &str) -> serde_json::Value {
    let (ok, out, err) = novactl(daemon, &["--json", "device", "stats", id]);
    assert!(ok, "{err}");
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["total"].clone()
}

fn tx_frames(daemon: &Daemon, id: &str) -> u64 {
    stats(daemon, id)["tx_frames"].as_u64().unwrap()
}

/// Kills testpmd when the test ends, however it ends.
struct Testpmd(Child);

impl Drop for Testpmd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn testpmd(daemon: &Daemon, prefix: &str) -> Testpmd {
    let port = |n: u8, name: &str| {
        format!(
            "net_virtio_user{n},path={},queues=2,mac=02:00:00:00:00:0{}",
            daemon.path(&format!("{name}.sock")).display(),
            n + 1
        )
    };
    let child = Command::new("dpdk-testpmd")
        .args([
            "--no-huge",
            "-m",
            "512",
            "--no-pci",
            "--single-file-segments",
        ])
        .arg(format!("--file-prefix={prefix}"))
        .args(["--vdev", &port(0, "a"), "--vdev", &port(1, "b")])
        .args([
            "--",
            "--forward-mode=mac",
            "--eth-peer=0,02:00:00:00:00:02",
            "--eth-peer=1,02:00:00:00:00:01",
            "--rxq=2",
            "--txq=2",
            "--nb-cores=1",
            "--total-num-mbufs=8192",
            "--auto-start",
            "--tx-first",
            "--txpkts=64",
            "--stats-period=3600",
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(daemon.path("testpmd.log")).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("dpdk-testpmd is required (scripts/install-deps.sh installs dpdk-dev)");
    Testpmd(child)
}

/// Waits until both ports have sent `more` frames beyond `from` (the loop runs both ways).
fn both_directions_advance(daemon: &Daemon, from: (u64, u64), more: u64) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = (tx_frames(daemon, "a"), tx_frames(daemon, "b"));
        if now.0 >= from.0 + more && now.1 >= from.1 + more {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "a direction stopped: tx frames a {} -> {}, b {} -> {}; testpmd said:\n{}",
            from.0,
            now.0,
            from.1,
            now.1,
            std::fs::read_to_string(daemon.path("testpmd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100)); // a counter to watch, no event to wait on
    }
}

fn forwards_both_ways(poll: &str, prefix: &str) {
    let daemon = Daemon::start(&[
        "--net",
        &format!("socket={{dir}}/a.sock,switch=s,queues=2,mac=02:00:00:00:00:01,poll={poll}"),
        "--net",
        &format!("socket={{dir}}/b.sock,switch=s,queues=2,mac=02:00:00:00:00:02,poll={poll}"),
    ]);
    let _testpmd = testpmd(&daemon, prefix);
    // Well past testpmd's first bursts, then again: each round is thousands of wake-ups.
    let first = both_directions_advance(&daemon, (0, 0), 100_000);
    let second = both_directions_advance(&daemon, first, 500_000);
    both_directions_advance(&daemon, second, 500_000);
    for id in ["a", "b"] {
        let s = stats(&daemon, id);
        assert_eq!(s["ring_errors"], 0, "{id}: {s}");
        // DPDK's driver takes VIRTIO_F_IN_ORDER (its fast path: tx buffers freed by
        // position, the used entries never read), so the loop above ran in-order.
        let (ok, out, err) = novactl(&daemon, &["--json", "device", "get", id]);
        assert!(ok, "{err}");
        let info: serde_json::Value = serde_json::from_str(&out).unwrap();
        let features = info["features"].as_array().unwrap();
        assert!(features.contains(&"in-order".into()), "{id}: {info}");
    }
}

#[test]
fn dpdk_virtio_user_forwards_through_the_switch_both_ways_with_adaptive_polling() {
    forwards_both_ways("adaptive", "nc-it-adaptive");
}

#[test]
fn dpdk_virtio_user_forwards_through_the_switch_both_ways_with_busy_polling() {
    forwards_both_ways("busy", "nc-it-busy");
}
