//! Restarts over a state directory: one device that cannot start does not stop the others,
//! is listed as failed with its reason, stays recorded, and starts with `device.retry` once
//! its backing is back.

use serde_json::json;

use crate::common::blk::BlkClient;
use crate::common::control::Control;
use crate::common::daemon::{novactl, Daemon};

#[test]
fn a_device_whose_backing_is_missing_fails_alone_and_can_be_retried() {
    let daemon = Daemon::start(&["--state-dir", "{dir}/state"]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    std::fs::create_dir(daemon.path("disks")).unwrap();
    for (id, path) in [("a", "disks/a.img"), ("b", "b.img")] {
        ctl.call(
            "device.add",
            json!({"type": "blk", "id": id, "socket": daemon.path(&format!("{id}.sock")),
                   "path": daemon.path(path), "size": "1M"}),
        )
        .unwrap();
    }
    drop(ctl);
    let (status, dir) = daemon.terminate();
    assert!(status.success());
    // The disks directory goes away (an unmounted volume, say).
    std::fs::rename(dir.path().join("disks"), dir.path().join("elsewhere")).unwrap();
    let mut daemon = Daemon::start_in(dir, &["--state-dir", "{dir}/state"]);
    daemon.wait_for_log("device a recorded in the state directory failed to start");
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    // b serves; a is listed as failed, with the reason.
    BlkClient::connect(&daemon.path("b.sock")).read(0, 0, 512);
    let a = ctl.call("device.get", json!({"id": "a"})).unwrap();
    assert_eq!(a["type"], "failed", "{a}");
    assert!(a["reason"].as_str().unwrap().contains("a.img"), "{a}");
    assert_eq!(ctl.device_count(), 2);
    // Still recorded (the restart wrote nothing back while replaying).
    let state = std::fs::read_to_string(daemon.path("state/devices.json")).unwrap();
    assert!(
        state.contains("a.img") && state.contains("b.img"),
        "{state}"
    );
    // A retry before the fix fails and keeps it failed; after the fix it starts.
    assert_eq!(
        ctl.call("device.retry", json!({"id": "a"})).unwrap_err()["data"]["kind"],
        "io"
    );
    std::fs::rename(daemon.path("elsewhere"), daemon.path("disks")).unwrap();
    let (ok, _, err) = novactl(&daemon, &["device", "retry", "a"]);
    assert!(ok, "{err}");
    assert_eq!(
        ctl.call("device.get", json!({"id": "a"})).unwrap()["type"],
        "blk"
    );
    BlkClient::connect(&daemon.path("a.sock")).read(0, 0, 512);
}
