//! A real Linux guest (Debian kernel, virtio_blk driver, QEMU under TCG) uses novacrond:
//! patterned writes checked after dropping caches, discard, a filesystem, and a second boot
//! (new front-end on the same daemon) that finds the filesystem intact. Once per engine.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common::daemon::Daemon;
use crate::common::guest::{boot, vhost_user_blk};

fn guest_round_trip(engine: &str) {
    let spec = format!("socket={{dir}}/vda.sock,path={{dir}}/vda.img,size=64M,queues=2,serial=NOVA-{engine},engine={engine}");
    let mut daemon = Daemon::start(&["--blk", &spec]);
    let devices = vhost_user_blk("vda", &daemon.path("vda.sock"), 2);

    let first = boot("blk-data", &devices);
    first.assert_passed();
    assert!(
        first.console.contains(&format!("serial=NOVA-{engine}")),
        "serial not seen by the guest"
    );
    assert!(
        first.console.contains("queues=2"),
        "guest did not get 2 queues"
    );
    assert!(
        first.console.contains("size-sectors=131072"),
        "wrong capacity"
    );
    for marker in [
        "small-writes ok",
        "discard ok",
        "filesystem ok",
        "guest-data ok",
    ] {
        assert!(first.console.contains(marker), "missing `{marker}`");
    }
    daemon.wait_for_log("front-end disconnected");

    let second = boot("blk-remount", &devices);
    second.assert_passed();
    assert!(second.console.contains("guest-remount ok"));
    eprintln!(
        "guest boots took {:?} and {:?}",
        first.elapsed, second.elapsed
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
