//! virtio-blk I/O through the real vhost-user protocol against the real daemon binary, on both
//! engines: read/write/flush/discard/write-zeroes/get-id, read-only, multiqueue, deep queues,
//! buffers crossing memory regions, reconnects, two devices at once.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::os::unix::fs::FileExt;

use crate::common::blk::*;
use crate::common::daemon::Daemon;

/// Runs each test body once per engine, as `<name>::uring` and `<name>::sync`.
macro_rules! per_engine {
    ($($name:ident($engine:ident) $body:block)*) => {$(
        mod $name {
            use super::*;
            fn run($engine: &str) $body
            #[test]
            fn uring() { run("uring") }
            #[test]
            fn sync() { run("sync") }
        }
    )*};
}

fn spec(engine: &str, extra: &str) -> String {
    format!("socket={{dir}}/d0.sock,path={{dir}}/d0.img,size=16M,engine={engine}{extra}")
}

per_engine! {
    read_write_roundtrip(engine) {
        let daemon = Daemon::start(&["--blk", &spec(engine, ",serial=SN-42")]);
        let mut c = BlkClient::connect(&daemon.path("d0.sock"));
        assert_eq!(c.capacity_sectors(), 16 << 11);
        let data = pattern(1, 64 << 10);
        c.write(0, 2048, &data);
        assert_eq!(c.read(0, 2048, 64 << 10), data);
        // The bytes are in the image file at the right offset.
        let mut on_disk = vec![0u8; data.len()];
        std::fs::File::open(daemon.path("d0.img")).unwrap().read_exact_at(&mut on_disk, 2048 * 512).unwrap();
        assert_eq!(on_disk, data);
        assert_eq!(c.flush(0), S_OK);
        // Never-written blocks read as zeros; the last sector is readable.
        assert!(c.read(0, 0, 4096).iter().all(|&b| b == 0));
        let last = (16 << 11) - 1;
        assert_eq!(c.read(0, last, 512).len(), 512);
    }

    get_id_returns_serial(engine) {
        let daemon = Daemon::start(&["--blk", &spec(engine, ",serial=SN-42")]);
        let mut c = BlkClient::connect(&daemon.path("d0.sock"));
        let reply = c.request(0, T_GET_ID, 0, &[], 20);
        assert_eq!(reply.status, S_OK);
        assert_eq!(&reply.data[..5], b"SN-42");
        assert!(reply.data[5..].iter().all(|&b| b == 0));
    }

    discard_and_write_zeroes(engine) {
        let daemon = Daemon::start(&["--blk", &spec(engine, "")]);
        let mut c = BlkClient::connect(&daemon.path("d0.sock"));
        let data = pattern(2, 1 << 20);
        c.write(0, 0, &data);
        // Discard sectors 0..256 and zero 512..520 (no unmap) and 1024..1032 (unmap).
        assert_eq!(c.ranges(0, T_DISCARD, &[(0, 256, 0)]), S_OK);
        assert_eq!(c.ranges(0, T_WRITE_ZEROES, &[(512, 8, 0), (1024, 8, 1)]), S_OK);
        let back = c.read(0, 0, 1 << 20);
        assert!(back[..256 * 512].iter().all(|&b| b == 0), "discarded range not zero");
        assert_eq!(&back[256 * 512..512 * 512], &data[256 * 512..512 * 512]);
        assert!(back[512 * 512..520 * 512].iter().all(|&b| b == 0));
        assert_eq!(&back[520 * 512..1024 * 512], &data[520 * 512..1024 * 512]);
        assert!(back[1024 * 512..1032 * 512].iter().all(|&b| b == 0));
        assert_eq!(&back[1032 * 512..], &data[1032 * 512..]);
        // The unmap flag on a discard is UNSUPP (virtio 1.2 5.2.6.2).
        assert_eq!(c.ranges(0, T_DISCARD, &[(0, 8, 1)]), S_UNSUPP);
    }

    readonly_refuses_writes(engine) {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("ro.img");
        std::fs::write(&image, pattern(3, 1 << 20)).unwrap();
        let spec = format!("socket={}/ro.sock,path={},readonly,engine={engine}", dir.path().display(), image.display());
        let daemon = Daemon::start(&["--blk", &spec]);
        let mut c = BlkClient::connect(&dir.path().join("ro.sock"));
        assert_ne!(c.device_features & F_RO, 0, "RO feature not offered");
        assert_eq!(c.read(0, 8, 4096), pattern(3, 1 << 20)[4096..8192].to_vec());
        assert_eq!(c.request(0, T_OUT, 0, &[0u8; 512], 0).status, S_IOERR);
        assert_eq!(c.ranges(0, T_DISCARD, &[(0, 8, 0)]), S_IOERR);
        assert_eq!(c.ranges(0, T_WRITE_ZEROES, &[(0, 8, 0)]), S_IOERR);
        assert_eq!(c.flush(0), S_OK);
        assert_eq!(std::fs::read(&image).unwrap(), pattern(3, 1 << 20), "read-only image changed");
        drop(daemon);
    }

    multiqueue_and_deep_queues(engine) {
        let daemon = Daemon::start(&["--blk", &spec(engine, ",queues=2")]);
        let options = ConnectOptions { queues: 2, queue_size: 256, ..Default::default() };
        let mut c = BlkClient::connect_with(&daemon.path("d0.sock"), options);
        assert_eq!(u16::from_le_bytes(c.config(34, 2).try_into().unwrap()), 2);
        // 64 writes in flight on each queue at once, then read everything back.
        for q in 0..2 {
            let mut heads = Vec::new();
            for i in 0..64u64 {
                let header = c.header(T_OUT, (q as u64 * 64 + i) * 8);
                let data = c.alloc(4096);
                c.poke(data, &pattern(q as u64 * 1000 + i, 4096));
                let status = c.alloc(1);
                heads.push(c.post(q, &[(header, 16, false), (data, 4096, false), (status, 1, true)]));
            }
            let mut done: Vec<u16> = c.wait(q, 64).into_iter().map(|(h, _)| h).collect();
            done.sort_unstable();
            heads.sort_unstable();
            assert_eq!(done, heads);
        }
        for q in 0..2usize {
            for i in 0..64u64 {
                let sector = (q as u64 * 64 + i) * 8;
                assert_eq!(c.read(1 - q, sector, 4096), pattern(q as u64 * 1000 + i, 4096));
            }
        }
    }

    buffers_crossing_memory_regions(engine) {
        let daemon = Daemon::start(&["--blk", &spec(engine, "")]);
        let options = ConnectOptions { memory: vec![(0, 16 << 20), (16 << 20, 16 << 20)], ..Default::default() };
        let mut c = BlkClient::connect_with(&daemon.path("d0.sock"), options);
        let data = pattern(9, 8192);
        let across = (16 << 20) - 4096;
        c.poke(across, &data);
        let header = c.header(T_OUT, 100);
        let status = c.alloc(1);
        c.roundtrip(0, &[(header, 16, false), (across, 8192, false), (status, 1, true)]);
        assert_eq!(c.peek(status, 1)[0], S_OK);
        c.poke(across, &[0u8; 8192]);
        let header = c.header(T_IN, 100);
        c.roundtrip(0, &[(header, 16, false), (across, 8192, true), (status, 1, true)]);
        assert_eq!(c.peek(status, 1)[0], S_OK);
        assert_eq!(c.peek(across, 8192), data);
    }

    reconnect_keeps_serving(engine) {
        let daemon = Daemon::start(&["--blk", &spec(engine, "")]);
        let data = pattern(4, 4096);
        {
            let mut c = BlkClient::connect(&daemon.path("d0.sock"));
            c.write(0, 64, &data);
        }
        // The first front-end is gone (like a QEMU restart); a new one sees the data.
        for _ in 0..2 {
            let mut c = BlkClient::connect(&daemon.path("d0.sock"));
            assert_eq!(c.read(0, 64, 4096), data);
        }
    }

    without_event_idx(engine) {
        let daemon = Daemon::start(&["--blk", &spec(engine, "")]);
        let options = ConnectOptions { event_idx: false, ..Default::default() };
        let mut c = BlkClient::connect_with(&daemon.path("d0.sock"), options);
        for i in 0..20u64 {
            c.write(0, i * 8, &pattern(i, 4096));
        }
        for i in 0..20u64 {
            assert_eq!(c.read(0, i * 8, 4096), pattern(i, 4096));
        }
    }
}

