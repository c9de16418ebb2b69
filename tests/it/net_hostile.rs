//! A hostile guest on a net device: every malformed tx chain and rx buffer is dropped and
//! counted, the queue keeps going, and the other port of the switch keeps working.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common::daemon::{novactl, Daemon};
use crate::common::net::{ethernet, NetClient, F_MRG_RXBUF, HDR};

const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0a];
const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0b];

fn pair() -> Daemon {
    Daemon::start(&[
        "--net",
        "socket={dir}/a.sock,switch=s,mac=52:54:00:00:00:0a,mtu=1500",
        "--net",
        "socket={dir}/b.sock,switch=s,mac=52:54:00:00:00:0b",
    ])
}

fn drops(daemon: &Daemon, id: &str, direction: &str) -> serde_json::Value {
    let (ok, out, err) = novactl(daemon, &["--json", "device", "stats", id]);
    assert!(ok, "{err}");
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["total"][direction].clone()
}

fn header(flags: u8, gso: u8, gso_size: u16, csum_start: u16, csum_offset: u16) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[0] = flags;
    h[1] = gso;
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&csum_start.to_le_bytes());
    h[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    h
}

#[test]
fn malformed_tx_chains_are_dropped_counted_and_the_queue_goes_on() {
    let daemon = pair();
    let mut a = NetClient::connect(&daemon.path("a.sock"), 1, 0);
    let mut b = NetClient::connect(&daemon.path("b.sock"), 1, 0);
    b.post_rx(0, 32, 2048);
    let good = ethernet(B, A, 0x0800, &[7u8; 100]);

    // Shorter than the virtio-net header.
    let at = a.vq.alloc(8);
    a.send_raw(0, &[(at, 8, false)]);
    // A device-writable descriptor in a tx chain.
    let at = a.vq.alloc(200);
    a.send_raw(0, &[(at, 12, false), (at + 64, 100, true)]);
    // Outside guest memory, and an address that wraps.
    a.send_raw(0, &[(1 << 40, 200, false)]);
    a.send_raw(0, &[(u64::MAX - 16, 200, false)]);
    // GSO with gso_size 0; unknown GSO type; checksum offsets past the frame.
    a.send_split(0, header(0, 1, 0, 0, 0), &good, &[0]);
    a.send_split(0, header(0, 0x42, 1000, 0, 0), &good, &[0]);
    a.send_split(0, header(1, 0, 0, 100, 16), &good, &[0]);
    // Above MTU + Ethernet header without GSO, and above 64 KiB with it.
    a.send(0, &ethernet(B, A, 0x0800, &vec![0u8; 1500 + 5]));
    a.send_split(
        0,
        header(0, 1, 1448, 0, 0),
        &ethernet(B, A, 0x0800, &vec![0u8; 70_000]),
        &[0],
    );
    // A runt (no full Ethernet header) is the switch's to refuse.
    a.send(0, &[1, 2, 3]);

    // The header split over three descriptors (one byte, then 5, then the rest) is fine.
    a.send_split(0, [0; HDR], &good, &[1, 5, 0]);
    assert_eq!(b.recv(0).frame, good);
    a.send(0, &good);
    assert_eq!(b.recv(0).frame, good);

    let tx = drops(&daemon, "a", "tx_drops");
    assert_eq!(tx["short-header"], 1, "{tx}");
    assert_eq!(tx["bad-layout"], 1, "{tx}");
    assert_eq!(tx["bad-address"], 2, "{tx}");
    assert_eq!(tx["bad-header"], 3, "{tx}");
    assert_eq!(tx["too-large"], 2, "{tx}");
    assert_eq!(tx["runt"], 1, "{tx}");
}

#[test]
fn malformed_rx_buffers_are_returned_empty_and_counted() {
    let daemon = pair();
    let mut a = NetClient::connect(&daemon.path("a.sock"), 1, 0);
    // B without mergeable buffers: each frame needs one buffer that holds it all.
    let mut b = NetClient::connect(&daemon.path("b.sock"), 1, F_MRG_RXBUF);
    // A read-only rx buffer, one outside memory, one shorter than the header.
    let ro = b.vq.alloc(2048);
    b.vq.post(0, &[(ro, 2048, false)]);
    b.vq.post(0, &[(1 << 40, 2048, true)]);
    let tiny = b.vq.alloc(8);
    b.vq.post(0, &[(tiny, 8, true)]);
    let frame = ethernet(B, A, 0x0800, &[3u8; 200]);
    a.send(0, &frame);
    // Each bad buffer comes back with length 0, the frame finds no room.
    let returned = b.vq.wait(0, 3);
    assert!(returned.iter().all(|&(_, len)| len == 0), "{returned:?}");
    // A buffer too small for the frame (non-mergeable) is put back, not used (as QEMU does):
    // it waits for a frame it can hold.
    let small = b.vq.alloc(64);
    let small_head = b.vq.post(0, &[(small, 64, true)]);
    a.send(0, &frame);
    assert!(!b.rx_pending(0));
    let rx = drops(&daemon, "b", "rx_drops");
    assert_eq!(rx["bad-layout"], 1, "{rx}");
    assert_eq!(rx["bad-address"], 1, "{rx}");
    assert_eq!(rx["short-header"], 1, "{rx}");
    assert_eq!(rx["too-large"], 1, "{rx}");
    assert_eq!(rx["no-rx-buffers"], 1, "{rx}");
    let runt_sized = ethernet(B, A, 0x0800, &[4u8; 30]);
    a.send(0, &runt_sized);
    let (head, len) = b.vq.wait(0, 1)[0];
    assert_eq!((head, len as usize), (small_head, HDR + runt_sized.len()));
    assert_eq!(b.vq.peek(small + HDR as u64, runt_sized.len()), runt_sized);
    // Good buffers after all that: frames flow again.
    b.post_rx(0, 2, 2048);
    a.send(0, &frame);
    assert_eq!(b.recv(0).frame, frame);
}

#[test]
fn a_corrupt_avail_index_does_not_make_the_tx_worker_spin() {
    // The guest claims 1000 new frames on a 256-entry tx ring: virtio-queue refuses to walk
    // it; the worker must stop trying (and count it), not loop on "more available".
    let daemon = pair();
    let a = NetClient::connect(&daemon.path("a.sock"), 1, 0);
    let mut b = NetClient::connect(&daemon.path("b.sock"), 1, 0);
    let avail_idx = a.vq.queues[1].avail + 2;
    a.vq.poke(avail_idx, &1000u16.to_le_bytes());
    a.vq.queues[1].kick.write(1).unwrap();
    let mut ctl = crate::common::control::Control::connect(&daemon.path("control.sock"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let stats = ctl
            .call("device.stats", serde_json::json!({"id": "a"}))
            .unwrap();
        if stats["total"]["ring_errors"].as_u64().unwrap() > 0 {
            break;
        }
        // The kick is handled asynchronously; the counter is the signal we wait for.
        assert!(
            std::time::Instant::now() < deadline,
            "corrupt ring never reported"
        );
        std::thread::yield_now();
    }
    daemon.assert_idle();
    // The other port still sends.
    b.send(0, &ethernet([0xff; 6], B, 0x0806, &[1u8; 46]));
    let stats = ctl
        .call("device.stats", serde_json::json!({"id": "b"}))
        .unwrap();
    assert_eq!(stats["total"]["tx_frames"], 1, "{stats}");
}
