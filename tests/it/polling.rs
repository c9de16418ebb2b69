//! What polling costs: idle devices cost nothing, the adaptive window closes on a sparse queue,
//! a busy-polling device keeps a core busy only within its budget. CPU time is the daemon's own
//! (from /proc), measured over a window; there is no event for "doing nothing", so the sleeps here
//! are the measurement windows, not synchronization.

use std::time::Duration;

use crate::common::blk::{BlkClient, ConnectOptions};
use crate::common::daemon::Daemon;
use crate::common::net::{ethernet, NetClient};

/// The daemon's CPU time over `window`.
fn cpu_over(daemon: &Daemon, window: Duration) -> Duration {
    let before = daemon.cpu_time();
    std::thread::sleep(window);
    daemon.cpu_time() - before
}

#[test]
fn two_hundred_fifty_six_idle_devices_cost_under_one_percent_of_a_core() {
    let specs: Vec<String> = (0..256)
        .map(|i| format!("socket={{dir}}/d{i}.sock,path=null,size=1M"))
        .collect();
    let mut args = Vec::new();
    for spec in &specs {
        args.push("--blk");
        args.push(spec.as_str());
    }
    let daemon = Daemon::start(&args);
    let options = ConnectOptions {
        memory: vec![(0, 8 << 20)],
        ..ConnectOptions::default()
    };
    let mut clients: Vec<BlkClient> = (0..256)
        .map(|i| BlkClient::connect_with(&daemon.path(&format!("d{i}.sock")), options.clone()))
        .collect();
    // Each does some I/O, so every queue has polled at least once, then all go quiet.
    for c in &mut clients {
        c.read(0, 0, 4096);
    }
    let spent = cpu_over(&daemon, Duration::from_secs(2));
    assert!(
        spent <= Duration::from_millis(20),
        "256 idle devices used {spent:?} of CPU in 2 s (more than 1% of a core)"
    );
}

/// The daemon's CPU time while `c` reads every 50 ms for `requests` requests: a sparse load,
/// each request arriving long after the last (the pacing is the load, not synchronization).
fn cpu_for_sparse_reads(daemon: &Daemon, c: &mut BlkClient, requests: u64) -> Duration {
    let before = daemon.cpu_time();
    for i in 0..requests {
        std::thread::sleep(Duration::from_millis(50));
        c.read(0, i % 8, 4096);
    }
    daemon.cpu_time() - before
}

#[test]
fn the_adaptive_window_closes_on_a_sparse_queue() {
    // A 1 ms window that never closed would cost 1 ms of spinning per request (80 ms here);
    // closed, the adaptive device costs what a never-polling one does (CPU time comes in 10 ms
    // ticks, hence the margin).
    let daemon = Daemon::start(&[
        "--blk",
        "socket={dir}/off.sock,path=null,size=1M,poll=off",
        "--blk",
        "socket={dir}/ad.sock,path=null,size=1M,poll=adaptive,poll-us=1000",
    ]);
    let mut off = BlkClient::connect(&daemon.path("off.sock"));
    let mut adaptive = BlkClient::connect(&daemon.path("ad.sock"));
    let off_cost = cpu_for_sparse_reads(&daemon, &mut off, 80);
    let adaptive_cost = cpu_for_sparse_reads(&daemon, &mut adaptive, 80);
    eprintln!("sparse reads: adaptive {adaptive_cost:?}, never polling {off_cost:?}");
    assert!(
        adaptive_cost <= off_cost + Duration::from_millis(30),
        "adaptive polling on a sparse queue cost {adaptive_cost:?}, never polling {off_cost:?}"
    );
}

#[test]
fn busy_polling_stays_within_its_budget() {
    let daemon = Daemon::start(&[
        "--blk",
        "socket={dir}/b.sock,path=null,size=1M,poll=busy,poll-budget=10",
    ]);
    let mut c = BlkClient::connect(&daemon.path("b.sock"));
    c.read(0, 0, 4096);
    // Busy polling runs on after that one request, but at most 10% of each second.
    let spent = cpu_over(&daemon, Duration::from_secs(2));
    assert!(
        spent <= Duration::from_millis(300),
        "busy polling used {spent:?} of CPU in 2 s with a 10% budget"
    );
    // (No lower bound: the budget counts wall time, so on a loaded machine the CPU it
    // amounts to can be anything down to nothing. That busy mode polls at all is shown by
    // the test below, by its behaviour.)
    // The device still serves at once.
    c.read(0, 8, 4096);
}