#[test]
fn two_devices_at_once_and_null_device() {
    let daemon = Daemon::start(&[
        "--blk",
        "socket={dir}/a.sock,path={dir}/a.img,size=8M,serial=AAA",
        "--blk",
        "socket={dir}/b.sock,path=null,size=1G,serial=BBB",
    ]);
    let mut a = BlkClient::connect(&daemon.path("a.sock"));
    let mut b = BlkClient::connect(&daemon.path("b.sock"));
    assert_eq!(a.capacity_sectors(), 8 << 11);
    assert_eq!(b.capacity_sectors(), 1 << 21);
    a.write(0, 0, &pattern(5, 4096));
    b.write(0, 0, &pattern(5, 4096));
    assert_eq!(a.read(0, 0, 4096), pattern(5, 4096));
    // The null device drops writes and reads zeros.
    assert!(b.read(0, 0, 4096).iter().all(|&x| x == 0));
    assert_eq!(&a.request(0, T_GET_ID, 0, &[], 20).data[..3], b"AAA");
    assert_eq!(&b.request(0, T_GET_ID, 0, &[], 20).data[..3], b"BBB");
    assert_eq!(b.flush(0), S_OK);
}

#[test]
fn config_space_describes_the_device() {
    let daemon = Daemon::start(&[
        "--blk",
        "socket={dir}/d.sock,path=null,size=64M,queues=3,logical-block-size=4096,queue-size=128",
    ]);
    let mut c = BlkClient::connect_with(
        &daemon.path("d.sock"),
        ConnectOptions {
            queues: 3,
            queue_size: 128,
            ..Default::default()
        },
    );
    for feature in [
        F_VERSION_1,
        F_EVENT_IDX,
        F_INDIRECT,
        F_FLUSH,
        F_DISCARD,
        F_WRITE_ZEROES,
        F_MQ,
    ] {
        assert_ne!(
            c.device_features & feature,
            0,
            "feature {feature:#x} missing"
        );
    }
    assert_eq!(c.device_features & F_RO, 0);
    let config = c.config(0, 60);
    assert_eq!(
        u64::from_le_bytes(config[0..8].try_into().unwrap()),
        64 << 11
    );
    assert_eq!(
        u32::from_le_bytes(config[12..16].try_into().unwrap()),
        126,
        "seg_max"
    );
    assert_eq!(
        u32::from_le_bytes(config[20..24].try_into().unwrap()),
        4096,
        "blk_size"
    );
    assert_eq!(
        u16::from_le_bytes(config[34..36].try_into().unwrap()),
        3,
        "num_queues"
    );
    assert_eq!(
        u32::from_le_bytes(config[40..44].try_into().unwrap()),
        32,
        "max_discard_seg"
    );
}

