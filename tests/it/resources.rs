//! What a front-end's connections cost the daemon: file descriptors and threads must come
//! back to where they were after any number of connect/disconnect cycles.

use crate::common::blk::{BlkClient, ConnectOptions};
use crate::common::daemon::Daemon;
use crate::common::net::NetClient;

/// Connects and disconnects `cycles` times with `connect`, each time waiting for the daemon to
/// log the disconnect; returns the fd and thread counts after a few warm-up cycles (one-time
/// set-up such as a lazily opened fd is not a leak) and after the last.
fn cycle(
    daemon: &mut Daemon,
    id: &str,
    cycles: usize,
    mut connect: impl FnMut(&Daemon),
) -> ((usize, usize), (usize, usize)) {
    let disconnected = format!("{id}: front-end disconnected");
    const WARM_UP: usize = 10;
    for _ in 0..WARM_UP {
        connect(daemon);
        daemon.wait_for_next_log(&disconnected);
    }
    let first = (daemon.fd_count(), daemon.thread_count());
    for _ in WARM_UP..cycles {
        connect(daemon);
        daemon.wait_for_next_log(&disconnected);
    }
    (first, (daemon.fd_count(), daemon.thread_count()))
}

#[test]
fn fds_and_threads_stay_flat_over_a_thousand_connections() {
    let mut d = Daemon::start(&[
        "--blk",
        "socket={dir}/b.sock,path={dir}/b.img,size=4M,queues=2",
        "--net",
        "socket={dir}/n.sock,switch=s0,queues=2,mac=52:54:00:00:00:01,id=n",
    ]);
    let blk_socket = d.path("b.sock");
    let options = ConnectOptions {
        queues: 2,
        ..ConnectOptions::default()
    };
    let (first, last) = cycle(&mut d, "b", 500, |_| {
        drop(BlkClient::connect_with(&blk_socket, options.clone()));
    });
    assert_eq!(first, last, "block connections leak (fds, threads)");
    let net_socket = d.path("n.sock");
    let (first, last) = cycle(&mut d, "n", 500, |_| {
        drop(NetClient::connect(&net_socket, 2, 0));
    });
    assert_eq!(first, last, "net connections leak (fds, threads)");
}
