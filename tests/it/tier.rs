//! Tiered disks through the real vhost-user protocol (the test front-end), checked against a
//! model of the disk: demote everything, read it back from the cold tier, write, discard and
//! promote while extents are cold, moves running while the guest writes; then crashes:
//! a test-only failpoint aborts the daemon at each step of a demotion and a promotion, and
//! kill -9 lands at random times during background moves; after every restart each sector
//! holds exactly what the model says (every write was flushed before the crash).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly by design

use serde_json::json;

use crate::common::blk::{BlkClient, S_OK, T_DISCARD};
use crate::common::control::Control;
use crate::common::daemon::Daemon;

const EXTENT: u64 = 64 << 10;
const SIZE: u64 = 4 << 20; // 64 extents
const SPEC: &str =
    "socket={dir}/t.sock,tier-hot={dir}/t.hot,tier-cold={dir}/t.cold,size=4M,extent=64K";

/// The disk as the guest last wrote it.
struct Model(Vec<u8>);

impl Model {
    fn new() -> Self {
        Model(vec![0; SIZE as usize])
    }

    fn write(&mut self, c: &mut BlkClient, offset: u64, data: &[u8]) {
        c.write(0, offset / 512, data);
        self.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    fn verify(&self, c: &mut BlkClient) {
        for start in (0..SIZE).step_by(256 << 10) {
            let got = c.read(0, start / 512, 256 << 10);
            let want = &self.0[start as usize..(start + (256 << 10)) as usize];
            if got != want {
                let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
                panic!("disk differs from the model at byte {}", start + at as u64);
            }
        }
    }
}

/// Compressible, extent-specific data (text-like), as a filesystem of logs and binaries has.
fn text(seed: u64, len: usize) -> Vec<u8> {
    let words = [
        "tier ",
        "extent ",
        "novacron ",
        "cold ",
        "hot ",
        "zstd ",
        "guest ",
        "\n",
    ];
    let mut out = Vec::with_capacity(len);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % 8) as usize].as_bytes());
    }
    out.truncate(len);
    out
}

fn fill(c: &mut BlkClient, model: &mut Model, extents: std::ops::Range<u64>) {
    for e in extents {
        model.write(c, e * EXTENT, &text(e, EXTENT as usize));
    }
    assert_eq!(c.flush(0), S_OK);
}

fn demote_all(ctl: &mut Control) -> serde_json::Value {
    ctl.call("tier.demote", json!({"id": "t", "all": true, "wait": true}))
        .unwrap()
}