#[test]
fn sigterm_exits_cleanly_and_removes_sockets() {
    let daemon = Daemon::start(&["--blk", "socket={dir}/d.sock,path={dir}/d.img,size=1M"]);
    let socket = daemon.path("d.sock");
    let _c = BlkClient::connect(&socket);
    assert!(socket.exists());
    let (status, _dir) = daemon.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(!socket.exists(), "socket left behind");
}

#[test]
fn bad_command_lines_fail_with_a_message() {
    let err = crate::common::daemon::start_failure(&[
        "--control",
        "none",
        "--blk",
        "socket=/tmp/x.sock,path=/nonexistent/dir/img",
    ]);
    assert!(err.contains("cannot open"), "{err}");
    let err = crate::common::daemon::start_failure(&[
        "--control",
        "none",
        "--blk",
        "socket=/tmp/x.sock,path=null,size=1M,queues=0",
    ]);
    assert!(err.contains("queues"), "{err}");
    let err = crate::common::daemon::start_failure(&["--control", "none"]);
    assert!(err.contains("nothing to serve"), "{err}");
}

#[test]
fn print_capabilities_is_json() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_novacrond"))
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["type"], "block");
}

#[test]
fn memory_added_while_the_queue_is_busy_is_used_at_once() {
    // Regression: a worker polling with a stale memory map refused buffers in a region the
    // front-end had just added with ADD_MEM_REG (seen as IOERR with libblkio).
    let daemon = Daemon::start(&[
        "--blk",
        "socket={dir}/d.sock,path={dir}/d.img,size=16M,poll-us=1000",
    ]);
    let mut c = BlkClient::connect(&daemon.path("d.sock"));
    use vhost::vhost_user::VhostUserFrontend;
    for i in 0..8u64 {
        // The long poll window keeps the worker in one polling spell across the region
        // update; the new region must be usable at once.
        c.write(0, i * 8, &pattern(i, 4096));
        let gpa = (64 << 20) + i * (1 << 20);
        let info = c.mem.add_region(gpa, 1 << 20);
        c.frontend.add_mem_region(&info).expect("add_mem_region");
        c.poke(gpa, &pattern(100 + i, 4096));
        let header = c.header(T_OUT, 1000 + i * 8);
        let status = c.alloc(1);
        c.roundtrip(
            0,
            &[(header, 16, false), (gpa, 4096, false), (status, 1, true)],
        );
        assert_eq!(
            c.peek(status, 1)[0],
            S_OK,
            "buffer in region added #{i} refused"
        );
        assert_eq!(c.read(0, 1000 + i * 8, 4096), pattern(100 + i, 4096));
    }
}

