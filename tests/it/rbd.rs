//! Disks on a Ceph cluster (`path=rbd:POOL/IMAGE`): the cluster is the single-node one
//! `scripts/ceph-cluster.sh` starts (`common::ceph`). A third-party front-end (libblkio) and
//! real guests use the disks; another client (`rbd export`) checks what reached the cluster;
//! a stopped OSD stalls a guest's I/O without an error; a snapshot is served read-only; a
//! disk grows under a running guest.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly by design

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::ceph::cluster;
use crate::common::control::Control;
use crate::common::daemon::Daemon;
use crate::common::guest::vhost_user_blk;
use crate::common::qemu::{migrate, Qemu};
use crate::guest_migrate::{wait_progress, writing_guest_and_destination, Server};

const MIB: u64 = 1 << 20;

#[test]
fn libblkio_random_writes_flush_read_back_rbd() {
    let ceph = cluster();
    let _healthy = ceph.shared();
    let image = ceph.new_image("blkio", 64);
    let spec = format!("socket={{dir}}/d.sock,{},queues=2", ceph.disk(&image));
    let daemon = Daemon::start(&["--blk", &spec]);
    let written = crate::blkio_frontend::random_writes_flush_read_back(&daemon, 2, 64 * MIB);
    // A second device on the same image is refused (two guests would write it in turn).
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let add = |image: &str| {
        let mut params = json!({"type": "blk", "id": "e", "socket": daemon.path("e.sock")});
        for option in ceph.disk(image).split(',') {
            let (key, value) = option.split_once('=').unwrap();
            params[key] = json!(value);
        }
        params
    };
    assert_eq!(ctl.error_kind("device.add", add(&image)), "exists");
    // Added at run time (connected off the control thread, answered later), it serves.
    let second = add(&ceph.new_image("runtime", 16));
    let added = ctl.call("device.add", second).unwrap();
    assert_eq!(added["engine"], "rbd", "{added}");
    assert_eq!(added["size"], 16 * MIB, "{added}");
    // What another client reads from the cluster.
    let exported = ceph.export(&image);
    for (offset, want) in written {
        let at = usize::try_from(offset).unwrap();
        assert!(
            exported[at..at + want.len()] == want[..],
            "block at {offset} wrong in the cluster"
        );
    }
}

#[test]
fn a_guest_uses_an_rbd_disk_across_a_reboot() {
    let ceph = cluster();
    let _healthy = ceph.shared();
    let image = ceph.new_image("guest", 64);
    let daemon = crate::guest_blk::guest_round_trip_on(&ceph.disk(&image), "NOVA-RBD");
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let info = ctl.call("device.get", json!({"id": "vda"})).unwrap();
    assert_eq!(info["engine"], "rbd", "{info}");
    assert_eq!(info["path"], format!("rbd:rbd/{image}"), "{info}");
}

