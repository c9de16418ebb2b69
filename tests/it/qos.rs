//! QoS on block devices through the real vhost-user protocol: limits hold requests back
//! (never fail them), change live over the control socket, and oversized requests still run.
//! Rates are checked to ±10% of what the token bucket allows (plus the same work's
//! unthrottled time, measured in the same test); `scripts/qos-accuracy.sh` measures them
//! precisely over longer windows.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use crate::common::assert_rate;
use crate::common::blk::{pattern, BlkClient, S_OK, T_DISCARD, T_IN, T_OUT, T_WRITE_ZEROES};
use crate::common::control::Control;
use crate::common::daemon::{novactl, Daemon};
use serde_json::json;

/// Issues `count` 4 KiB writes with `depth` in flight on queue 0; returns the elapsed time.
fn burst_of_writes(c: &mut BlkClient, count: u64, depth: u64) -> Duration {
    let start = Instant::now();
    burst_with_times(c, count, depth);
    start.elapsed()
}

/// Like [`burst_of_writes`]; returns when each batch of writes completed (and how many).
fn burst_with_times(c: &mut BlkClient, count: u64, depth: u64) -> Vec<(Instant, u64)> {
    let mut completed = Vec::new();
    let mut sent = 0;
    while sent < count {
        let batch = depth.min(count - sent);
        let mut statuses = Vec::new();
        for i in 0..batch {
            let sector = ((sent + i) % 1024) * 8;
            let header = c.header(T_OUT, sector);
            let data = c.alloc(4096);
            c.poke(data, &pattern(sent + i, 4096));
            let status = c.alloc(1);
            c.poke(status, &[0xff]);
            c.post(
                0,
                &[(header, 16, false), (data, 4096, false), (status, 1, true)],
            );
            statuses.push(status);
        }
        c.wait(0, batch as usize);
        for status in statuses {
            assert_eq!(c.peek(status, 1)[0], S_OK, "a throttled request failed");
        }
        sent += batch;
        completed.push((Instant::now(), batch));
    }
    completed
}

#[test]
fn an_iops_limit_holds_requests_back_without_failing_them() {
    let daemon = Daemon::start(&[
        "--blk",
        "socket={dir}/q.sock,path={dir}/q.img,size=8M,iops=200",
        "--blk",
        "socket={dir}/u.sock,path={dir}/u.img,size=8M",
    ]);
    let mut c = BlkClient::connect(&daemon.path("q.sock"));
    let baseline = burst_of_writes(&mut BlkClient::connect(&daemon.path("u.sock")), 400, 16);
    // 400 writes at 200/s with 20 of initial room (0.1 s of burst): (400 - 20) / 200 = 1.9 s.
    let elapsed = burst_of_writes(&mut c, 400, 16);
    assert_rate(
        "400 writes at 200 IOPS",
        elapsed,
        Duration::from_millis(1900),
        baseline,
    );
    // Every write landed.
    for i in [0u64, 199, 399] {
        assert_eq!(c.read(0, (i % 1024) * 8, 4096), pattern(i, 4096));
    }
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let qos = ctl.call("qos.get", json!({"id": "q"})).unwrap();
    assert_eq!(qos["limits"]["iops"]["per_second"], 200);
    assert!(qos["throttled"].as_u64().unwrap() > 0);
    assert!(qos["throttle-wait-ns"].as_u64().unwrap() > 0);
    assert!(qos["tokens"]["iops"].as_i64().unwrap() <= 20, "{qos}");
}

