//! A hostile guest: every malformed request of the blk issue's list, sent through the real
//! vhost-user protocol. Each must get IOERR/UNSUPP when a status byte is writable (else the
//! head comes back with length 0), and the queue must go on serving good requests.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common::blk::*;
use crate::common::daemon::Daemon;
use crate::common::virtq::{Desc, F_INDIRECT, F_NEXT, F_WRITE};
use std::os::fd::AsRawFd;
use vhost::VhostBackend;

const CAPACITY_SECTORS: u64 = 16 << 11;

fn daemon(extra: &str) -> Daemon {
    Daemon::start(&[
        "--blk",
        &format!("socket={{dir}}/d.sock,path={{dir}}/d.img,size=16M{extra}"),
    ])
}

/// After a bad request, a good write + read on the same queue still works.
fn still_serving(c: &mut BlkClient, seed: u64) {
    let data = pattern(seed, 4096);
    c.write(0, 800, &data);
    assert_eq!(
        c.read(0, 800, 4096),
        data,
        "queue stopped serving after a bad request"
    );
}

/// Posts raw descriptors (already linked) with the first as head; returns used length.
/// A well-formed request chain laid out at indices 0..3: header, `len` bytes of data
/// (device-writable for a read), status.
fn request_chain(header: u64, data: u64, len: u32, read: bool, status: u64) -> [Desc; 3] {
    let data_flags = if read { F_NEXT | F_WRITE } else { F_NEXT };
    [
        Desc {
            addr: header,
            len: 16,
            flags: F_NEXT,
            next: 1,
        },
        Desc {
            addr: data,
            len,
            flags: data_flags,
            next: 2,
        },
        Desc {
            addr: status,
            len: 1,
            flags: F_WRITE,
            next: 0,
        },
    ]
}

fn post_raw(c: &mut BlkClient, descs: &[Desc]) -> u32 {
    let mem = &c.mem.mem;
    let q = &mut c.queues[0];
    let head = q.write_descs(mem, descs);
    q.publish(mem, head);
    let used = q.wait_used(mem, 1, TIMEOUT);
    assert_eq!(used[0].0, head);
    used[0].1
}

fn status_of(c: &BlkClient, at: u64) -> u8 {
    c.peek(at, 1)[0]
}

