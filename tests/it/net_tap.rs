//! A net device on a tap, driven through the real vhost-user protocol, inside a network
//! namespace the test creates: the kernel answers our ARP request through the tap (frames
//! both ways, straight between guest memory and the tap); then the tap is deleted (the link
//! goes down, frames are dropped and counted, the config space and a config-change message on
//! the backend channel say so) and recreated (the device reattaches and frames flow again). Addresses exist only in that namespace.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly by design

use crate::common::daemon::{novactl, Daemon};
use crate::common::net::{ethernet, NetClient};
use crate::common::netns::NetNs;
use vhost::vhost_user::VhostUserFrontend;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const GUEST_IP: [u8; 4] = [10, 213, 1, 2];
const TAP_IP: [u8; 4] = [10, 213, 1, 1];

fn arp_request() -> Vec<u8> {
    let mut arp = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&GUEST_IP);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&TAP_IP);
    ethernet([0xff; 6], GUEST_MAC, 0x0806, &arp)
}

/// Sends an ARP request and waits for the kernel's reply among whatever else arrives.
fn arp_round_trip(client: &mut NetClient) -> Vec<u8> {
    client.post_rx(0, 64, 2048);
    client.send(0, &arp_request());
    for _ in 0..32 {
        let got = client.recv(0);
        let f = &got.frame;
        if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
            return f.clone();
        }
    }
    panic!("no ARP reply among 32 frames");
}

fn tx_drops(daemon: &Daemon) -> serde_json::Value {
    let (ok, out, err) = novactl(daemon, &["--json", "device", "stats", "n0"]);
    assert!(ok, "{err}");
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["total"]["tx_drops"].clone()
}

#[test]
fn frames_cross_the_tap_and_the_port_survives_the_tap_being_deleted() {
    let ns = NetNs::new("nc-tapio");
    let mut daemon = Daemon::start_in_netns(
        &ns.name,
        &[
            "--net",
            "socket={dir}/n0.sock,tap=nctio0,mac=52:54:00:12:34:56",
        ],
    );
    let configure = |ns: &NetNs| {
        ns.ip(&["addr", "add", "10.213.1.1/24", "dev", "nctio0"]);
        ns.ip(&["link", "set", "nctio0", "up"]);
    };
    configure(&ns);
    let mut client = NetClient::connect(&daemon.path("n0.sock"), 1, 0);
    // The backend-request channel, on which the device announces config changes.
    let (mut channel, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    client.vq.frontend.set_backend_request_fd(&theirs).unwrap();
    channel
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    assert_eq!(
        client.vq.config(6, 2),
        vec![1, 0],
        "link up in the config space"
    );
    let reply = arp_round_trip(&mut client);
    assert_eq!(&reply[..6], &GUEST_MAC, "reply addressed to the guest");
    assert_eq!(&reply[28..32], &TAP_IP, "sender is the tap's address");

    ns.ip(&["link", "del", "nctio0"]);
    client.send(0, &arp_request());
    daemon.wait_for_log("tap nctio0: lost");
    let mut message = [0u8; 12];
    std::io::Read::read_exact(&mut channel, &mut message).expect("config-change message");
    assert_eq!(
        &message[..4],
        &2u32.to_le_bytes(),
        "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG"
    );
    assert_eq!(
        client.vq.config(6, 2),
        vec![0, 0],
        "link down in the config space"
    );
    client.send(0, &arp_request());
    let drops = tx_drops(&daemon);
    assert_eq!(
        drops["tap-error"].as_u64().unwrap() + drops["link-down"].as_u64().unwrap(),
        2,
        "{drops}"
    );

    // An administrator recreates the tap: the device finds it and carries on.
    ns.ip(&["tuntap", "add", "dev", "nctio0", "mode", "tap", "vnet_hdr"]);
    daemon.wait_for_log("tap nctio0: back, link up");
    std::io::Read::read_exact(&mut channel, &mut message).expect("config-change message");
    assert_eq!(&message[..4], &2u32.to_le_bytes());
    assert_eq!(client.vq.config(6, 2), vec![1, 0], "link up again");
    configure(&ns);
    let reply = arp_round_trip(&mut client);
    assert_eq!(&reply[28..32], &TAP_IP);
}

/// `ip -n NS addr show dev TAP`, or `None` when the interface does not exist.
fn tap_addresses(ns: &NetNs, tap: &str) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["-n", &ns.name, "addr", "show", "dev", tap])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_tap_the_daemon_made_keeps_its_host_configuration_across_a_kill_9() {
    // Before: the tap went with the daemon's fds, taking its address (and any bridge or
    // firewall setup) with it; the restarted daemon made a bare new one.
    let ns = NetNs::new("nc-persist");
    let args = [
        "--net",
        "socket={dir}/p.sock,tap=ncpers0,mac=52:54:00:12:34:56",
    ];
    let daemon = Daemon::start_in_netns(&ns.name, &args);
    ns.ip(&["addr", "add", "10.213.1.1/24", "dev", "ncpers0"]);
    ns.ip(&["link", "set", "ncpers0", "up"]);
    let dir = daemon.kill();
    let kept = tap_addresses(&ns, "ncpers0").expect("the tap outlives the daemon");
    assert!(kept.contains("10.213.1.1/24"), "{kept}");
    // The restarted daemon attaches to it and frames flow with the old configuration.
    let daemon = Daemon::start_in_dir_and_netns(dir, &ns.name, &args);
    let mut client = NetClient::connect(&daemon.path("p.sock"), 1, 0);
    let reply = arp_round_trip(&mut client);
    assert_eq!(
        &reply[28..32],
        &TAP_IP,
        "the kernel answered from the kept address"
    );
    drop(client);
    // Removed for good: the tap the daemon made goes with the device.
    let (ok, _, err) = novactl(&daemon, &["device", "remove", "p"]);
    assert!(ok, "{err}");
    assert!(
        tap_addresses(&ns, "ncpers0").is_none(),
        "the tap was left behind"
    );
    // A tap the management layer made is only attached to, and stays.
    ns.ip(&[
        "tuntap", "add", "mode", "tap", "name", "ncmgmt0", "vnet_hdr",
    ]);
    let (ok, _, err) = novactl(
        &daemon,
        &[
            "device",
            "add",
            "net",
            &format!(
                "id=m,socket={},tap=ncmgmt0",
                daemon.path("m.sock").display()
            ),
        ],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = novactl(&daemon, &["device", "remove", "m"]);
    assert!(ok, "{err}");
    assert!(
        tap_addresses(&ns, "ncmgmt0").is_some(),
        "the management's tap was removed"
    );
}
