//! The sandbox is on by default: every thread of a serving daemon runs with no_new_privs and a
//! seccomp filter, and the queue workers (guest-facing) with a second, narrower one;
//! `--sandbox off` runs without. (That forbidden calls are refused is tested in-process by
//! `sandbox::tests`, on threads of their own; the whole suite runs sandboxed.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common::blk::*;
use crate::common::daemon::Daemon;

fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in status"))
}

#[test]
fn every_thread_is_filtered_and_queue_workers_twice() {
    let daemon = Daemon::start(&[
        "--blk",
        "socket={dir}/d0.sock,path={dir}/d0.img,size=1M,queues=2",
        "--net",
        "socket={dir}/n0.sock,switch=s0",
    ]);
    let options = ConnectOptions {
        queues: 2,
        ..Default::default()
    };
    let mut c = BlkClient::connect_with(&daemon.path("d0.sock"), options);
    // Both queues serve a request, so both worker threads have run.
    c.write(0, 0, &pattern(1, 4096));
    c.write(1, 8, &pattern(2, 4096));
    assert!(c.read(1, 0, 4096) == pattern(1, 4096), "data read back");
    let threads = daemon.thread_status();
    let mut workers = 0;
    for (name, status) in &threads {
        assert_eq!(field(status, "Seccomp:"), "2", "thread {name} unfiltered");
        assert_eq!(field(status, "NoNewPrivs:"), "1", "thread {name}");
        let filters: u32 = field(status, "Seccomp_filters:").parse().unwrap();
        if name.starts_with("vring_worker") || name.starts_with("d0") {
            if filters >= 2 {
                workers += 1;
            }
        } else {
            assert!(filters >= 1, "thread {name}");
        }
    }
    assert!(
        workers >= 2,
        "queue workers without their own filter: {threads:?}"
    );
    drop(c);
}

#[test]
fn sandbox_off_runs_unfiltered() {
    let daemon = Daemon::start(&[
        "--sandbox",
        "off",
        "--blk",
        "socket={dir}/d0.sock,path=null,size=1M",
    ]);
    for (name, status) in daemon.thread_status() {
        assert_eq!(field(&status, "Seccomp:"), "0", "thread {name}");
    }
}