#[test]
fn bad_requests_get_ioerr_or_unsupp_and_the_queue_goes_on() {
    let d = daemon("");
    let mut c = BlkClient::connect(&d.path("d.sock"));
    let status = c.alloc(1);
    let data = c.alloc(8192);
    let case = |c: &mut BlkClient, name: &str, buffers: Vec<(u64, u32, bool)>, want: u8| {
        c.poke(status, &[0xff]);
        let used = c.roundtrip(0, &buffers);
        assert_eq!(status_of(c, status), want, "{name}: wrong status");
        assert_eq!(used, 1, "{name}: used length");
        still_serving(c, name.len() as u64);
    };

    let h = c.header(T_IN, 0);
    case(
        &mut c,
        "data not a multiple of 512",
        vec![(h, 16, false), (data, 100, true), (status, 1, true)],
        S_IOERR,
    );
    let h = c.header(T_IN, CAPACITY_SECTORS);
    case(
        &mut c,
        "read past capacity",
        vec![(h, 16, false), (data, 512, true), (status, 1, true)],
        S_IOERR,
    );
    let h = c.header(T_OUT, CAPACITY_SECTORS - 1);
    case(
        &mut c,
        "write straddling capacity",
        vec![(h, 16, false), (data, 1024, false), (status, 1, true)],
        S_IOERR,
    );
    let h = c.header(T_IN, u64::MAX / 256);
    case(
        &mut c,
        "sector overflow",
        vec![(h, 16, false), (data, 512, true), (status, 1, true)],
        S_IOERR,
    );
    let h = c.header(T_IN, 0);
    case(
        &mut c,
        "data outside guest memory",
        vec![(h, 16, false), (1 << 40, 4096, true), (status, 1, true)],
        S_IOERR,
    );
    let h = c.header(T_IN, 0);
    case(
        &mut c,
        "data address wraps",
        vec![
            (h, 16, false),
            (u64::MAX - 511, 4096, true),
            (status, 1, true),
        ],
        S_IOERR,
    );
    let h = c.header(T_IN, 0);
    case(
        &mut c,
        "header in a writable buffer",
        vec![(h, 16, true), (data, 512, true), (status, 1, true)],
        S_IOERR,
    );
    let h = c.header(T_IN, 0);
    case(
        &mut c,
        "short header",
        vec![(h, 8, false), (data, 512, true), (status, 1, true)],
        S_IOERR,
    );
    let h = c.header(T_IN, 0);
    case(
        &mut c,
        "readable after writable",
        vec![
            (h, 16, false),
            (data, 512, true),
            (data + 4096, 512, false),
            (status, 1, true),
        ],
        S_IOERR,
    );
    let h = c.header(T_GET_ID, 0);
    case(
        &mut c,
        "GET_ID buffer too small",
        vec![(h, 16, false), (data, 19, true), (status, 1, true)],
        S_IOERR,
    );
    let h = c.header(0x7777, 0);
    case(
        &mut c,
        "unknown request type",
        vec![(h, 16, false), (status, 1, true)],
        S_UNSUPP,
    );
    let h = c.header(T_DISCARD, 0);
    c.poke(data, &[0u8; 33 * 16]);
    case(
        &mut c,
        "too many discard segments",
        vec![(h, 16, false), (data, 33 * 16, false), (status, 1, true)],
        S_IOERR,
    );
    let h = c.header(T_WRITE_ZEROES, 0);
    case(
        &mut c,
        "ragged segment list",
        vec![(h, 16, false), (data, 20, false), (status, 1, true)],
        S_IOERR,
    );
    let h = c.header(T_DISCARD, 0);
    let mut seg = Vec::new();
    seg.extend_from_slice(&0u64.to_le_bytes());
    seg.extend_from_slice(&8u32.to_le_bytes());
    seg.extend_from_slice(&0x8000_0000u32.to_le_bytes());
    c.poke(data, &seg);
    case(
        &mut c,
        "reserved segment flag",
        vec![(h, 16, false), (data, 16, false), (status, 1, true)],
        S_UNSUPP,
    );
}

#[test]
fn chains_without_a_usable_status_come_back_empty() {
    let d = daemon("");
    let mut c = BlkClient::connect(&d.path("d.sock"));
    let data = c.alloc(4096);

    // No device-writable byte at all: nowhere to put a status.
    let h = c.header(T_IN, 0);
    assert_eq!(c.roundtrip(0, &[(h, 16, false), (data, 512, false)]), 0);
    still_serving(&mut c, 1);

    // Status byte outside guest memory.
    let h = c.header(T_IN, 0);
    assert_eq!(
        c.roundtrip(0, &[(h, 16, false), (data, 512, true), (1 << 40, 1, true)]),
        0
    );
    still_serving(&mut c, 2);

    // A chain that loops back on itself (longer than the queue).
    let h = c.header(T_IN, 0);
    let start = 100u16;
    let descs = [
        Desc {
            addr: h,
            len: 16,
            flags: F_NEXT,
            next: start + 1,
        },
        Desc {
            addr: data,
            len: 512,
            flags: F_NEXT | F_WRITE,
            next: start,
        },
    ];
    {
        let q = &mut c.queues[0];
        // Place the loop at fixed slots 100/101.
        let mem = &c.mem.mem;
        while q.write_descs(mem, &[]) != start {
            q.write_descs(
                mem,
                &[Desc {
                    addr: 0,
                    len: 0,
                    flags: 0,
                    next: 0,
                }],
            );
        }
    }
    assert_eq!(post_raw(&mut c, &descs), 0);
    still_serving(&mut c, 3);
}

