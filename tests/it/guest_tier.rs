//! A real guest (Debian kernel, virtio_blk, QEMU TCG) on a tiered disk: it writes patterned
//! data and a filesystem, the test demotes every extent to the compressed cold tier, and a
//! second boot finds the filesystem and its files intact (every read served from cold
//! records, or promoted by the guest's own writes).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use serde_json::json;

use crate::common::control::Control;
use crate::common::daemon::Daemon;
use crate::common::guest::{boot, vhost_user_blk};

#[test]
fn a_guest_filesystem_survives_demotion_to_the_cold_tier() {
    let mut daemon = Daemon::start(&[
        "--blk",
        "socket={dir}/vda.sock,tier-hot={dir}/vda.hot,tier-cold={dir}/vda.cold,size=64M,\
         extent=1M,queues=2,serial=NOVA-tier",
    ]);
    let devices = vhost_user_blk("vda", &daemon.path("vda.sock"), 2);
    let first = boot("blk-data", &devices);
    first.assert_passed();
    assert!(first.console.contains("filesystem ok"));
    daemon.wait_for_log("front-end disconnected");

    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let tally = ctl
        .call(
            "tier.demote",
            json!({"id": "vda", "all": true, "wait": true}),
        )
        .unwrap();
    assert_eq!(tally["failed"], 0, "{tally}");
    assert!(tally["moved"].as_u64().unwrap() >= 8, "{tally}");
    let status = ctl.call("tier.status", json!({"id": "vda"})).unwrap();
    eprintln!("after demotion: {status}");
    assert!(status["cold-extents"].as_u64().unwrap() >= 8, "{status}");

    let second = boot("blk-remount", &devices);
    second.assert_passed();
    assert!(second.console.contains("guest-remount ok"));
    let status = ctl.call("tier.status", json!({"id": "vda"})).unwrap();
    eprintln!("after the second boot: {status}");
    assert!(status["cold-reads"].as_u64().unwrap() > 0, "{status}");
    assert_eq!(status["corrupt-records"], 0);
}