#[test]
fn a_stopped_osd_stalls_the_guest_and_its_io_resumes_without_an_error() {
    let ceph = cluster();
    let _alone = ceph.exclusive();
    let image = ceph.new_image("fault", 64);
    let spec = format!("socket={{dir}}/c.sock,{},queues=2,id=c", ceph.disk(&image));
    let daemon = Daemon::start(&["--blk", &spec]);
    let dir = tempfile::tempdir().unwrap();
    let mut guest = Qemu::spawn(
        "blk-crash",
        "",
        &vhost_user_blk("c", &daemon.path("c.sock"), 2),
        dir.path(),
        "guest",
        None,
    );
    wait_progress(&mut guest, 4, "before the fault");
    ceph.osd(false);
    // The guest's requests reach the daemon and stay there: in flight, not failed.
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let totals = |ctl: &mut Control| {
        let stats = ctl.call("device.stats", json!({"id": "c"})).unwrap();
        let total = &stats["total"];
        (
            total["bytes-written"].as_u64().unwrap(),
            total["in-flight"].as_u64().unwrap(),
            total["io-errors"].as_u64().unwrap(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while totals(&mut ctl).1 == 0 {
        assert!(Instant::now() < deadline, "no request waited for the OSD");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (written, _, _) = totals(&mut ctl);
    // The outage lasts 10 s. No write may complete meanwhile (the workload never flushes, so
    // librbd's cache stays write-through; reads of cached data may still complete).
    std::thread::sleep(Duration::from_secs(10));
    let (written_during, in_flight, errors) = totals(&mut ctl);
    ceph.osd(true);
    assert_eq!(
        written_during, written,
        "writes completed with the OSD down"
    );
    assert!(
        in_flight > 0,
        "requests were dropped while the OSD was down"
    );
    assert_eq!(errors, 0, "requests failed while the OSD was down");
    wait_progress(&mut guest, 8, "after the fault");
    ceph.write_at(
        &image,
        64 * MIB - 4096,
        &crate::common::writers::stop_marker(),
    );
    let run = guest.wait(Duration::from_secs(120));
    run.assert_passed();
    assert!(run.console.contains("crash-writers ok"), "{}", run.console);
    assert!(!run.console.contains("I/O error"), "{}", run.console);
    assert_eq!(totals(&mut ctl).2, 0, "requests failed after the fault");
    eprintln!("{in_flight} requests waited through the fault");
}

#[test]
fn a_snapshot_is_served_read_only() {
    let ceph = cluster();
    let _healthy = ceph.shared();
    let image = ceph.new_image("snap", 16);
    let data = crate::common::blk::pattern(5, 1 << 20);
    ceph.write_at(&image, 0, &data);
    ceph.rbd(&["snap", "create", &format!("rbd/{image}@gold")]);
    ceph.write_at(&image, 0, &vec![0xee; 1 << 20]);
    let spec = format!(
        "socket={{dir}}/d.sock,{}",
        ceph.disk(&format!("{image}@gold"))
    );
    let daemon = Daemon::start(&["--blk", &spec]);
    let read = crate::blkio_frontend::read_from_read_only(&daemon, 0, 1 << 20);
    assert!(read == data, "the snapshot's data did not read back");
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let info = ctl.call("device.get", json!({"id": "d"})).unwrap();
    assert_eq!(info["readonly"], true, "{info}");
}

#[test]
fn an_rbd_disk_grows_under_a_running_guest() {
    let ceph = cluster();
    let _healthy = ceph.shared();
    let image = ceph.new_image("grow", 64);
    let spec = format!("socket={{dir}}/vda.sock,{}", ceph.disk(&image));
    let daemon = Daemon::start(&["--blk", &spec]);
    let dir = tempfile::tempdir().unwrap();
    let mut guest = Qemu::spawn(
        "blk-resize",
        "",
        &vhost_user_blk("vda", &daemon.path("vda.sock"), 1),
        dir.path(),
        "guest",
        None,
    );
    guest.wait_console("the guest's first size", Duration::from_secs(180), |c| {
        c.contains("waiting-for-resize")
    });
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let shrink = ctl.call("device.resize", json!({"id": "vda", "size": "32M"}));
    assert!(shrink.is_err(), "a shrink was accepted: {shrink:?}");
    let info = ctl
        .call("device.resize", json!({"id": "vda", "size": "96M"}))
        .unwrap();
    assert_eq!(info["size"], 96 * MIB, "{info}");
    assert_eq!(ceph.size(&image), 96 * MIB, "the image did not grow");
    let run = guest.wait(Duration::from_secs(120));
    run.assert_passed();
    assert!(
        run.console.contains("resized-sectors=196608"),
        "{}",
        run.console
    );
    assert!(run.console.contains("resize ok"), "{}", run.console);
}

#[test]
fn a_guest_writing_its_rbd_disk_migrates_between_two_daemons() {
    // The standard cross-host setup: both daemons open the same image (librbd's exclusive
    // lock moves to the destination with its first write).
    let ceph = cluster();
    let _healthy = ceph.shared();
    let image = ceph.new_image("migrate", 64);
    let spec = |incoming: &str| {
        format!(
            "socket={{dir}}/c.sock,{},queues=2,id=c{incoming}",
            ceph.disk(&image)
        )
    };
    let source = Server::Novacron(Daemon::start(&["--blk", &spec("")]));
    let dest_daemon = Daemon::start(&["--blk", &spec(",incoming=on")]);
    let dest_control = dest_daemon.path("control.sock");
    let dest = Server::Novacron(dest_daemon);
    let dir = tempfile::tempdir().unwrap();
    let (mut guest, mut arrived, channel) =
        writing_guest_and_destination(&source, &dest, dir.path());
    let migrated = migrate(&mut guest, &arrived, &channel);
    migrated.assert_same_memory();
    wait_progress(&mut arrived, 4, "after the migration");
    guest.quit();
    let mut ctl = Control::connect(&dest_control);
    let stats = ctl.call("device.stats", json!({"id": "c"})).unwrap();
    assert!(
        stats["total"]["bytes-written"].as_u64() > Some(0),
        "the destination wrote nothing: {stats}"
    );
    ceph.write_at(
        &image,
        64 * MIB - 4096,
        &crate::common::writers::stop_marker(),
    );
    let run = arrived.wait(Duration::from_secs(120));
    run.assert_passed();
    assert!(run.console.contains("crash-writers ok"), "{}", run.console);
    assert!(!run.console.contains("I/O error"), "{}", run.console);
    eprintln!(
        "rbd disk migration: downtime {} ms, total {} ms",
        migrated.downtime_ms, migrated.total_ms
    );
}

/// A tiered disk whose cold tier is RADOS objects: `{dir}` files for the hot tier, id `t`.
fn rados_tiered(prefix: &str) -> String {
    format!(
        "socket={{dir}}/t.sock,tier-hot={{dir}}/t.hot,{},size=4M,extent=64K",
        cluster().cold_tier(prefix)
    )
}

#[test]
fn a_cold_tier_of_rados_objects_holds_one_object_per_cold_extent_across_restarts() {
    use crate::common::blk::{BlkClient, S_OK};
    let ceph = cluster();
    let _healthy = ceph.shared();
    let prefix = ceph.new_prefix("cold");
    let spec = rados_tiered(&prefix);
    let mut daemon = Daemon::start(&["--blk", &spec]);
    let data = crate::common::blk::pattern(11, 4 << 20);
    {
        let mut c = BlkClient::connect(&daemon.path("t.sock"));
        c.write(0, 0, &data);
        assert_eq!(c.flush(0), S_OK);
    }
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let moved = ctl
        .call("tier.demote", json!({"id": "t", "all": true, "wait": true}))
        .unwrap();
    assert_eq!(moved["moved"], 64, "{moved}");
    assert_eq!(ceph.records(&prefix), 64, "one object per cold extent");
    daemon.wait_for_log("t: front-end disconnected");
    drop(ctl);
    let (_, dir) = daemon.terminate();
    // The next daemon finds the map and the objects (the orderly stop let the lock go).
    let daemon = Daemon::start_in(dir, &["--blk", &spec]);
    let mut c = BlkClient::connect(&daemon.path("t.sock"));
    assert!(c.read(0, 0, 4 << 20) == data, "cold data changed");
    // Another disk naming these objects as its cold tier (no journal of its own) is refused:
    // its start-up sweep would remove them.
    let foreign = rados_tiered(&prefix)
        .replace("{dir}", daemon.dir.path().to_str().unwrap())
        .replace("t.sock", "u.sock")
        .replace("t.hot", "u.hot");
    let refused = crate::common::daemon::start_failure(&["--control", "none", "--blk", &foreign]);
    assert!(refused.contains("holds data"), "{refused}");
    assert_eq!(
        ceph.records(&prefix),
        64,
        "the refused disk touched the objects"
    );
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    ctl.call(
        "tier.promote",
        json!({"id": "t", "all": true, "wait": true}),
    )
    .unwrap();
    assert_eq!(ceph.records(&prefix), 0, "promoted records are removed");
    assert!(c.read(0, 0, 4 << 20) == data, "promoted data changed");
}

#[test]
fn a_crash_at_every_step_of_a_move_to_rados_loses_nothing_and_leaks_no_object() {
    let ceph = cluster();
    let _healthy = ceph.shared();
    for (point, promote) in crate::tier::CRASH_POINTS {
        eprintln!("crash point {point}");
        let prefix = ceph.new_prefix("crash");
        crate::tier::crash_at(&rados_tiered(&prefix), point, promote);
        // crash_at ends with everything promoted: no record object may be left, including
        // the one a crash between record and journal leaked (the start-up sweep removes it).
        assert_eq!(ceph.records(&prefix), 0, "{point}: objects left behind");
    }
}

#[test]
fn a_rados_cold_tier_whose_lock_is_broken_stops_moving() {
    let ceph = cluster();
    let _healthy = ceph.shared();
    let prefix = ceph.new_prefix("fence");
    let mut daemon = Daemon::start(&["--blk", &rados_tiered(&prefix)]);
    let lock_object = format!("{prefix}.lock");
    let listed: serde_json::Value =
        serde_json::from_slice(&ceph.rados(&["lock", "list", &lock_object, "--format", "json"]))
            .unwrap();
    assert!(
        listed["locks"].as_array().is_some_and(|l| !l.is_empty()),
        "the tier is not locked: {listed}"
    );
    let info: serde_json::Value = serde_json::from_slice(&ceph.rados(&[
        "lock",
        "info",
        &lock_object,
        "novacron-tier",
        "--format",
        "json",
    ]))
    .unwrap();
    let locker = &info["lockers"][0];
    let (client, cookie) = (
        locker["name"].as_str().unwrap().to_string(),
        locker["cookie"].as_str().unwrap().to_string(),
    );
    // Another owner takes the tier (as a host that broke a lock it thought stale would).
    ceph.rados(&[
        "lock",
        "break",
        &lock_object,
        "novacron-tier",
        &client,
        "--lock-cookie",
        &cookie,
    ]);
    // The next renewal fails and the tier stops: no move runs any more.
    daemon.wait_for_log("the cold tier is no longer ours");
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let batch = ctl
        .call("tier.demote", json!({"id": "t", "all": true, "wait": true}))
        .unwrap();
    assert_eq!(batch["moved"], 0, "a move ran without the lock: {batch}");
    assert_eq!(batch["failed"], batch["total"], "{batch}");
    assert_eq!(ceph.records(&prefix), 0);
}

#[test]
fn an_unreachable_cluster_holds_only_the_device_add_that_names_it() {
    // No cluster needed: a ceph.conf naming a monitor that is not there.
    let daemon = Daemon::start(&["--blk", "socket={dir}/d.sock,path=null,size=1M"]);
    let conf = daemon.path("nowhere.conf");
    std::fs::write(
        &conf,
        "[global]\nmon_host = v2:127.0.0.1:9\nauth_client_required = none\n",
    )
    .unwrap();
    let control = daemon.path("control.sock");
    let pending = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let adding = {
        let (control, pending) = (control.clone(), std::sync::Arc::clone(&pending));
        let socket = daemon.path("e.sock");
        std::thread::spawn(move || {
            let mut ctl = Control::connect(&control);
            let added = ctl.call(
                "device.add",
                json!({"type": "blk", "socket": socket, "path": "rbd:rbd/x",
                       "ceph-conf": conf, "ceph-id": "nobody"}),
            );
            pending.store(false, std::sync::atomic::Ordering::SeqCst);
            added
        })
    };
    // While that add waits for the cluster (up to 15 s), other clients are answered: count
    // the answers that came back while it was still pending, one a second.
    let mut ctl = Control::connect(&control);
    let mut answered_while_pending = 0;
    while pending.load(std::sync::atomic::Ordering::SeqCst) {
        assert_eq!(ctl.device_count(), 1);
        if pending.load(std::sync::atomic::Ordering::SeqCst) {
            answered_while_pending += 1;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let added = adding.join().unwrap();
    let error = added.expect_err("a device on an unreachable cluster was added");
    eprintln!("add error: {error}");
    assert_eq!(error["data"]["kind"], "io", "{error}");
    assert!(
        answered_while_pending >= 5,
        "the control plane was held: {answered_while_pending} answers during the add"
    );
    assert_eq!(ctl.device_count(), 1);
}