#[test]
fn indirect_tables_valid_nested_and_malformed() {
    let d = daemon("");
    let mut c = BlkClient::connect(&d.path("d.sock"));
    let status = c.alloc(1);
    let data = c.alloc(4096);
    let table = c.alloc(64);
    let write_table = |c: &BlkClient, entries: &[Desc]| {
        let mut raw = Vec::new();
        for e in entries {
            raw.extend_from_slice(&e.addr.to_le_bytes());
            raw.extend_from_slice(&e.len.to_le_bytes());
            raw.extend_from_slice(&e.flags.to_le_bytes());
            raw.extend_from_slice(&e.next.to_le_bytes());
        }
        c.poke(table, &raw);
    };

    // A valid request through an indirect table.
    c.poke(data, &pattern(7, 4096));
    let h = c.header(T_OUT, 40);
    write_table(&c, &request_chain(h, data, 4096, false, status));
    c.poke(status, &[0xff]);
    assert_eq!(
        post_raw(
            &mut c,
            &[Desc {
                addr: table,
                len: 48,
                flags: F_INDIRECT,
                next: 0
            }]
        ),
        1
    );
    assert_eq!(status_of(&c, status), S_OK);
    assert_eq!(c.read(0, 40, 4096), pattern(7, 4096));

    // An indirect descriptor inside an indirect table.
    write_table(
        &c,
        &[
            Desc {
                addr: h,
                len: 16,
                flags: F_NEXT,
                next: 1,
            },
            Desc {
                addr: table,
                len: 48,
                flags: F_INDIRECT,
                next: 0,
            },
        ],
    );
    assert_eq!(
        post_raw(
            &mut c,
            &[Desc {
                addr: table,
                len: 32,
                flags: F_INDIRECT,
                next: 0
            }]
        ),
        0
    );
    still_serving(&mut c, 4);

    // A table whose length is not a multiple of 16.
    assert_eq!(
        post_raw(
            &mut c,
            &[Desc {
                addr: table,
                len: 40,
                flags: F_INDIRECT,
                next: 0
            }]
        ),
        0
    );
    still_serving(&mut c, 5);

    // A table outside guest memory.
    assert_eq!(
        post_raw(
            &mut c,
            &[Desc {
                addr: 1 << 40,
                len: 48,
                flags: F_INDIRECT,
                next: 0
            }]
        ),
        0
    );
    still_serving(&mut c, 6);
}

#[test]
fn a_front_end_shrinking_its_memory_file_does_not_end_the_daemon() {
    // Before: the daemon's next access to the shrunk region raised SIGBUS, and the whole
    // process (every tenant) died.
    let mut d = Daemon::start(&[
        "--blk",
        "socket={dir}/bad.sock,path={dir}/bad.img,size=4M",
        "--blk",
        "socket={dir}/good.sock,path={dir}/good.img,size=4M",
    ]);
    let options = ConnectOptions {
        memory: vec![(0, 32 << 20), (1 << 30, 64 << 10)],
        ..Default::default()
    };
    let mut bad = BlkClient::connect_with(&d.path("bad.sock"), options);
    let mut good = BlkClient::connect(&d.path("good.sock"));
    // The request header lives in the second region, which the front-end then truncates.
    let header = 1u64 << 30;
    bad.poke(header, &[0u8; 16]);
    bad.mem.truncate_region(1, 0);
    let data = bad.alloc(4096);
    let status = bad.alloc(1);
    bad.poke(status, &[0xff]);
    post_raw(&mut bad, &request_chain(header, data, 4096, true, status));
    // The header read as zeros (a read of sector 0): answered, and everyone goes on.
    assert_eq!(status_of(&bad, status), S_OK);
    still_serving(&mut bad, 1);
    good.write(0, 8, &pattern(2, 4096));
    assert_eq!(good.read(0, 8, 4096), pattern(2, 4096));
    drop(bad);
    d.wait_for_log("bad: the front-end shrank its guest memory files under us");
}

