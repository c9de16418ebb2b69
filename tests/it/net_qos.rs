//! NIC rate limits through the real vhost-user protocol: a tx limit holds the guest's frames
//! back without dropping any; an rx limit at a switch port drops what the port cannot take and
//! counts it; an rx limit on a tap leaves frames in the tap (nothing lost) and releases them at
//! the configured rate; a QoS group holds disks and NICs together; limits change live. Rates are
//! checked to ±10% of what the bucket allows (plus the unthrottled time of the same work);
//! `scripts/qos-accuracy-net.sh` measures them precisely.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::assert_rate;
use crate::common::control::Control;
use crate::common::daemon::Daemon;
use crate::common::net::{ethernet, NetClient};
use crate::common::netns::NetNs;

const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0a];
const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0b];

fn pair(extra_a: &str) -> Daemon {
    Daemon::start(&[
        "--net",
        &format!("socket={{dir}}/a.sock,switch=s,mac=52:54:00:00:00:0a{extra_a}"),
        "--net",
        "socket={dir}/b.sock,switch=s,mac=52:54:00:00:00:0b",
    ])
}

fn totals(ctl: &mut Control, id: &str) -> serde_json::Value {
    ctl.call("device.stats", json!({"id": id})).unwrap()["total"].clone()
}

#[test]
fn a_tx_limit_holds_frames_back_without_losing_any() {
    let daemon = pair(",tx-pps=50");
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let mut a = NetClient::connect(&daemon.path("a.sock"), 1, 0);
    let mut b = NetClient::connect(&daemon.path("b.sock"), 1, 0);
    b.post_rx(0, 128, 2048);
    a.post_rx(0, 128, 2048);
    // The same 60 frames the other way, unthrottled: what sending costs without a limit.
    let start = Instant::now();
    for i in 0..60u8 {
        b.send(0, &ethernet(A, B, 0x0800, &[i; 60]));
    }
    let baseline = start.elapsed();
    let start = Instant::now();
    for i in 0..60u8 {
        a.send(0, &ethernet(B, A, 0x0800, &[i; 60]));
    }
    let elapsed = start.elapsed();
    for i in 0..60u8 {
        assert_eq!(
            b.recv(0).frame,
            ethernet(B, A, 0x0800, &[i; 60]),
            "frame {i}"
        );
    }
    // 5 tokens at start (100 ms of room), then 50/s: 1.1 s for the other 55.
    assert_rate(
        "60 frames at 50 pps",
        elapsed,
        Duration::from_millis(1100),
        baseline,
    );
    let a_stats = totals(&mut ctl, "a");
    assert!(a_stats["tx_throttled"].as_u64().unwrap() > 0, "{a_stats}");
    assert_eq!(a_stats["tx_frames"], 60);
    let qos = ctl.call("qos.get", json!({"id": "a"})).unwrap();
    assert_eq!(qos["limits"]["tx-pps"]["per_second"], 50, "{qos}");
    assert!(qos["throttled"].as_u64().unwrap() > 0);

    // Removed live: the next 60 go at once.
    ctl.call("qos.set", json!({"id": "a", "tx-pps": null}))
        .unwrap();
    let start = Instant::now();
    for i in 0..60u8 {
        a.send(0, &ethernet(B, A, 0x0800, &[i; 60]));
    }
    assert!(
        start.elapsed() < Duration::from_millis(800),
        "{:?}",
        start.elapsed()
    );
    // Bad values change nothing.
    assert_eq!(
        ctl.error_kind("qos.set", json!({"id": "a", "tx-pps": 0})),
        "invalid-params"
    );
    assert_eq!(
        ctl.error_kind("qos.set", json!({"id": "a", "iops": 100})),
        "invalid-params"
    );
    assert_eq!(
        ctl.error_kind("qos.set", json!({"id": "a", "tx-ppz": 5})),
        "invalid-params"
    );
    assert_eq!(
        ctl.call("qos.get", json!({"id": "a"})).unwrap()["limits"],
        json!({})
    );
}

#[test]
fn an_rx_limit_at_a_switch_port_drops_and_counts_what_it_cannot_take() {
    let daemon = pair("");
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    ctl.call("qos.set", json!({"id": "b", "rx-pps": 20}))
        .unwrap();
    let mut a = NetClient::connect(&daemon.path("a.sock"), 1, 0);
    let mut b = NetClient::connect(&daemon.path("b.sock"), 1, 0);
    b.post_rx(0, 128, 2048);
    let start = Instant::now();
    for i in 0..100u8 {
        a.send(0, &ethernet(B, A, 0x0800, &[i; 60]));
    }
    let elapsed = start.elapsed();
    let b_stats = totals(&mut ctl, "b");
    let got = b_stats["rx_frames"].as_u64().unwrap();
    let throttled = b_stats["rx_drops"]["throttled"].as_u64().unwrap();
    assert_eq!(got + throttled, 100, "{b_stats}");
    // What the bucket allows in that time: 2 tokens of room plus 20 per second (+10%, and
    // one for the token that may have refilled as the last frame arrived).
    let allowed = 2 + (elapsed.as_secs_f64() * 20.0 * 1.1).ceil() as u64 + 1;
    assert!(
        (2..=allowed).contains(&got),
        "{got} delivered in {elapsed:?} at 20 frames/s (at most {allowed}): {b_stats}"
    );
    for _ in 0..got {
        b.recv(0);
    }
    assert!(!b.rx_pending(0));
}