#[test]
fn cold_extents_read_back_take_writes_and_discards_and_come_back() {
    let port = crate::common::control::free_port();
    let daemon = Daemon::start(&["--blk", SPEC, "--metrics", &port]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let mut c = BlkClient::connect(&daemon.path("t.sock"));
    let mut model = Model::new();
    fill(&mut c, &mut model, 0..40);
    let tally = demote_all(&mut ctl);
    assert_eq!(tally["moved"], 40, "{tally}");
    assert_eq!(
        tally["skipped"], 24,
        "unwritten extents stay unwritten: {tally}"
    );
    let status = ctl.call("tier.status", json!({"id": "t"})).unwrap();
    assert_eq!(status["cold-extents"], 40, "{status}");
    assert!(
        status["compression-ratio"].as_f64().unwrap() > 2.0,
        "{status}"
    );
    assert!(
        status["hot-bytes-allocated"].as_u64().unwrap() < EXTENT,
        "hot copies not released: {status}"
    );
    let bands = status["heat-histogram"].as_array().unwrap();
    assert_eq!(bands.len(), 6, "{status}");
    let cold_total: u64 = bands.iter().map(|b| b["cold"].as_u64().unwrap()).sum();
    assert_eq!(
        cold_total, 40,
        "every cold extent holding data is in a heat band: {status}"
    );
    model.verify(&mut c);
    let metrics = crate::common::control::scrape(&port, "/metrics");
    for line in [
        "novacron_tier_extents{device=\"t\",tier=\"cold\"} 40",
        "novacron_tier_moves_total{device=\"t\",kind=\"demoted\"} 40",
        "novacron_tier_corrupt_records_total{device=\"t\"} 0",
    ] {
        assert!(metrics.contains(line), "missing `{line}` in:\n{metrics}");
    }

    // Writes into cold extents (promoted first), across extent boundaries, and a discard of a
    // whole cold extent and of part of one.
    model.write(&mut c, 3 * EXTENT + 4096, &vec![0xab; 8192]);
    model.write(&mut c, 10 * EXTENT - 2048, &vec![0xcd; 4096]);
    let segment = |offset: u64, len: u64| (offset / 512, (len / 512) as u32, 0u32);
    assert_eq!(
        c.ranges(0, T_DISCARD, &[segment(20 * EXTENT, EXTENT)]),
        S_OK
    );
    model.0[(20 * EXTENT) as usize..(21 * EXTENT) as usize].fill(0);
    assert_eq!(c.ranges(0, T_DISCARD, &[segment(30 * EXTENT, 4096)]), S_OK);
    model.0[(30 * EXTENT) as usize..(30 * EXTENT + 4096) as usize].fill(0);
    assert_eq!(c.flush(0), S_OK);
    model.verify(&mut c);

    let tally = ctl
        .call(
            "tier.promote",
            json!({"id": "t", "all": true, "wait": true}),
        )
        .unwrap();
    assert_eq!(tally["failed"], 0, "{tally}");
    let status = ctl.call("tier.status", json!({"id": "t"})).unwrap();
    assert_eq!(status["cold-extents"], 0, "{status}");
    model.verify(&mut c);

    // Bad requests change nothing.
    for bad in [
        json!({"id": "t"}),
        json!({"id": "t", "all": true, "extents": [1]}),
        json!({"id": "t", "extents": [64]}),
        json!({"id": "t", "idle-for": "soon"}),
    ] {
        assert_eq!(ctl.error_kind("tier.demote", bad), "invalid-params");
    }
}

#[test]
fn a_small_write_into_a_cold_extent_is_charged_the_promotion() {
    // Before: a 512-byte write into a cold extent cost 512 bytes of QoS while the daemon
    // decompressed and rewrote the whole extent (and synced twice).
    let daemon = Daemon::start(&["--blk", SPEC]);
    let mut c = BlkClient::connect(&daemon.path("t.sock"));
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let mut model = Model::new();
    fill(&mut c, &mut model, 0..2);
    demote_all(&mut ctl);
    // 64 KiB/s: what refills during the write is a few hundred bytes.
    ctl.call("qos.set", json!({"id": "t", "write-bps": "64K"}))
        .unwrap();
    let tokens = |ctl: &mut Control| {
        ctl.call("qos.get", json!({"id": "t"})).unwrap()["tokens"]["write-bps"]
            .as_i64()
            .unwrap()
    };
    let before = tokens(&mut ctl);
    model.write(&mut c, EXTENT + 512, &[7u8; 512]);
    let after = tokens(&mut ctl);
    assert!(
        before - after > EXTENT as i64 / 2,
        "a promotion of {EXTENT} bytes charged ({before} -> {after})"
    );
    model.verify(&mut c);
}

#[test]
fn a_tier_batch_with_wait_leaves_the_control_socket_serving() {
    // Before: `tier.demote` with `wait` ran on the only control thread; until the batch
    // ended, no other client (nor shutdown) got an answer.
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    nix_mkfifo(&gate);
    let point = format!("batch-start@{}", gate.display());
    let mut daemon =
        Daemon::start_in_with_env(dir, &["--blk", SPEC], &[("NOVACRON_FAILPOINT", &point)]);
    let mut c = BlkClient::connect(&daemon.path("t.sock"));
    let mut model = Model::new();
    fill(&mut c, &mut model, 0..4);
    let mut waiting = std::os::unix::net::UnixStream::connect(daemon.path("control.sock")).unwrap();
    waiting
        .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"tier.demote\",\"params\":{\"id\":\"t\",\"all\":true,\"wait\":true}}\n")
        .unwrap();
    // The batch is held at its gate; another client is served all the same, and sees it run.
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    daemon.wait_for_log("failpoint batch-start: waiting");
    let status = ctl.call("tier.status", json!({"id": "t"})).unwrap();
    assert_eq!(status["progress"]["running"], true, "{status}");
    ctl.call("daemon.info", json!({})).unwrap();
    // Open the gate: the first client gets its tally.
    std::fs::write(&gate, b"").unwrap();
    let mut line = String::new();
    BufReader::new(&waiting).read_line(&mut line).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["id"], 7, "{reply}");
    assert_eq!(reply["result"]["moved"], 4, "{reply}");
    model.verify(&mut c);
}