#[test]
fn other_devices_are_unaffected_by_a_hostile_one() {
    let d = Daemon::start(&[
        "--blk",
        "socket={dir}/bad.sock,path={dir}/bad.img,size=4M",
        "--blk",
        "socket={dir}/good.sock,path={dir}/good.img,size=4M",
    ]);
    let mut bad = BlkClient::connect(&d.path("bad.sock"));
    let mut good = BlkClient::connect(&d.path("good.sock"));
    for i in 0..50u64 {
        let h = bad.header(T_IN, u64::MAX - i);
        let s = bad.alloc(1);
        bad.roundtrip(0, &[(h, 16, false), (1 << 40, 512, true), (s, 1, true)]);
        good.write(0, i * 8, &pattern(i, 4096));
    }
    for i in 0..50u64 {
        assert_eq!(good.read(0, i * 8, 4096), pattern(i, 4096));
    }
}

#[test]
fn bad_vhost_user_setup_is_refused() {
    let d = daemon(",queue-size=128");
    let socket = d.path("d.sock");
    let options = ConnectOptions {
        queue_size: 128,
        ..Default::default()
    };

    // Each bad value is NACKed (REPLY_ACK) and the daemon drops that front-end.
    for (queue, size) in [(0usize, 0u16), (0, 256), (5, 128)] {
        let c = BlkClient::negotiate(&socket, &options);
        assert!(
            c.frontend.set_vring_num(queue, size).is_err(),
            "queue {queue} size {size} accepted"
        );
    }
    // A size that is not a power of two: the queue is never touched.
    let mut c = BlkClient::negotiate(&socket, &options);
    c.setup_queue(0, 100);
    let h = c.header(T_IN, 0);
    let s = c.alloc(1);
    let data = c.alloc(512);
    c.post(0, &[(h, 16, false), (data, 512, true), (s, 1, true)]);
    // Negative check: give the daemon time to (wrongly) answer, then look at the used ring.
    let call = c.queues[0].call.as_raw_fd();
    let mut pfd = libc::pollfd {
        fd: call,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, 300) };
    assert_eq!(ready, 0, "device signalled a queue it should have refused");
    let used_idx = u16::from_le_bytes(c.peek(c.queues[0].used + 2, 2).try_into().unwrap());
    assert_eq!(used_idx, 0, "device used a queue of invalid size");
    drop(c);
    // A well-behaved front-end is then served normally.
    let mut c = BlkClient::connect_with(&socket, options);
    still_serving(&mut c, 8);
}

