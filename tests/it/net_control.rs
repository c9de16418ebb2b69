//! Net devices and switches through the control socket and `novactl`: adding and removing,
//! refusals that change nothing, counters in `device.stats`, `switch.ports` and `/metrics`,
//! persistence across restarts, and a switch uplink on a tap in a test namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use serde_json::json;

use crate::common::control::Control;
use crate::common::daemon::{novactl, Daemon};
use crate::common::net::{ethernet, NetClient};
use crate::common::netns::NetNs;

const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0a];
const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0b];

fn port_params(daemon: &Daemon, id: &str, mac: &str) -> serde_json::Value {
    json!({
        "type": "net",
        "id": id,
        "socket": daemon.path(&format!("{id}.sock")).display().to_string(),
        "switch": "t7",
        "mac": mac,
    })
}

#[test]
fn net_devices_and_switches_are_managed_counted_and_persisted() {
    let port = crate::common::control::free_port();
    let daemon = Daemon::start(&["--state-dir", "{dir}/state", "--metrics", &port]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let added = ctl.call("switch.add", json!({"name": "t7"})).unwrap();
    assert_eq!(added["ports"], 0);
    assert_eq!(
        ctl.error_kind("switch.add", json!({"name": "t7"})),
        "exists"
    );
    assert_eq!(
        ctl.error_kind("switch.add", json!({"name": "bad/name"})),
        "invalid-params"
    );
    assert_eq!(
        ctl.error_kind("switch.add", json!({"name": "t8", "colour": "red"})),
        "invalid-params"
    );
    let a = ctl
        .call("device.add", port_params(&daemon, "a", "52:54:00:00:00:0a"))
        .unwrap();
    assert_eq!(a["type"], "net");
    assert_eq!(a["mac"], "52:54:00:00:00:0a");
    ctl.call("device.add", port_params(&daemon, "b", "52:54:00:00:00:0b"))
        .unwrap();
    // Bad net options: a clear error, nothing added.
    let mut both = port_params(&daemon, "c", "52:54:00:00:00:0c");
    both["tap"] = json!("nctap9");
    assert_eq!(ctl.error_kind("device.add", both), "invalid-params");
    assert_eq!(
        ctl.error_kind("device.add", port_params(&daemon, "c", "01:00:5e:00:00:01")),
        "invalid-params"
    );
    assert_eq!(ctl.device_count(), 2);
    assert_eq!(
        ctl.error_kind("switch.remove", json!({"name": "t7"})),
        "busy"
    );
    assert_eq!(
        ctl.call("qos.get", json!({"id": "a"})).unwrap()["limits"],
        json!({})
    );

    let mut ca = NetClient::connect(&daemon.path("a.sock"), 1, 0);
    let mut cb = NetClient::connect(&daemon.path("b.sock"), 1, 0);
    cb.post_rx(0, 8, 2048);
    let frame = ethernet(B, A, 0x0800, &[9u8; 500]);
    ca.send(0, &frame);
    assert_eq!(cb.recv(0).frame, frame);

    let (ok, table, err) = novactl(&daemon, &["switch", "ports", "t7"]);
    assert!(ok, "{err}");
    assert!(table.contains("1 a") && table.contains("2 b"), "{table}");
    let (ok, table, err) = novactl(&daemon, &["switch", "ls"]);
    assert!(ok, "{err}");
    assert!(table.contains("t7"), "{table}");
    let (ok, table, _) = novactl(&daemon, &["device", "stats", "b"]);
    assert!(ok && table.contains("514"), "{table}");
    let metrics = crate::common::control::scrape(&port, "/metrics");
    for line in [
        "novacron_net_connected{device=\"a\"} 1",
        "novacron_net_frames_total{device=\"a\",direction=\"tx\"} 1",
        "novacron_net_bytes_total{device=\"b\",direction=\"rx\"} 514",
        "novacron_switch_ports{switch=\"t7\"} 2",
        "novacron_switch_frames_total{switch=\"t7\",direction=\"in\"} 1",
        "novacron_switch_learnt_macs{switch=\"t7\"} 1",
    ] {
        assert!(metrics.contains(line), "missing `{line}` in:\n{metrics}");
    }
    drop((ca, cb));

    // A restart brings back the switch and both ports.
    let (status, dir) = daemon.terminate();
    assert!(status.success());
    let mut daemon = Daemon::start_in(dir, &["--state-dir", "{dir}/state"]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let switches = ctl.call("switch.list", json!({})).unwrap();
    assert_eq!(switches[0]["name"], "t7");
    assert_eq!(switches[0]["persistent"], true);
    assert_eq!(switches[0]["ports"], 2);
    let mut ca = NetClient::connect(&daemon.path("a.sock"), 1, 0);
    let mut cb = NetClient::connect(&daemon.path("b.sock"), 1, 0);
    cb.post_rx(0, 8, 2048);
    ca.send(0, &frame);
    assert_eq!(cb.recv(0).frame, frame);
    drop((ca, cb));
    daemon.wait_for_log("b: front-end disconnected");
    for id in ["a", "b"] {
        ctl.call("device.remove", json!({"id": id, "force": true}))
            .unwrap();
    }
    ctl.call("switch.remove", json!({"name": "t7"})).unwrap();
    assert_eq!(ctl.call("switch.list", json!({})).unwrap(), json!([]));
}

#[test]
fn a_switch_uplink_tap_carries_frames_to_the_host_and_back() {
    let ns = NetNs::new("nc-uplink");
    let daemon = Daemon::start_in_netns(&ns.name, &[]);
    let (ok, _, err) = novactl(&daemon, &["switch", "add", "up7", "--uplink", "tap=ncup0"]);
    assert!(ok, "{err}");
    ns.ip(&["addr", "add", "10.213.2.1/24", "dev", "ncup0"]);
    ns.ip(&["link", "set", "ncup0", "up"]);
    let socket = daemon.path("p.sock").display().to_string();
    let (ok, _, err) = novactl(
        &daemon,
        &[
            "device",
            "add",
            "net",
            &format!("socket={socket},switch=up7,mac=52:54:00:00:00:0a"),
        ],
    );
    assert!(ok, "{err}");
    let mut client = NetClient::connect(&daemon.path("p.sock"), 1, 0);
    client.post_rx(0, 64, 2048);
    let mut arp = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
    arp.extend_from_slice(&A);
    arp.extend_from_slice(&[10, 213, 2, 2]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[10, 213, 2, 1]);
    client.send(0, &ethernet([0xff; 6], A, 0x0806, &arp));
    let reply = (0..32)
        .map(|_| client.recv(0).frame)
        .find(|f| f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2])
        .expect("ARP reply through the uplink");
    assert_eq!(&reply[..6], &A);
    assert_eq!(&reply[28..32], &[10, 213, 2, 1]);
    let (ok, out, err) = novactl(&daemon, &["--json", "switch", "ports", "up7"]);
    assert!(ok, "{err}");
    let ports: serde_json::Value = serde_json::from_str(&out).unwrap();
    let uplink = ports
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == "uplink")
        .unwrap();
    assert_eq!(uplink["connected"], true);
    assert!(
        uplink["stats"]["rx_frames"].as_u64().unwrap() >= 1,
        "{uplink}"
    );
    assert!(
        uplink["stats"]["tx_frames"].as_u64().unwrap() >= 1,
        "{uplink}"
    );
}
