//! What one control client can do to other tenants and to the host through the names it
//! passes: socket paths never replace a file or another listener, a tap serves one device,
//! a MAC is unique on its switch. Each refusal leaves everything as it was.

use serde_json::json;

use crate::common::control::Control;
use crate::common::daemon::Daemon;
use crate::common::netns::NetNs;

#[test]
fn a_socket_path_never_replaces_a_file_or_a_live_socket() {
    let daemon = Daemon::start(&["--blk", "socket={dir}/a.sock,path=null,size=1M"]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let victim = daemon.path("tenant-data");
    std::fs::write(&victim, b"another tenant's data").unwrap();
    for socket in [
        victim.clone(),
        daemon.path("a.sock"),
        daemon.path("control.sock"),
    ] {
        let error = ctl
            .call(
                "device.add",
                json!({"type": "blk", "id": "x", "socket": socket, "path": "null", "size": "1M"}),
            )
            .unwrap_err();
        assert!(
            error["message"].as_str().unwrap().contains("socket")
                || error["message"].as_str().unwrap().contains("listening"),
            "{socket:?}: {error}"
        );
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"another tenant's data");
    // The live sockets still work.
    assert_eq!(ctl.device_count(), 1);
    crate::common::blk::BlkClient::connect(&daemon.path("a.sock"));
}

#[test]
fn a_mac_is_unique_on_its_switch() {
    let daemon = Daemon::start(&[
        "--net",
        "socket={dir}/a.sock,switch=s,mac=52:54:00:00:00:0a",
    ]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let add = |ctl: &mut Control, id: &str, switch: &str| {
        ctl.call(
            "device.add",
            json!({"type": "net", "id": id, "socket": daemon.path(&format!("{id}.sock")),
                   "switch": switch, "mac": "52:54:00:00:00:0a"}),
        )
    };
    assert_eq!(
        add(&mut ctl, "b", "s").unwrap_err()["data"]["kind"],
        "exists"
    );
    assert_eq!(ctl.device_count(), 1);
    // The same MAC on another switch is another L2 domain: allowed.
    add(&mut ctl, "c", "other").unwrap();
}

#[test]
fn a_tap_serves_one_device_or_one_uplink() {
    let ns = NetNs::new("nc-iso");
    let daemon = Daemon::start_in_netns(&ns.name, &["--net", "socket={dir}/a.sock,tap=nciso0"]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let error = ctl
        .call(
            "device.add",
            json!({"type": "net", "id": "b", "socket": daemon.path("b.sock"), "tap": "nciso0"}),
        )
        .unwrap_err();
    assert_eq!(error["data"]["kind"], "exists", "{error}");
    let error = ctl
        .call("switch.add", json!({"name": "s", "uplink": "nciso0"}))
        .unwrap_err();
    assert_eq!(error["data"]["kind"], "exists", "{error}");
    assert_eq!(ctl.device_count(), 1);
}

/// A front-end that negotiated features, before its memory table.
fn bare_frontend(socket: &std::path::Path) -> vhost::vhost_user::Frontend {
    use vhost::vhost_user::VhostUserFrontend;
    use vhost::VhostBackend;
    let mut frontend = vhost::vhost_user::Frontend::connect(socket, 1).expect("connect");
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    frontend.set_protocol_features(protocol).unwrap();
    frontend.set_features(features).unwrap();
    frontend
}

/// A daemon serving two null disks: `bad.sock` for the hostile front-end, `good.sock` for the
/// neighbour that must keep working.
fn bad_and_good_disks() -> Daemon {
    Daemon::start(&[
        "--blk",
        "socket={dir}/bad.sock,path=null,size=1M",
        "--blk",
        "socket={dir}/good.sock,path=null,size=1M",
    ])
}

#[test]
fn a_memory_region_past_the_end_of_its_file_drops_that_front_end_only() {
    use vhost::VhostBackend;
    let mut daemon = bad_and_good_disks();
    let frontend = bare_frontend(&daemon.path("bad.sock"));
    // 8 MiB of memfd announced as 64 MiB: mapping it works, touching the rest would SIGBUS.
    let mem = crate::common::memory::TestMemory::new(&[(0, 8 << 20)]);
    let mut regions = mem.regions();
    regions[0].memory_size = 64 << 20;
    let _ = frontend.set_mem_table(&regions);
    daemon.wait_for_log("front-end message refused");
    daemon.wait_for_log("bad: front-end disconnected");
    // The daemon and every other device go on.
    let mut good = crate::common::blk::BlkClient::connect(&daemon.path("good.sock"));
    good.read(0, 0, 512);
    // And the bad socket takes a well-behaved front-end again.
    crate::common::blk::BlkClient::connect(&daemon.path("bad.sock")).read(0, 0, 512);
}

/// A sparse memfd of `size` bytes and its region at guest address `gpa` (the test process
/// never maps it: only the daemon would).
fn sparse_region(gpa: u64, size: u64) -> (std::fs::File, vhost::VhostUserMemoryRegionInfo) {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: memfd_create takes a NUL-terminated name and flags; we own the new fd below.
    let fd = unsafe { libc::memfd_create(c"novacron-sparse".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size).expect("size the memfd");
    let region = vhost::VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: 0x7000_0000_0000 + gpa,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    };
    (file, region)
}

#[test]
fn a_front_end_cannot_map_more_guest_memory_than_its_device_allows() {
    use vhost::vhost_user::VhostUserFrontend;
    use vhost::VhostBackend;
    // By default (1 TiB per connection): 2 TiB of holes, which cost the front-end nothing and
    // would take 2 TiB of the daemon's address space, are refused before anything is mapped.
    let mut daemon = bad_and_good_disks();
    let frontend = bare_frontend(&daemon.path("bad.sock"));
    let (_file, region) = sparse_region(0, 2 << 40);
    let _ = frontend.set_mem_table(&[region]);
    daemon.wait_for_log("this device allows 1099511627776 (mem-max)");
    daemon.wait_for_log("bad: front-end disconnected");
    assert!(
        daemon.peak_virtual_memory() < 1 << 40,
        "the daemon mapped the table it refused: VmPeak {}",
        daemon.peak_virtual_memory()
    );
    crate::common::blk::BlkClient::connect(&daemon.path("good.sock")).read(0, 0, 512);
    crate::common::blk::BlkClient::connect(&daemon.path("bad.sock")).read(0, 0, 512);
    drop(daemon);

    // With `mem-max`: regions added one by one count together.
    let mut daemon = Daemon::start(&[
        "--blk",
        "socket={dir}/bad.sock,path=null,size=1M,mem-max=48M",
        "--blk",
        "socket={dir}/good.sock,path=null,size=1M",
    ]);
    let mut frontend = bare_frontend(&daemon.path("bad.sock"));
    let (_a, first) = sparse_region(0, 32 << 20);
    frontend.add_mem_region(&first).expect("32 MiB of 48 fits");
    let (_b, second) = sparse_region(1 << 30, 32 << 20);
    let _ = frontend.add_mem_region(&second);
    daemon.wait_for_log("this device allows 50331648 (mem-max)");
    daemon.wait_for_log("bad: front-end disconnected");
    crate::common::blk::BlkClient::connect(&daemon.path("good.sock")).read(0, 0, 512);
    // The next front-end on that socket (32 MiB) starts with a share of its own.
    crate::common::blk::BlkClient::connect(&daemon.path("bad.sock")).read(0, 0, 512);
}

#[test]
fn a_call_fd_that_is_not_an_eventfd_drops_that_front_end_only() {
    use std::os::fd::{FromRawFd, IntoRawFd};
    use vhost::VhostBackend;
    let mut daemon = bad_and_good_disks();
    let frontend = bare_frontend(&daemon.path("bad.sock"));
    let mem = crate::common::memory::TestMemory::new(&[(0, 8 << 20)]);
    frontend.set_mem_table(&mem.regions()).unwrap();
    // A pipe where an eventfd belongs: a full pipe would block the worker on every signal.
    let (_read, write) = std::io::pipe().unwrap();
    // SAFETY: the write end's descriptor is handed over to the EventFd, its only owner.
    let not_an_eventfd =
        unsafe { vmm_sys_util::eventfd::EventFd::from_raw_fd(write.into_raw_fd()) };
    let _ = frontend.set_vring_call(0, &not_an_eventfd);
    daemon.wait_for_log("the descriptor is not an eventfd");
    daemon.wait_for_log("bad: front-end disconnected");
    let mut good = crate::common::blk::BlkClient::connect(&daemon.path("good.sock"));
    good.read(0, 0, 512);
    // The socket takes a well-behaved front-end again.
    crate::common::blk::BlkClient::connect(&daemon.path("bad.sock")).read(0, 0, 512);
}

#[test]
fn a_front_end_stalled_mid_message_cannot_hang_removal() {
    use std::io::Write;
    let mut daemon = Daemon::start(&["--blk", "socket={dir}/x.sock,path=null,size=1M"]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    // Connects and sends half a header, then nothing.
    let mut stalled = std::os::unix::net::UnixStream::connect(daemon.path("x.sock")).unwrap();
    daemon.wait_for_log("x: front-end connected");
    stalled.write_all(&[1, 0, 0, 0, 1, 0]).unwrap();
    // The relay is now reading the rest of that message. Removal must still go through at
    // once (the control call would otherwise wait for the stalled front-end).
    ctl.call("device.remove", json!({"id": "x", "force": true}))
        .unwrap();
    assert_eq!(ctl.device_count(), 0);
    drop(stalled);
}

#[test]
fn a_control_client_that_never_reads_its_replies_cannot_grow_the_daemon() {
    use std::io::Write;
    let daemon = Daemon::start(&["--blk", "socket={dir}/d.sock,path=null,size=1M"]);
    let before = daemon.rss_kib();
    // Requests as fast as the socket takes them, replies never read.
    let mut flood = std::os::unix::net::UnixStream::connect(daemon.path("control.sock")).unwrap();
    flood.set_nonblocking(true).unwrap();
    let request = br#"{"jsonrpc":"2.0","id":1,"method":"device.list"}
"#;
    let mut sent = 0usize;
    while sent < 200_000 {
        match flood.write(request) {
            Ok(_) => sent += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Wait for the daemon to take more; if it stops taking them, it is pushing
                // back, which is the point.
                let mut pfd = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&flood),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for a socket that outlives the call.
                if unsafe { libc::poll(&mut pfd, 1, 1000) } == 0 {
                    break;
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    // Another client is served meanwhile (the control thread is not stuck on the flood)...
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    assert_eq!(ctl.device_count(), 1);
    // ...and the flood's replies were not all queued in the daemon: at most a few MiB.
    let grown = daemon.rss_kib().saturating_sub(before);
    assert!(
        grown < 32 * 1024,
        "daemon grew {grown} KiB holding replies for {sent} unread requests"
    );
    drop(flood);
}

#[test]
fn host_block_devices_back_disks_only_when_the_host_allows_it() {
    let disk = crate::common::loopdev::LoopDevice::new(4 << 20);
    let add = |ctl: &mut Control, daemon: &Daemon| {
        ctl.call(
            "device.add",
            json!({"type": "blk", "id": "raw", "socket": daemon.path("raw.sock"),
                   "path": disk.path}),
        )
    };
    let daemon = Daemon::start(&[]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let error = add(&mut ctl, &daemon).unwrap_err();
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("--allow-block-devices"),
        "{error}"
    );
    assert_eq!(ctl.device_count(), 0);
    drop(ctl);
    drop(daemon);
    let daemon = Daemon::start(&["--allow-block-devices"]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    add(&mut ctl, &daemon).unwrap();
    crate::common::blk::BlkClient::connect(&daemon.path("raw.sock")).read(0, 0, 512);
}

#[test]
fn a_cold_tier_path_never_names_someone_elses_file() {
    let daemon = Daemon::start(&[]);
    let mut ctl = Control::connect(&daemon.path("control.sock"));
    let victim = daemon.path("tenant-archive");
    std::fs::write(&victim, vec![0x5a; 1 << 20]).unwrap();
    let error = ctl
        .call(
            "device.add",
            json!({"type": "blk", "id": "t", "socket": daemon.path("t.sock"),
                   "tier-hot": daemon.path("t.hot"), "tier-cold": victim, "size": "4M"}),
        )
        .unwrap_err();
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("not this disk's cold tier"),
        "{error}"
    );
    assert!(
        std::fs::read(&victim).unwrap().iter().all(|&b| b == 0x5a),
        "the file was changed"
    );
    // A new, empty cold file is fine.
    ctl.call(
        "device.add",
        json!({"type": "blk", "id": "t", "socket": daemon.path("t.sock"),
               "tier-hot": daemon.path("t.hot"), "tier-cold": daemon.path("t.cold"), "size": "4M"}),
    )
    .unwrap();
}