fn nix_mkfifo(path: &std::path::Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

#[test]
fn guest_writes_racing_background_moves_are_never_lost() {
    let mut daemon = Daemon::start(&["--blk", SPEC]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let mut c = BlkClient::connect(&daemon.path("t.sock"));
    let mut model = Model::new();
    fill(&mut c, &mut model, 0..64);
    for round in 0..4u64 {
        ctl.call("tier.demote", json!({"id": "t", "all": true}))
            .unwrap();
        // Writes, reads, discards and flushes while the demotion runs: whichever wins, the
        // disk must be what the guest did.
        for i in 0..32u64 {
            let offset = ((i * 7 + round * 13) % 64) * EXTENT + (i % 16) * 4096;
            match i % 4 {
                0 | 1 => model.write(&mut c, offset, &vec![(round * 32 + i) as u8; 4096]),
                2 => {
                    let got = c.read(0, offset / 512, 4096);
                    assert_eq!(got, model.0[offset as usize..offset as usize + 4096]);
                }
                _ => {
                    let segment = (offset / 512, 8u32, 0u32);
                    assert_eq!(c.ranges(0, T_DISCARD, &[segment]), S_OK);
                    model.0[offset as usize..offset as usize + 4096].fill(0);
                }
            }
            if i % 8 == 7 {
                assert_eq!(c.flush(0), S_OK);
            }
        }
        daemon.wait_for_next_log("tier: demote of 64 extent(s) done");
        let status = ctl.call("tier.status", json!({"id": "t"})).unwrap();
        assert_eq!(status["progress"]["running"], false, "{status}");
        model.verify(&mut c);
    }
}

/// Every step of a move a crash can interrupt (failpoint, and whether the move is a
/// promotion).
pub(crate) const CRASH_POINTS: [(&str, bool); 4] = [
    ("demote-after-record", false),
    ("demote-after-journal", false),
    ("promote-after-hot", true),
    ("promote-after-journal", true),
];

/// A tiered disk `spec` (id `t`, 4 MiB in 64 KiB extents) is filled, the daemon is aborted
/// at failpoint `point` in the first move, restarted: every byte is as written, and
/// everything still moves both ways.
pub(crate) fn crash_at(spec: &str, point: &str, promote: bool) {
    let mut model = Model::new();
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start_in(dir, &["--blk", spec]);
    {
        let mut c = BlkClient::connect(&daemon.path("t.sock"));
        fill(&mut c, &mut model, 0..8);
    }
    if promote {
        let mut ctl = Control::connect(&daemon.path("control.sock"));
        demote_all(&mut ctl);
    }
    daemon.wait_for_log("t: front-end disconnected");
    let (_, dir) = daemon.terminate();
    let daemon = Daemon::start_in_with_env(dir, &["--blk", spec], &[("NOVACRON_FAILPOINT", point)]);
    let verb = if promote { "promote" } else { "demote" };
    // The failpoint aborts the daemon in the middle of the first move (novactl sees the
    // connection drop).
    let (ok, _, _) = crate::common::daemon::novactl(&daemon, &["tier", verb, "t", "--all"]);
    assert!(
        !ok,
        "the move finished although the failpoint should have stopped it"
    );
    let dir = daemon.wait_crash();
    let daemon = Daemon::start_in(dir, &["--blk", spec]);
    let mut c = BlkClient::connect(&daemon.path("t.sock"));
    model.verify(&mut c);
    // And the disk is fully usable: move everything both ways, still the same bytes.
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    demote_all(&mut ctl);
    model.verify(&mut c);
    ctl.call(
        "tier.promote",
        json!({"id": "t", "all": true, "wait": true}),
    )
    .unwrap();
    model.verify(&mut c);
}

#[test]
fn a_crash_at_every_step_of_a_move_loses_nothing() {
    for (point, promote) in CRASH_POINTS {
        eprintln!("crash point {point}");
        crash_at(SPEC, point, promote);
    }
}

#[test]
fn kill_9_at_random_times_during_moves_loses_nothing() {
    let mut model = Model::new();
    let mut dir = tempfile::tempdir().unwrap();
    let mut x: u64 = 0x1234_5678;
    let mut rounds = 0u64;
    let mut mid_move = 0;
    // At least 12 crashes, and until 4 of them landed in the middle of a move (at most 40).
    while rounds < 40 && (rounds < 12 || mid_move < 4) {
        let round = rounds;
        rounds += 1;
        let daemon = Daemon::start_in(dir, &["--blk", SPEC]);
        let mut ctl = Control::connect(&daemon.path("control.sock"));
        {
            let mut c = BlkClient::connect(&daemon.path("t.sock"));
            model.verify(&mut c);
            for i in 0..16u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let offset = (x % (SIZE / 4096)) * 4096;
                model.write(&mut c, offset, &text(round * 100 + i, 4096));
            }
            assert_eq!(c.flush(0), S_OK);
        }
        let method = if round % 2 == 0 {
            "tier.demote"
        } else {
            "tier.promote"
        };
        ctl.call(method, json!({"id": "t", "all": true})).unwrap();
        // Let the background move get somewhere, then crash.
        std::thread::sleep(std::time::Duration::from_millis(x % 6));
        let status = ctl.call("tier.status", json!({"id": "t"})).unwrap();
        if status["progress"]["running"] == true {
            mid_move += 1;
        }
        dir = daemon.kill();
    }
    let daemon = Daemon::start_in(dir, &["--blk", SPEC]);
    let mut c = BlkClient::connect(&daemon.path("t.sock"));
    model.verify(&mut c);
    eprintln!("{rounds} random kill -9 points exercised, {mid_move} of them during a move");
    assert!(mid_move > 0, "no kill landed during a move");
}

/// Waits until `tier.status` satisfies `done`: checked now and after each move the policy
/// thread logs (it logs every time it moves something).
fn wait_status(
    daemon: &mut Daemon,
    ctl: &mut Control,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    for _ in 0..64 {
        let status = ctl.call("tier.status", json!({"id": "t"})).unwrap();
        if done(&status) {
            return status;
        }
        daemon.wait_for_next_log("tier policy");
    }
    panic!("{what} never happened");
}

#[test]
fn the_automatic_policy_keeps_the_budget_demotes_idle_extents_and_promotes_hot_ones() {
    let mut daemon = Daemon::start(&["--blk", SPEC, "--state-dir", "{dir}/state"]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let mut c = BlkClient::connect(&daemon.path("t.sock"));
    let mut model = Model::new();
    fill(&mut c, &mut model, 0..16);
    // Budget: 4 extents' worth of hot data.
    let policy = ctl
        .call("tier.policy", json!({"id": "t", "hot-budget": "256K"}))
        .unwrap();
    assert_eq!(policy["hot_budget"], 256 << 10, "{policy}");
    wait_status(&mut daemon, &mut ctl, "budget demotion", |s| {
        s["cold-extents"] == 12
    });
    model.verify(&mut c);
    // Reads of a cold extent make it hot again after 3 of them.
    ctl.call(
        "tier.policy",
        json!({"id": "t", "hot-budget": null, "promote-after": 3}),
    )
    .unwrap();
    let cold_extent = ctl.call("tier.status", json!({"id": "t"})).unwrap();
    assert_eq!(cold_extent["cold-extents"], 12);
    let first_cold = (0..16u64)
        .find(|e| {
            // A cold extent: reading it counts as a cold read.
            let before = ctl.call("tier.status", json!({"id": "t"})).unwrap()["cold-reads"]
                .as_u64()
                .unwrap();
            c.read(0, e * EXTENT / 512, 4096);
            ctl.call("tier.status", json!({"id": "t"})).unwrap()["cold-reads"]
                .as_u64()
                .unwrap()
                > before
        })
        .unwrap();
    for _ in 0..3 {
        c.read(0, first_cold * EXTENT / 512, 4096);
    }
    wait_status(
        &mut daemon,
        &mut ctl,
        "promotion after repeated reads",
        |s| s["cold-extents"] == 11,
    );
    // Idle extents go cold by themselves.
    ctl.call(
        "tier.policy",
        json!({"id": "t", "promote-after": null, "idle-for": "1s"}),
    )
    .unwrap();
    wait_status(&mut daemon, &mut ctl, "idle demotion", |s| {
        s["cold-extents"] == 16
    });
    model.verify(&mut c);
    // Bad policies change nothing.
    assert_eq!(
        ctl.error_kind("tier.policy", json!({"id": "t", "idle-for": "soon"})),
        "invalid-params"
    );
    assert_eq!(
        ctl.error_kind("tier.policy", json!({"id": "t", "colour": "red"})),
        "invalid-params"
    );
    let status = ctl.call("tier.status", json!({"id": "t"})).unwrap();
    assert_eq!(status["policy"]["idle_for"]["secs"], 1, "{status}");
}