#[test]
fn the_backend_program_convention_serves_a_disk() {
    // vhost-user's "backend program conventions": --socket-path and --blk-file (and
    // --read-only), as a VMM that launches backends itself passes them.
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("c.img"))
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let daemon = Daemon::start_in(
        dir,
        &["--socket-path", "{dir}/c.sock", "--blk-file", "{dir}/c.img"],
    );
    let mut c = BlkClient::connect(&daemon.path("c.sock"));
    assert_eq!(c.capacity_sectors(), (4 << 20) / 512);
    let data = pattern(5, 4096);
    c.write(0, 16, &data);
    assert!(c.read(0, 16, 4096) == data);
    drop(c);
    let (_, dir) = daemon.terminate();
    let daemon = Daemon::start_in(
        dir,
        &[
            "--socket-path",
            "{dir}/c.sock",
            "--blk-file",
            "{dir}/c.img",
            "--read-only",
        ],
    );
    let mut c = BlkClient::connect(&daemon.path("c.sock"));
    assert_ne!(c.device_features & F_RO, 0, "read-only offered");
    let header = c.header(T_OUT, 16);
    let buf = c.alloc(512);
    let status = c.alloc(1);
    c.roundtrip(
        0,
        &[(header, 16, false), (buf, 512, false), (status, 1, true)],
    );
    assert_eq!(
        c.peek(status, 1)[0],
        S_IOERR,
        "a write to a read-only disk fails"
    );
    assert!(c.read(0, 16, 4096) == data);
}

#[test]
fn a_direct_disk_serves_unaligned_guest_buffers() {
    // O_DIRECT refuses buffers not aligned to the logical block size; virtio allows any.
    // Such a request goes through an aligned bounce buffer (aligned ones stay zero-copy).
    let daemon = Daemon::start(&[
        "--blk",
        "socket={dir}/d.sock,path={dir}/d.img,size=4M,direct",
    ]);
    let mut c = BlkClient::connect(&daemon.path("d.sock"));
    let data = pattern(21, 4096);
    // Write from a buffer at an odd address, split in two uneven pieces.
    let header = c.header(T_OUT, 64);
    let buf = c.alloc(4096 + 64) + 1;
    c.poke(buf, &data);
    let status = c.alloc(1);
    c.roundtrip(
        0,
        &[
            (header, 16, false),
            (buf, 1000, false),
            (buf + 1000, 3096, false),
            (status, 1, true),
        ],
    );
    assert_eq!(c.peek(status, 1)[0], S_OK, "unaligned write");
    // Read back into another odd address.
    let header = c.header(T_IN, 64);
    let into = c.alloc(4096 + 64) + 3;
    let status = c.alloc(1);
    c.roundtrip(
        0,
        &[(header, 16, false), (into, 4096, true), (status, 1, true)],
    );
    assert_eq!(c.peek(status, 1)[0], S_OK, "unaligned read");
    assert!(c.peek(into, 4096) == data);
    // And the aligned path still agrees.
    assert!(c.read(0, 64, 4096) == data);
}