#[test]
fn limits_change_live_and_bad_values_change_nothing() {
    let daemon = Daemon::start(&["--blk", "socket={dir}/q.sock,path={dir}/q.img,size=8M"]);
    let mut c = BlkClient::connect(&daemon.path("q.sock"));
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let fast = burst_of_writes(&mut c, 200, 16);

    let set = ctl
        .call("qos.set", json!({"id": "q", "iops": 100}))
        .unwrap();
    assert_eq!(set["limits"]["iops"]["per_second"], 100);
    // The new bucket starts full (10 requests of burst): (100 - 10) / 100 = 0.9 s.
    let slow = burst_of_writes(&mut c, 100, 16);
    assert_rate(
        "100 writes at 100 IOPS",
        slow,
        Duration::from_millis(900),
        fast / 2,
    );

    for bad in [
        json!({"id": "q", "iops": 0}),
        json!({"id": "q", "iops": -5}),
        json!({"id": "q", "iops-burst": 10}),
        json!({"id": "q", "queues": 4}),
        json!({"id": "q", "bps": "lots"}),
        json!({"id": "q"}),
    ] {
        assert_eq!(
            ctl.error_kind("qos.set", bad.clone()),
            "invalid-params",
            "{bad}"
        );
    }
    assert_eq!(
        ctl.error_kind("qos.set", json!({"id": "nope", "iops": 5})),
        "not-found"
    );
    assert_eq!(
        ctl.call("qos.get", json!({"id": "q"})).unwrap()["limits"]["iops"]["per_second"],
        100
    );

    ctl.call("qos.set", json!({"id": "q", "iops": null}))
        .unwrap();
    let again = burst_of_writes(&mut c, 200, 16);
    assert!(
        again < Duration::from_millis(1500),
        "limit not removed: {again:?} (unlimited took {fast:?})"
    );
}

#[test]
fn a_request_larger_than_the_bucket_still_runs() {
    // 64 KiB/s leaves ~6.5 KiB of room; a 1 MiB read must still complete (in debt).
    let daemon = Daemon::start(&[
        "--blk",
        "socket={dir}/q.sock,path={dir}/q.img,size=8M,bps=64K",
    ]);
    let mut c = BlkClient::connect(&daemon.path("q.sock"));
    let reply = c.request(0, T_IN, 0, &[], 1 << 20);
    assert_eq!(reply.status, S_OK);
    // The next small request waits for the debt (~16 s); a flush moves no bytes, so a byte
    // limit never holds it back.
    assert_eq!(c.flush(0), S_OK);
}

