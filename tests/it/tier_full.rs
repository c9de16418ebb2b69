//! Full tiers: the cold tier on a 256 KiB tmpfs fills up during a demotion (the moves that do
//! not fit fail, their hot copies stay, the guest reads everything back); the hot tier on a
//! 512 KiB tmpfs fills up (writes that find no room fail with IOERR, a promotion that finds no
//! room fails the write that needed it, and the extent stays readable from the cold tier).
//! Needs root and tmpfs (CI has both).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::process::Command;

use serde_json::json;

use crate::common::blk::{pattern, BlkClient, S_IOERR, S_OK, T_OUT};
use crate::common::control::Control;
use crate::common::daemon::Daemon;

const EXTENT: u64 = 64 << 10;

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount is required");
        assert!(status.success(), "cannot mount a tmpfs (needs root)");
        Tmpfs(dir)
    }

    fn path(&self, name: &str) -> String {
        self.0.path().join(name).display().to_string()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

fn spec(hot: &str, cold: &str) -> String {
    format!("socket={{dir}}/t.sock,tier-hot={hot},tier-cold={cold},size=2M,extent=64K")
}

#[test]
fn a_full_cold_tier_fails_the_moves_that_do_not_fit_and_loses_nothing() {
    let cold = Tmpfs::new("256K");
    let daemon = Daemon::start(&["--blk", &spec("{dir}/t.hot", &cold.path("t.cold"))]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let mut c = BlkClient::connect(&daemon.path("t.sock"));
    let data = pattern(1, (32 * EXTENT) as usize);
    c.write(0, 0, &data);
    assert_eq!(c.flush(0), S_OK);
    let tally = ctl
        .call("tier.demote", json!({"id": "t", "all": true, "wait": true}))
        .unwrap();
    let moved = tally["moved"].as_u64().unwrap();
    assert!(moved > 0 && moved < 32, "{tally}");
    assert!(tally["failed"].as_u64().unwrap() > 0, "{tally}");
    let status = ctl.call("tier.status", json!({"id": "t"})).unwrap();
    assert_eq!(status["cold-extents"].as_u64().unwrap(), moved, "{status}");
    assert!(
        status["cold-bytes"].as_u64().unwrap() <= 256 << 10,
        "{status}"
    );
    for start in (0..32 * EXTENT).step_by(EXTENT as usize) {
        let got = c.read(0, start / 512, EXTENT as u32);
        assert_eq!(
            got,
            data[start as usize..(start + EXTENT) as usize],
            "extent at {start}"
        );
    }
}

#[test]
fn a_full_hot_tier_fails_only_the_requests_that_need_room() {
    let hot = Tmpfs::new("512K");
    let daemon = Daemon::start(&["--blk", &spec(&hot.path("t.hot"), "{dir}/t.cold")]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let mut c = BlkClient::connect(&daemon.path("t.sock"));
    // Four extents of data, then demote them (their hot copies are released).
    let data = pattern(2, (4 * EXTENT) as usize);
    c.write(0, 0, &data);
    assert_eq!(c.flush(0), S_OK);
    let tally = ctl
        .call(
            "tier.demote",
            json!({"id": "t", "extents": [0, 1, 2, 3], "wait": true}),
        )
        .unwrap();
    assert_eq!(tally["moved"], 4, "{tally}");
    // Fill the hot tier until writes fail.
    let mut failed_at = None;
    for extent in 4..32u64 {
        let reply = c.request(
            0,
            T_OUT,
            extent * EXTENT / 512,
            &pattern(extent, EXTENT as usize),
            0,
        );
        if reply.status == S_IOERR {
            failed_at = Some(extent);
            break;
        }
        assert_eq!(reply.status, S_OK);
    }
    let failed_at = failed_at.expect("the 512K hot tier never filled up");
    // A write into a cold extent needs a promotion, which finds no room: IOERR for it, and the
    // extent still reads back from the cold tier.
    let reply = c.request(0, T_OUT, 8, &[0xee; 4096], 0);
    assert_eq!(reply.status, S_IOERR);
    assert_eq!(c.read(0, 0, EXTENT as u32), data[..EXTENT as usize]);
    let status = ctl.call("tier.status", json!({"id": "t"})).unwrap();
    assert_eq!(status["cold-extents"], 4, "metadata unchanged: {status}");
    // Everything written before the tier filled is intact.
    for extent in 4..failed_at {
        assert_eq!(
            c.read(0, extent * EXTENT / 512, 4096),
            pattern(extent, EXTENT as usize)[..4096]
        );
    }
}
