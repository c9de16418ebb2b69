//! Durability: what the guest was told is stable survives the daemon, and a failed flush is
//! never followed by a successful one (the "fsyncgate" trap).
//!
//! The flush-failure test reproduces the trap for real: a loop device over a sparse file on a
//! 1 MiB tmpfs accepts writes into its page cache, then writeback fails with ENOSPC and
//! `fdatasync` returns EIO once; Linux then reports the next `fdatasync` as success although
//! the data is gone. Needs root, tmpfs and a loop device (CI has all three); without them the
//! test fails loudly rather than skipping.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::blk::*;
use crate::common::daemon::Daemon;

#[test]
fn flushed_writes_survive_a_crash_and_unflushed_ones_may_not() {
    // The daemon runs with its test-only volatile-cache model (storage::volatile): completed
    // writes stay in memory until a FLUSH writes and fdatasyncs them, so `kill -9` drops
    // exactly what a power cut drops on a disk with a write cache. Reading the image after the
    // crash then shows what FLUSH really made durable: if FLUSH did nothing, `flushed` would be
    // gone too.
    let env = [("NOVACRON_TEST_VOLATILE_CACHE", "1")];
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start_in_with_env(
        dir,
        &["--blk", "socket={dir}/d.sock,path={dir}/d.img,size=16M"],
        &env,
    );
    daemon.wait_for_log("modelling a volatile write cache");
    let socket = daemon.path("d.sock");
    let flushed = pattern(11, 256 << 10);
    let unflushed = pattern(12, 64 << 10);
    {
        let mut c = BlkClient::connect(&socket);
        c.write(0, 4096, &flushed);
        assert_eq!(c.flush(0), S_OK);
        c.write(0, 8192, &unflushed);
        // The guest reads its own completed writes back, flushed or not.
        assert!(c.read(0, 8192, unflushed.len() as u32) == unflushed);
    }
    let dir = daemon.kill();
    let on_disk = std::fs::read(dir.path().join("d.img")).unwrap();
    assert!(
        on_disk[4096 * 512..4096 * 512 + flushed.len()] == flushed[..],
        "a write completed before a completed flush was lost"
    );
    assert!(
        on_disk[8192 * 512..8192 * 512 + unflushed.len()]
            .iter()
            .all(|&b| b == 0),
        "the unflushed write reached the image: the crash model is not active"
    );
    // A restarted daemon serves the flushed bytes.
    let daemon = Daemon::start_in(dir, &["--blk", "socket={dir}/d.sock,path={dir}/d.img"]);
    let mut c = BlkClient::connect(&daemon.path("d.sock"));
    assert!(c.read(0, 4096, flushed.len() as u32) == flushed);
}

/// A loop device over a sparse file on a tiny tmpfs, torn down on drop.
struct FailingDisk {
    mount: tempfile::TempDir,
    loop_device: PathBuf,
}

impl FailingDisk {
    fn new() -> FailingDisk {
        let mount = tempfile::tempdir().unwrap();
        run(
            "mount",
            &["-t", "tmpfs", "-o", "size=1M", "tmpfs", path(mount.path())],
        );
        let backing = mount.path().join("backing.img");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show", path(&backing)])
            .output()
            .expect("losetup is required (util-linux)");
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let loop_device = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        FailingDisk { mount, loop_device }
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&self.loop_device)
            .status();
        let _ = Command::new("umount").arg(self.mount.path()).status();
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        status.success(),
        "{program} {args:?} failed (this test needs root)"
    );
}

#[test]
fn a_failed_flush_fails_every_later_flush() {
    let disk = FailingDisk::new();
    let spec = format!(
        "socket={{dir}}/d.sock,path={},queues=2",
        disk.loop_device.display()
    );
    let daemon = Daemon::start(&["--allow-block-devices", "--blk", &spec]);
    let options = ConnectOptions {
        queues: 2,
        ..Default::default()
    };
    let mut c = BlkClient::connect_with(&daemon.path("d.sock"), options);
    // 4 MiB into a device whose backing can hold 1 MiB: writeback must fail.
    for i in 0..64u64 {
        c.write(0, i * 128, &pattern(i, 64 << 10));
    }
    assert_eq!(
        c.flush(0),
        S_IOERR,
        "flush over lost writeback reported success"
    );
    // The kernel would now report success; we must not, on any queue.
    assert_eq!(
        c.flush(0),
        S_IOERR,
        "second flush after a failure succeeded"
    );
    assert_eq!(c.flush(1), S_IOERR, "flush on another queue succeeded");
    drop(c);
    // Still failing after the front-end reconnects: the device, not the session, lost data.
    let mut c = BlkClient::connect(&daemon.path("d.sock"));
    assert_eq!(c.flush(0), S_IOERR);
}

#[test]
fn a_writeback_error_consumed_by_a_tier_promotion_still_fails_the_guests_flush() {
    // Before: the promotion's fdatasync of the hot file took the writeback error of the
    // guest's writes (Linux reports it once per file), so the guest's next FLUSH succeeded
    // over lost data.
    let disk = FailingDisk::new();
    let spec = format!(
        "socket={{dir}}/t.sock,tier-hot={},tier-cold={{dir}}/t.cold,size=64M,extent=64K",
        disk.loop_device.display()
    );
    let daemon = Daemon::start(&["--allow-block-devices", "--blk", &spec]);
    let mut c = BlkClient::connect(&daemon.path("t.sock"));
    let mut ctl = crate::common::control::Control::connect(&daemon.path("control.sock"));
    c.write(0, 0, &pattern(1, 64 << 10));
    assert_eq!(c.flush(0), S_OK, "64 KiB fits the backing");
    let call = |ctl: &mut crate::common::control::Control, method: &str| {
        ctl.call(
            method,
            serde_json::json!({"id": "t", "extents": [0], "wait": true}),
        )
        .unwrap()
    };
    assert_eq!(call(&mut ctl, "tier.demote")["moved"], 1);
    // 4 MiB into a backing that holds 1 MiB, not flushed: writeback fails.
    for i in 1..65u64 {
        c.write(0, i * 128, &pattern(i, 64 << 10));
    }
    let promoted = call(&mut ctl, "tier.promote");
    assert_eq!(
        promoted["failed"], 1,
        "the promotion's sync saw the error: {promoted}"
    );
    assert_eq!(
        c.flush(0),
        S_IOERR,
        "the guest's flush succeeded after the tier consumed its writeback error"
    );
    // The tier's journal sits beside the cold file, not on devtmpfs beside the device.
    let beside_device = format!("{}.tiermap", disk.loop_device.display());
    assert!(
        !Path::new(&beside_device).exists(),
        "{beside_device} created"
    );
    assert!(daemon.path("t.cold.tiermap").exists());
}