#[test]
fn flushes_and_discards_are_charged() {
    // Before: a flush cost nothing (never held back by an IOPS limit) and a discard or
    // write-zeroes cost no bytes, so a guest could fsync or zero without limit.
    let daemon = Daemon::start(&[
        "--blk",
        "socket={dir}/f.sock,path={dir}/f.img,size=8M,iops=10",
        "--blk",
        "socket={dir}/z.sock,path={dir}/z.img,size=8M,write-bps=64K",
    ]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let tokens = |ctl: &mut Control, id: &str, limit: &str| {
        ctl.call("qos.get", json!({"id": id})).unwrap()["tokens"][limit]
            .as_i64()
            .unwrap()
    };
    let mut f = BlkClient::connect(&daemon.path("f.sock"));
    assert_eq!(tokens(&mut ctl, "f", "iops"), 1, "10/s: one token of room");
    assert_eq!(f.flush(0), S_OK);
    // 10 tokens a second: well under one more in the time a call takes.
    assert_eq!(tokens(&mut ctl, "f", "iops"), 0, "the flush took the token");

    let mut z = BlkClient::connect(&daemon.path("z.sock"));
    // One segment: 8192 sectors (4 MiB) from sector 0.
    let mut segment = Vec::new();
    segment.extend_from_slice(&0u64.to_le_bytes());
    segment.extend_from_slice(&8192u32.to_le_bytes());
    segment.extend_from_slice(&0u32.to_le_bytes());
    for kind in [T_DISCARD, T_WRITE_ZEROES] {
        // A fresh bucket (full) for each: the first leaves ~64 s of debt.
        ctl.call("qos.set", json!({"id": "z", "write-bps": "64K"}))
            .unwrap();
        let before = tokens(&mut ctl, "z", "write-bps");
        assert_eq!(z.request(0, kind, 0, &segment, 0).status, S_OK);
        let after = tokens(&mut ctl, "z", "write-bps");
        // Charged up to the 1 MiB cap (the range is 4 MiB).
        assert!(
            before - after > 1_000_000,
            "request type {kind}: 1 MiB charged ({before} -> {after})"
        );
    }
}

#[test]
fn queue_stop_answers_requests_that_were_held_back() {
    let daemon = Daemon::start(&[
        "--blk",
        "socket={dir}/q.sock,path={dir}/q.img,size=8M,iops=10",
    ]);
    let mut c = BlkClient::connect(&daemon.path("q.sock"));
    // 1 token of room: the rest wait ~100 ms each.
    let mut statuses = Vec::new();
    for i in 0..8u64 {
        let header = c.header(T_OUT, i * 8);
        let data = c.alloc(4096);
        let status = c.alloc(1);
        c.poke(status, &[0xff]);
        c.post(
            0,
            &[(header, 16, false), (data, 4096, false), (status, 1, true)],
        );
        statuses.push(status);
    }
    // The first write completes at once; the device then holds the second and leaves the rest
    // in the ring.
    c.wait(0, 1);
    // GET_VRING_BASE (queue stop) must answer every request it took off the ring.
    use vhost::VhostBackend;
    let base = c.frontend.get_vring_base(0).unwrap();
    let used = u16::from_le_bytes(c.peek(c.queues[0].used + 2, 2).try_into().unwrap());
    assert_eq!(
        u32::from(used),
        base,
        "popped requests left unanswered at queue stop"
    );
    assert!(
        base >= 2,
        "the held-back request was not taken: base {base}"
    );
    let answered = statuses
        .iter()
        .filter(|s| c.peek(**s, 1)[0] == S_OK)
        .count();
    assert_eq!(answered, usize::from(used));
}

#[test]
fn novactl_sets_and_shows_limits() {
    let daemon = Daemon::start(&["--blk", "socket={dir}/q.sock,path={dir}/q.img,size=8M"]);
    let (ok, _, err) = novactl(&daemon, &["qos", "set", "q", "iops=300,write-bps=10M"]);
    assert!(ok, "{err}");
    let (ok, out, _) = novactl(&daemon, &["--json", "qos", "get", "q"]);
    assert!(ok);
    let qos: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(qos["limits"]["iops"]["per_second"], 300);
    assert_eq!(qos["limits"]["write-bps"]["per_second"], 10 << 20);
    let (ok, _, _) = novactl(&daemon, &["qos", "set", "q", "iops=none"]);
    assert!(ok);
    let (_, out, _) = novactl(&daemon, &["--json", "qos", "get", "q"]);
    let qos: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(qos["limits"].get("iops").is_none());
    let (ok, _, err) = novactl(&daemon, &["qos", "set", "q", "iops=0"]);
    assert!(!ok && err.contains("invalid-params"), "{err}");
    let (ok, _, err) = novactl(&daemon, &["qos", "group", "add", "g1", "iops=1000,bps=1G"]);
    assert!(ok, "{err}");
    let (ok, _, _) = novactl(&daemon, &["qos", "set", "q", "qos-group=g1"]);
    assert!(ok);
    let (ok, out, _) = novactl(&daemon, &["qos", "group", "ls"]);
    // Members listed by name (a list of names prints as `a,b`).
    let g1 = out
        .lines()
        .find(|l| l.starts_with("g1"))
        .unwrap_or_default();
    assert!(ok && g1.trim_end().ends_with(" q"), "{out}");
    let (ok, _, err) = novactl(&daemon, &["qos", "group", "rm", "g1"]);
    assert!(!ok && err.contains("busy"), "{err}");
    let (ok, _, _) = novactl(&daemon, &["qos", "set", "q", "qos-group=none"]);
    assert!(ok);
    let (ok, _, err) = novactl(&daemon, &["qos", "group", "rm", "g1"]);
    assert!(ok, "{err}");
}

#[test]
fn a_group_caps_its_members_together_and_shares_fairly() {
    let daemon = Daemon::start(&["--state-dir", "{dir}/state"]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    ctl.call("qos.group.add", json!({"name": "tenant7", "iops": 200}))
        .unwrap();
    for id in ["ga", "gb"] {
        ctl.call(
            "device.add",
            json!({"type": "blk", "id": id, "socket": daemon.path(&format!("{id}.sock")),
                   "path": daemon.path(&format!("{id}.img")), "size": "8M", "qos-group": "tenant7"}),
        )
        .unwrap();
    }
    // Two guests write flat out at once; the group allows 200/s for both together.
    let both = |sockets: [std::path::PathBuf; 2]| {
        let start = Instant::now();
        let workers: Vec<_> = sockets
            .into_iter()
            .map(|socket| {
                std::thread::spawn(move || {
                    let mut c = BlkClient::connect(&socket);
                    burst_with_times(&mut c, 200, 8)
                })
            })
            .collect();
        let done: Vec<Vec<(Instant, u64)>> =
            workers.into_iter().map(|w| w.join().unwrap()).collect();
        (start.elapsed(), done)
    };
    // The same load on two devices outside the group: the baseline.
    for id in ["ua", "ub"] {
        ctl.call(
            "device.add",
            json!({"type": "blk", "id": id, "socket": daemon.path(&format!("{id}.sock")),
                   "path": daemon.path(&format!("{id}.img")), "size": "8M"}),
        )
        .unwrap();
    }
    let (baseline, _) = both([daemon.path("ua.sock"), daemon.path("ub.sock")]);
    let (total, done) = both([daemon.path("ga.sock"), daemon.path("gb.sock")]);
    // 400 writes at 200/s with 20 of room: (400 - 20) / 200 = 1.9 s.
    assert_rate(
        "two members, 400 writes at 200 IOPS",
        total,
        Duration::from_millis(1900),
        baseline,
    );
    // Fair: while both were busy (until the first finished), each got a similar share. Counted
    // in requests, not finish times, so a test thread scheduled late does not look unfair.
    let first_end = done.iter().map(|d| d.last().unwrap().0).min().unwrap();
    let shares: Vec<u64> = done
        .iter()
        .map(|d| {
            d.iter()
                .filter(|(t, _)| *t <= first_end)
                .map(|(_, n)| n)
                .sum()
        })
        .collect();
    let (low, high) = (shares[0].min(shares[1]), shares[0].max(shares[1]));
    assert!(
        low as f64 >= high as f64 * 0.75,
        "unfair shares while both were busy: {shares:?}"
    );

    let groups = ctl.call("qos.group.list", json!({})).unwrap();
    assert_eq!(groups[0]["members"], json!(["ga", "gb"]));
    assert!(groups[0]["waits"].as_u64().unwrap() > 0, "{groups}");
    assert!(groups[0]["tokens"]["iops"].as_i64().unwrap() <= 20);
    assert_eq!(
        ctl.error_kind("qos.group.remove", json!({"name": "tenant7"})),
        "busy"
    );
    for bad in [
        json!({"name": "t2"}),
        json!({"name": "t2", "iops": 0}),
        json!({"name": "t2", "queues": 1}),
        json!({"name": "bad/name", "iops": 5}),
    ] {
        assert_eq!(
            ctl.error_kind("qos.group.add", bad.clone()),
            "invalid-params",
            "{bad}"
        );
    }
    assert_eq!(
        ctl.error_kind("qos.group.add", json!({"name": "tenant7", "iops": 5})),
        "exists"
    );
    assert_eq!(
        ctl.error_kind("qos.set", json!({"id": "ga", "qos-group": "nope"})),
        "not-found"
    );
    ctl.call("qos.group.set", json!({"name": "tenant7", "iops": 500}))
        .unwrap();

    // Groups and membership survive a restart.
    drop(ctl);
    let (status, dir) = daemon.terminate();
    assert!(status.success());
    let daemon = Daemon::start_in(dir, &["--state-dir", "{dir}/state"]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let groups = ctl.call("qos.group.list", json!({})).unwrap();
    assert_eq!(groups[0]["limits"]["iops"]["per_second"], 500);
    assert_eq!(
        ctl.call("qos.get", json!({"id": "gb"})).unwrap()["group"],
        "tenant7"
    );
    // Leaving the group, then removing it.
    ctl.call("qos.set", json!({"id": "ga", "qos-group": null}))
        .unwrap();
    ctl.call("qos.set", json!({"id": "gb", "qos-group": null}))
        .unwrap();
    ctl.call("qos.group.remove", json!({"name": "tenant7"}))
        .unwrap();
    assert_eq!(ctl.call("qos.group.list", json!({})).unwrap(), json!([]));
}
