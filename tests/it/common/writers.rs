//! The host's side of the guest's `blk-crash` workload (four writers writing and verifying
//! with O_DIRECT until told to stop): how far a daemon got, and the stop marker.

use std::os::unix::fs::FileExt;
use std::path::Path;

use serde_json::json;

use super::control::Control;
use super::daemon::Daemon;

/// Requests this daemon process completed on disk `id` so far, and how many of them it
/// resubmitted from the inflight region.
pub fn completed_on(daemon: &Daemon, id: &str) -> (u64, u64) {
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let stats = ctl.call("device.stats", json!({ "id": id })).unwrap();
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

/// Tells the guest's writers to finish: NOVACRON-STOP in the last 4 KiB of the `size`-byte
/// image, which the guest polls with O_DIRECT reads.
pub fn stop_writers_in(image: &Path, size: u64) {
    let image = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    image.write_all_at(&stop_marker(), size - 4096).unwrap();
}

/// The 4 KiB the writers stop on, for the disk's last 4 KiB (written by other means for a
/// disk that is not a file).
pub fn stop_marker() -> Vec<u8> {
    let mut marker = vec![0u8; 4096];
    marker[..13].copy_from_slice(b"NOVACRON-STOP");
    marker
}