#[test]
fn a_corrupt_avail_index_does_not_make_the_worker_spin() {
    // The guest claims 1000 new buffers on a 256-entry ring. The ring engine refuses to walk
    // it; the worker must then stop trying (and count it), not loop on "more available".
    let d = Daemon::start(&[
        "--blk",
        "socket={dir}/bad.sock,path={dir}/bad.img,size=4M",
        "--blk",
        "socket={dir}/good.sock,path={dir}/good.img,size=4M",
    ]);
    let bad = BlkClient::connect(&d.path("bad.sock"));
    let mut good = BlkClient::connect(&d.path("good.sock"));
    let avail_idx = bad.queues[0].avail + 2;
    bad.poke(avail_idx, &1000u16.to_le_bytes());
    bad.queues[0].kick.write(1).unwrap();
    // The device answers stats requests, so it is not stuck in the queue's lock...
    let mut ctl = crate::common::control::Control::connect(&d.path("control.sock"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let stats = loop {
        let stats = ctl
            .call("device.stats", serde_json::json!({"id": "bad"}))
            .unwrap();
        if stats["queues"][0]["ring_errors"].as_u64().unwrap() > 0 {
            break stats;
        }
        // The kick is handled asynchronously; the counter is the signal we wait for.
        assert!(
            std::time::Instant::now() < deadline,
            "corrupt ring never reported"
        );
        std::thread::yield_now();
    };
    // One per event that looked at the ring: the kick, and the queue's start if it ran after
    // the corrupt index was written (the two race).
    let errors = stats["queues"][0]["ring_errors"].as_u64().unwrap();
    assert!(errors <= 2, "{stats}");
    // ...and it is idle, not spinning on the broken ring: the count stays.
    d.assert_idle();
    let again = ctl
        .call("device.stats", serde_json::json!({"id": "bad"}))
        .unwrap();
    assert_eq!(again["queues"][0]["ring_errors"].as_u64().unwrap(), errors);
    // The other device never noticed.
    still_serving(&mut good, 9);
}

#[test]
fn a_head_published_again_while_in_flight_is_served_once() {
    // A guest puts one request's head in the available ring 200 times with one index update.
    // The device takes the head once; the 199 copies are a broken ring: counted, skipped,
    // never executed or completed (they would complete one request 200 times and let a guest
    // make the daemon hold unbounded work). The queue keeps serving afterwards.
    let d = Daemon::start(&["--blk", "socket={dir}/d.sock,path={dir}/d.img,size=4M"]);
    let mut c = BlkClient::connect(&d.path("d.sock"));
    let header = c.header(T_OUT, 8);
    let data = c.alloc(512);
    c.poke(data, &pattern(3, 512));
    let status = c.alloc(1);
    let descs = request_chain(header, data, 512, false, status);
    let head = {
        let mem = &c.mem.mem;
        let q = &mut c.queues[0];
        let head = q.write_descs(mem, &descs);
        q.publish_repeated(mem, head, 200);
        head
    };
    let mut ctl = crate::common::control::Control::connect(&d.path("control.sock"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let stats = ctl
            .call("device.stats", serde_json::json!({"id": "d"}))
            .unwrap();
        let errors = stats["queues"][0]["ring_errors"].as_u64().unwrap();
        if errors >= 199 {
            assert_eq!(errors, 199, "every copy counted once");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "re-published heads never reported: {stats}"
        );
        std::thread::yield_now();
    }
    let used = c.wait(0, 1);
    assert_eq!(used, vec![(head, 1)]);
    let used_idx = u16::from_le_bytes(c.peek(c.queues[0].used + 2, 2).try_into().unwrap());
    assert_eq!(used_idx, 1, "the request was completed more than once");
    assert_eq!(c.peek(status, 1)[0], S_OK);
    still_serving(&mut c, 10);
}

#[test]
fn a_head_beyond_the_ring_does_not_stop_the_requests_behind_it() {
    // One kick publishes a head past the end of the ring, then a valid request. The bad entry
    // is counted and skipped; the valid one completes (the queue never stops silently).
    let d = Daemon::start(&["--blk", "socket={dir}/d.sock,path={dir}/d.img,size=4M"]);
    let mut c = BlkClient::connect(&d.path("d.sock"));
    let header = c.header(T_IN, 0);
    let data = c.alloc(512);
    let status = c.alloc(1);
    let descs = request_chain(header, data, 512, true, status);
    let head = {
        let mem = &c.mem.mem;
        let q = &mut c.queues[0];
        let head = q.write_descs(mem, &descs);
        q.publish_heads(mem, &[300, head]);
        head
    };
    let used = c.wait(0, 1);
    assert_eq!(
        used,
        vec![(head, 513)],
        "the valid request behind the bad head"
    );
    assert_eq!(c.peek(status, 1)[0], S_OK);
    let mut ctl = crate::common::control::Control::connect(&d.path("control.sock"));
    let stats = ctl
        .call("device.stats", serde_json::json!({"id": "d"}))
        .unwrap();
    assert_eq!(stats["queues"][0]["ring_errors"], 1, "{stats}");
    still_serving(&mut c, 11);
}
