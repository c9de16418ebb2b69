//! Crash restarts under a real guest: QEMU (TCG) with `reconnect=1` keeps a virtio-blk disk on
//! the daemon while four guest writers write and verify with O_DIRECT, and the daemon is
//! killed with SIGKILL ten times mid-stream and started again each time. The daemon's engine
//! completes requests out of order (test-only `NOVACRON_TEST_REORDER`), so the requests in
//! flight at each kill are not a prefix of the ring: only inflight tracking (the front-end's
//! `INFLIGHT_SHMFD` region) lets the next process resubmit exactly those. The guest must end
//! with every round verified, no I/O error and no hang.
//!
//! `NOVACRON_IT_NO_INFLIGHT=1` runs the same test with inflight tracking off (the daemon then
//! behaves as before it: QEMU rewinds the ring to the used index), to show the failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly by design

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::control::Control;
use crate::common::daemon::Daemon;
use crate::common::guest::{boot, vhost_user_blk_reconnect};

const SPEC: &str = "socket={dir}/c.sock,path={dir}/c.img,size=64M,queues=2";
const KILLS: usize = 10;

fn env() -> Vec<(&'static str, &'static str)> {
    let mut env = vec![("NOVACRON_TEST_REORDER", "1")];
    if std::env::var_os("NOVACRON_IT_NO_INFLIGHT").is_some() {
        env.push(("NOVACRON_TEST_NO_INFLIGHT", "1"));
    }
    env
}

/// Requests this daemon process completed on the disk so far, and how many of them it
/// resubmitted from the inflight region.
fn completed(daemon: &Daemon) -> (u64, u64) {
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let stats = ctl.call("device.stats", json!({"id": "c"})).unwrap();
    let queues = stats["queues"].as_array().expect("per-queue stats");
    let requests = queues
        .iter()
        .flat_map(|q| q["requests"].as_array().expect("requests by type").iter())
        .filter_map(|row| row[1].as_u64())
        .sum();
    let resubmitted = queues
        .iter()
        .map(|q| q["resubmitted"].as_u64().expect("resubmitted"))
        .sum();
    (requests, resubmitted)
}

/// Waits until this daemon process has served a stream of guest requests; returns how many
/// it resubmitted.
fn served(
    daemon: &Daemon,
    guest: &std::thread::JoinHandle<crate::common::guest::GuestRun>,
    deadline: Instant,
) -> u64 {
    loop {
        let (requests, resubmitted) = completed(daemon);
        if requests >= 150 {
            return resubmitted;
        }
        assert!(!guest.is_finished(), "the guest stopped early");
        if Instant::now() > deadline {
            // The guest's console says why (QEMU's own timeout ends it).
            while !guest.is_finished() {
                std::thread::sleep(Duration::from_millis(100));
            }
            panic!("no guest I/O ({requests} requests served)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_guest_survives_ten_kill_9s_under_out_of_order_completions() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start_in_with_env(dir, &["--blk", SPEC], &env());
    let devices = vhost_user_blk_reconnect("c", &daemon.path("c.sock"), 2);
    let guest = std::thread::spawn(move || boot("blk-crash", &devices));
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut resubmitted = 0;
    for _ in 0..KILLS {
        // Each kill lands once this process has served a stream of guest requests.
        resubmitted += served(&daemon, &guest, deadline);
        let dir = daemon.kill();
        daemon = Daemon::start_in_with_env(dir, &["--blk", SPEC], &env());
    }
    // Serve a stream after the last restart too, then tell the guest to stop.
    resubmitted += served(&daemon, &guest, deadline);
    let image = std::fs::OpenOptions::new()
        .write(true)
        .open(daemon.path("c.img"))
        .unwrap();
    let mut marker = vec![0u8; 4096];
    marker[..13].copy_from_slice(b"NOVACRON-STOP");
    image.write_all_at(&marker, (64 << 20) - 4096).unwrap();
    let run = guest.join().unwrap();
    run.assert_passed();
    assert!(run.console.contains("crash-writers ok"), "{}", run.console);
    eprintln!("{KILLS} kills; {resubmitted} request(s) resubmitted from inflight regions");
    if std::env::var_os("NOVACRON_IT_NO_INFLIGHT").is_none() {
        assert!(
            resubmitted > 0,
            "no kill found a request in flight: the test proves nothing"
        );
    }
}