#[test]
fn a_group_limits_a_nic_and_takes_disks_too() {
    let port = crate::common::control::free_port();
    let daemon = Daemon::start(&[
        "--metrics",
        &port,
        "--blk",
        "socket={dir}/d.sock,path=null,size=1G",
        "--net",
        "socket={dir}/a.sock,switch=s,mac=52:54:00:00:00:0a",
        "--net",
        "socket={dir}/b.sock,switch=s,mac=52:54:00:00:00:0b",
    ]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    ctl.call(
        "qos.group.add",
        json!({"name": "tenant", "tx-pps": 40, "iops": 1000}),
    )
    .unwrap();
    ctl.call("qos.set", json!({"id": "a", "qos-group": "tenant"}))
        .unwrap();
    ctl.call("qos.set", json!({"id": "d", "qos-group": "tenant"}))
        .unwrap();
    let group = &ctl.call("qos.group.list", json!({})).unwrap()[0];
    assert_eq!(group["members"], json!(["a", "d"]), "{group}");
    let mut a = NetClient::connect(&daemon.path("a.sock"), 1, 0);
    let mut b = NetClient::connect(&daemon.path("b.sock"), 1, 0);
    b.post_rx(0, 128, 2048);
    a.post_rx(0, 128, 2048);
    let start = Instant::now();
    for i in 0..40u8 {
        b.send(0, &ethernet(A, B, 0x0800, &[i; 60]));
    }
    let baseline = start.elapsed();
    let start = Instant::now();
    for i in 0..40u8 {
        a.send(0, &ethernet(B, A, 0x0800, &[i; 60]));
    }
    // 4 tokens of room, then 40/s: (40 - 4) / 40 = 0.9 s.
    assert_rate(
        "40 frames at the group's 40 pps",
        start.elapsed(),
        Duration::from_millis(900),
        baseline,
    );
    assert!(totals(&mut ctl, "a")["tx_throttled"].as_u64().unwrap() > 0);
    assert_eq!(
        ctl.error_kind("qos.group.remove", json!({"name": "tenant"})),
        "busy"
    );
}

#[test]
fn an_rx_limit_on_a_tap_releases_frames_at_the_rate_without_loss() {
    let ns = NetNs::new("nc-qostap");
    let daemon = Daemon::start_in_netns(
        &ns.name,
        &[
            "--net",
            "socket={dir}/n.sock,tap=ncqos0,mac=52:54:00:12:34:56,rx-pps=20",
        ],
    );
    ns.ip(&["addr", "add", "10.213.3.1/24", "dev", "ncqos0"]);
    ns.ip(&["link", "set", "ncqos0", "up"]);
    ns.ip(&[
        "neigh",
        "add",
        "10.213.3.2",
        "lladdr",
        "52:54:00:12:34:56",
        "dev",
        "ncqos0",
    ]);
    let mut client = NetClient::connect(&daemon.path("n.sock"), 1, 0);
    client.post_rx(0, 128, 2048);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    // Unthrottled first (the baseline), then at 20 frames/s.
    ctl.call("qos.set", json!({"id": "n", "rx-pps": null}))
        .unwrap();
    let (baseline, _, _) = receive_datagrams(&ns, &mut client);
    ctl.call("qos.set", json!({"id": "n", "rx-pps": 20}))
        .unwrap();
    let (elapsed, frames, _) = receive_datagrams(&ns, &mut client);
    // 2 tokens of room, then 20/s for every frame the tap delivered (the 40 datagrams and
    // whatever else the namespace's stack sent meanwhile, e.g. IPv6 neighbour discovery).
    let ideal = Duration::from_millis(50) * (frames - 2);
    assert_rate("40 datagrams at 20 pps", elapsed, ideal, baseline);
    // A byte limit holds too (a frame's size is known only once read: it is charged after
    // the fact, and the next frame waits for the debt). 40 frames of 74 bytes at 3000 B/s,
    // 300 bytes of room: about a second.
    client.post_rx(0, 96, 2048);
    ctl.call(
        "qos.set",
        json!({"id": "n", "rx-pps": null, "rx-bps": 3000}),
    )
    .unwrap();
    let (elapsed, _, bytes) = receive_datagrams(&ns, &mut client);
    let ideal = Duration::from_secs_f64((bytes - 300) as f64 / 3000.0);
    assert_rate("40 datagrams at 3000 B/s", elapsed, ideal, baseline);
    let (ok, out, err) =
        crate::common::daemon::novactl(&daemon, &["--json", "device", "stats", "n"]);
    assert!(ok, "{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        stats["total"]["rx_throttled"].as_u64().unwrap() > 0,
        "{stats}"
    );
}

/// Sends 40 UDP datagrams at once from the namespace towards the "guest" (nobody answers)
/// and receives them, checking order and loss. Returns the time from the send to the last
/// datagram, how many frames arrived in that time (other frames may come too) and their
/// bytes (Ethernet frames, as QoS counts them).
fn receive_datagrams(ns: &NetNs, client: &mut NetClient) -> (Duration, u32, u64) {
    ns.run_inside(|| {
        let socket = std::net::UdpSocket::bind("10.213.3.1:0").unwrap();
        for i in 0..40u8 {
            socket.send_to(&[i; 32], "10.213.3.2:9").unwrap();
        }
    });
    let start = Instant::now();
    let (mut datagrams, mut frames, mut bytes) = (0u8, 0u32, 0u64);
    while datagrams < 40 {
        let frame = client.recv(0).frame;
        frames += 1;
        bytes += frame.len() as u64;
        // IPv4, UDP (other frames, e.g. IPv6 neighbour discovery, may come too).
        if frame.len() > 34 && frame[12..14] == [0x08, 0x00] && frame[23] == 17 {
            assert_eq!(
                frame[frame.len() - 1],
                datagrams,
                "datagrams out of order or lost"
            );
            datagrams += 1;
        }
    }
    (start.elapsed(), frames, bytes)
}
