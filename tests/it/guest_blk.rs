//! A real Linux guest (Debian kernel, virtio_blk driver, QEMU under TCG) uses novacrond:
//! patterned writes checked after dropping caches, discard, a filesystem, and a second boot
//! (new front-end on the same daemon) that finds the filesystem intact. Once per engine.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common::daemon::Daemon;
use crate::common::guest::{boot, vhost_user_blk};

/// The guest's data test on disk `disk` (`path=...` options of a 64 MiB disk, id `vda`, two
/// queues, serial `serial`), then a reboot that finds its filesystem; returns the daemon.
pub(crate) fn guest_round_trip_on(disk: &str, serial: &str) -> Daemon {
    let spec = format!("socket={{dir}}/vda.sock,{disk},queues=2,serial={serial}");
    let mut daemon = Daemon::start(&["--blk", &spec]);
    let devices = vhost_user_blk("vda", &daemon.path("vda.sock"), 2);

    let first = boot("blk-data", &devices);
    first.assert_passed();
    for marker in [
        format!("serial={serial}"),
        "queues=2".to_string(),
        "size-sectors=131072".to_string(),
        "small-writes ok".to_string(),
        "discard ok".to_string(),
        "filesystem ok".to_string(),
        "guest-data ok".to_string(),
    ] {
        assert!(first.console.contains(&marker), "missing `{marker}`");
    }
    daemon.wait_for_log("front-end disconnected");

    let second = boot("blk-remount", &devices);
    second.assert_passed();
    assert!(second.console.contains("guest-remount ok"));
    eprintln!(
        "guest boots took {:?} and {:?}",
        first.elapsed, second.elapsed
    );
    daemon
}

fn guest_round_trip(engine: &str) {
    guest_round_trip_on(
        &format!("path={{dir}}/vda.img,size=64M,engine={engine}"),
        &format!("NOVA-{engine}"),
    );
}

#[test]
fn guest_uses_disk_across_reboot_uring() {
    guest_round_trip("uring");
}

#[test]
fn guest_uses_disk_across_reboot_sync() {
    guest_round_trip("sync");
}

#[test]
fn guest_uses_a_4k_direct_io_disk() {
    // O_DIRECT backing and 4096-byte logical blocks: the guest must see 4 KiB sectors and its
    // (page-aligned) buffers go to the file without the host page cache.
    let mut daemon = Daemon::start(&[
        "--blk",
        "socket={dir}/vda.sock,path={dir}/vda.img,size=64M,logical-block-size=4096,direct,serial=NOVA-4K",
    ]);
    let devices = vhost_user_blk("vda", &daemon.path("vda.sock"), 1);
    let run = boot("blk-data", &devices);
    run.assert_passed();
    assert!(
        run.console.contains("logical-block-size=4096"),
        "guest did not see 4K blocks"
    );
    assert!(run.console.contains("filesystem ok"));
    daemon.wait_for_log("front-end disconnected");
}

#[test]
fn guest_completes_all_io_on_a_throttled_disk() {
    // A rate-limited disk is slower, never wrong: every check of the data test must pass.
    let mut daemon = Daemon::start(&[
        "--blk",
        "socket={dir}/vda.sock,path={dir}/vda.img,size=64M,iops=300,bps=32M,serial=NOVA-QOS",
    ]);
    let devices = vhost_user_blk("vda", &daemon.path("vda.sock"), 1);
    let run = boot("blk-data", &devices);
    run.assert_passed();
    for marker in [
        "small-writes ok",
        "discard ok",
        "filesystem ok",
        "guest-data ok",
    ] {
        assert!(run.console.contains(marker), "missing `{marker}`");
    }
    daemon.wait_for_log("front-end disconnected");
    let mut ctl = crate::common::control::Control::connect(&daemon.path("control.sock"));
    let qos = ctl
        .call("qos.get", serde_json::json!({"id": "vda"}))
        .unwrap();
    assert!(
        qos["throttled"].as_u64().unwrap() > 0,
        "the limit never engaged: {qos}"
    );
}