#[test]
fn a_busy_queue_finds_a_request_posted_without_a_kick() {
    let daemon = Daemon::start(&["--blk", "socket={dir}/b.sock,path=null,size=1M,poll=busy"]);
    let mut c = BlkClient::connect(&daemon.path("b.sock"));
    c.read(0, 0, 4096);
    // No kick: only a queue that polls (and has no budget to run out of) serves it.
    let header = c.header(crate::common::blk::T_IN, 8);
    let data = c.alloc(4096);
    let status = c.alloc(1);
    c.poke(status, &[0xff]);
    let head = c.post_quiet(
        0,
        &[(header, 16, false), (data, 4096, true), (status, 1, true)],
    );
    let used = c.wait(0, 1);
    assert_eq!(used[0].0, head);
    assert_eq!(c.peek(status, 1)[0], 0, "served OK");
}

const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0a];
const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0b];

/// A daemon with two `poll=busy` ports A and B on one switch, both with `options`.
fn busy_ports(options: &str) -> Daemon {
    let a = format!("socket={{dir}}/a.sock,switch=s,mac=52:54:00:00:00:0a,poll=busy{options}");
    let b = format!("socket={{dir}}/b.sock,switch=s,mac=52:54:00:00:00:0b,poll=busy{options}");
    Daemon::start(&["--net", &a, "--net", &b])
}

/// A frame from A to B and one back, each checked on arrival.
fn exchange(a: &mut NetClient, b: &mut NetClient, round: u8) {
    let there = ethernet(B, A, 0x0800, &[round; 60]);
    a.send(0, &there);
    assert_eq!(b.recv(0).frame, there, "round {round}: A to B");
    let back = ethernet(A, B, 0x0800, &[round; 1400]);
    b.send(0, &back);
    assert_eq!(a.recv(0).frame, back, "round {round}: B to A");
}

#[test]
fn busy_switch_ports_are_polled_by_one_thread_within_their_budget() {
    let mut daemon = busy_ports(",poll-budget=10");
    let mut a = NetClient::connect(&daemon.path("a.sock"), 1, 0);
    let mut b = NetClient::connect(&daemon.path("b.sock"), 1, 0);
    a.post_rx(0, 64, 2048);
    b.post_rx(0, 64, 2048);
    // Both directions, a few rounds: the ports join the busy-poll group after their first
    // frame, and frames keep flowing through it.
    for round in 0..16u8 {
        exchange(&mut a, &mut b, round);
    }
    // A worker joins at the end of its first busy spell, which may outlast the exchanges:
    // wait for the group to say it polls both.
    daemon.wait_for_log("(2 polled)");
    // One thread polls both ports: named `busy-poll`, and the only one that does.
    let names = daemon.thread_names();
    assert_eq!(
        names.iter().filter(|n| *n == "busy-poll").count(),
        1,
        "{names:?}"
    );
    // Idle now: the group polls on, but both ports stop at 10% of each second.
    let spent = cpu_over(&daemon, Duration::from_secs(2));
    assert!(
        spent <= Duration::from_millis(600),
        "busy polling used {spent:?} of CPU in 2 s with two ports at 10% each"
    );
    // Back on kicks, they still forward at once.
    let late = ethernet(B, A, 0x0800, &[0xee; 60]);
    a.send(0, &late);
    assert_eq!(b.recv(0).frame, late);
}

#[test]
fn a_busy_switch_port_whose_front_end_vanishes_serves_the_next_one() {
    let daemon = busy_ports("");
    let mut b = NetClient::connect(&daemon.path("b.sock"), 1, 0);
    b.post_rx(0, 256, 2048);
    // Each front-end of A sends, receives, then goes away without stopping its queues (its
    // port is in the busy-poll group all the while); the next one must get its frames.
    for round in 0..6u8 {
        let mut a = NetClient::connect(&daemon.path("a.sock"), 1, 0);
        a.post_rx(0, 16, 2048);
        exchange(&mut a, &mut b, round);
        drop(a);
    }
}
