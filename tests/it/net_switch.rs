//! Switch ports driven through the real vhost-user protocol (the `vhost` crate's front-end,
//! memfd guest memory): unicast both ways, broadcast, anti-spoofing, a receiver without
//! buffers, mergeable buffers for a 64 KiB TSO frame, offload fix-ups for receivers that
//! declined them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use crate::common::daemon::{novactl, Daemon};
use crate::common::net::{ethernet, NetClient, F_GUEST_CSUM, F_GUEST_TSO4, F_MRG_RXBUF, HDR};

const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0a];
const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0b];
const C: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0c];
const BROADCAST: [u8; 6] = [0xff; 6];

fn three_ports() -> Daemon {
    Daemon::start(&[
        "--net",
        "socket={dir}/a.sock,switch=s,mac=52:54:00:00:00:0a",
        "--net",
        "socket={dir}/b.sock,switch=s,mac=52:54:00:00:00:0b",
        "--net",
        "socket={dir}/c.sock,switch=s,mac=52:54:00:00:00:0c",
    ])
}

fn stats(daemon: &Daemon, id: &str) -> serde_json::Value {
    let (ok, out, err) = novactl(daemon, &["--json", "device", "stats", id]);
    assert!(ok, "{err}");
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["total"].clone()
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn unicast_goes_both_ways_and_broadcast_reaches_every_other_port() {
    let daemon = three_ports();
    let mut a = NetClient::connect(&daemon.path("a.sock"), 1, 0);
    let mut b = NetClient::connect(&daemon.path("b.sock"), 1, 0);
    let mut c = NetClient::connect(&daemon.path("c.sock"), 1, 0);
    for client in [&mut a, &mut b, &mut c] {
        client.post_rx(0, 16, 2048);
    }
    // B is unknown yet: flooded to B and C.
    let first = ethernet(B, A, 0x0800, &payload(100, 1));
    a.send(0, &first);
    assert_eq!(b.recv(0).frame, first);
    assert_eq!(c.recv(0).frame, first);
    // B answers: A was learnt, so only A gets it.
    let reply = ethernet(A, B, 0x0800, &payload(1400, 2));
    b.send(0, &reply);
    let got = a.recv(0);
    assert_eq!(got.frame, reply);
    assert_eq!(got.num_buffers(), 1);
    // Now B is known too: A → B is unicast.
    let second = ethernet(B, A, 0x0800, &payload(60, 3));
    a.send(0, &second);
    assert_eq!(b.recv(0).frame, second);
    // Broadcast from C reaches A and B, not C.
    let hello = ethernet(BROADCAST, C, 0x0806, &payload(46, 4));
    c.send(0, &hello);
    assert_eq!(a.recv(0).frame, hello);
    assert_eq!(b.recv(0).frame, hello);
    assert!(!a.rx_pending(0) && !b.rx_pending(0));
    assert!(!c.rx_pending(0), "C got its own broadcast or A's unicast");
    let c_stats = stats(&daemon, "c");
    assert_eq!(c_stats["rx_frames"], 1, "{c_stats}");
    assert_eq!(c_stats["tx_frames"], 1, "{c_stats}");
}

#[test]
fn spoofed_sources_are_dropped_and_counted() {
    let daemon = three_ports();
    let mut a = NetClient::connect(&daemon.path("a.sock"), 1, 0);
    let mut b = NetClient::connect(&daemon.path("b.sock"), 1, 0);
    b.post_rx(0, 4, 2048);
    a.send(0, &ethernet(B, C, 0x0800, &payload(64, 5)));
    a.send(0, &ethernet(B, BROADCAST, 0x0800, &payload(64, 6)));
    let fine = ethernet(B, A, 0x0800, &payload(64, 7));
    a.send(0, &fine);
    assert_eq!(
        b.recv(0).frame,
        fine,
        "the queue kept going after the drops"
    );
    assert!(!b.rx_pending(0));
    let a_stats = stats(&daemon, "a");
    assert_eq!(a_stats["tx_drops"]["spoofed"], 1, "{a_stats}");
    assert_eq!(a_stats["tx_drops"]["bad-source"], 1, "{a_stats}");
    assert_eq!(a_stats["tx_frames"], 1, "{a_stats}");
}

#[test]
fn a_receiver_without_buffers_loses_frames_without_blocking_the_sender() {
    let daemon = three_ports();
    let mut a = NetClient::connect(&daemon.path("a.sock"), 1, 0);
    let mut b = NetClient::connect(&daemon.path("b.sock"), 1, 0);
    let mut c = NetClient::connect(&daemon.path("c.sock"), 1, 0);
    c.post_rx(0, 64, 2048);
    // B posts nothing. Broadcasts still reach C, every one of them.
    for i in 0..20u8 {
        a.send(0, &ethernet(BROADCAST, A, 0x0800, &payload(200, i)));
    }
    for i in 0..20u8 {
        assert_eq!(
            c.recv(0).frame,
            ethernet(BROADCAST, A, 0x0800, &payload(200, i))
        );
    }
    let b_stats = stats(&daemon, "b");
    assert_eq!(b_stats["rx_drops"]["no-rx-buffers"], 20, "{b_stats}");
    // Once B has buffers, frames reach it again.
    b.post_rx(0, 4, 2048);
    let later = ethernet(BROADCAST, A, 0x0800, &payload(300, 99));
    a.send(0, &later);
    assert_eq!(b.recv(0).frame, later);
}

/// A 64 KiB TCPv4 frame with a GSO header (what a Linux guest sends with TSO).
fn tso_frame() -> ([u8; HDR], Vec<u8>) {
    let mut ip_tcp = vec![0u8; 20 + 20];
    ip_tcp[0] = 0x45;
    ip_tcp[9] = 6;
    ip_tcp[32] = 0x50; // TCP data offset 5
    let mut body = ip_tcp;
    body.extend(payload(65_000, 9));
    let frame = ethernet(B, A, 0x0800, &body);
    let mut header = [0u8; HDR];
    header[0] = 1; // NEEDS_CSUM
    header[1] = 1; // GSO_TCPV4
    header[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
    header[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
    header[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
    header[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    (header, frame)
}

#[test]
fn a_tso_frame_spans_mergeable_buffers_or_is_dropped_for_a_guest_without_tso() {
    let daemon = three_ports();
    let mut a = NetClient::connect(&daemon.path("a.sock"), 1, 0);
    let mut b = NetClient::connect(&daemon.path("b.sock"), 1, 0);
    // C declines TSO.
    let mut c = NetClient::connect(&daemon.path("c.sock"), 1, F_GUEST_TSO4);
    b.post_rx(0, 40, 4096);
    c.post_rx(0, 40, 4096);
    let (header, frame) = tso_frame();
    a.send_split(0, header, &frame, &[HDR as u32, 1000, 30_000, 0]);
    let got = b.recv(0);
    assert_eq!(got.frame, frame);
    assert_eq!(got.buffers, (HDR + frame.len()).div_ceil(4096));
    assert_eq!(
        &got.header[..10],
        &header[..10],
        "offload metadata carried through"
    );
    assert!(!c.rx_pending(0));
    let c_stats = stats(&daemon, "c");
    assert_eq!(c_stats["rx_drops"]["gso-unsupported"], 1, "{c_stats}");
}

#[test]
fn partial_checksums_are_completed_for_a_guest_without_checksum_offload() {
    let daemon = three_ports();
    let mut a = NetClient::connect(&daemon.path("a.sock"), 1, 0);
    // B declines checksum offload (and with it TSO) and mergeable buffers.
    let mut b = NetClient::connect(
        &daemon.path("b.sock"),
        1,
        F_GUEST_CSUM | F_GUEST_TSO4 | crate::common::net::F_GUEST_TSO6 | F_MRG_RXBUF,
    );
    b.post_rx(0, 4, 1526);
    // UDP over IPv4 with the pseudo-header sum in the checksum field, as Linux leaves it for
    // CHECKSUM_PARTIAL.
    let mut ip_udp = vec![0u8; 20 + 8];
    ip_udp[0] = 0x45;
    ip_udp[9] = 17;
    ip_udp[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip_udp[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let data = payload(101, 3);
    let udp_len = (8 + data.len()) as u16;
    ip_udp[24..26].copy_from_slice(&udp_len.to_be_bytes());
    let mut pseudo = Vec::from(&ip_udp[12..20]);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&udp_len.to_be_bytes());
    let pseudo_sum = fold(ones_sum(&pseudo));
    ip_udp[26..28].copy_from_slice(&pseudo_sum.to_be_bytes());
    let mut body = ip_udp;
    body.extend(&data);
    let frame = ethernet(B, A, 0x0800, &body);
    // The checksum a receiver expects, computed here independently: the one's complement of
    // the pseudo-header plus the segment with a zero checksum field.
    let mut segment = frame[34..].to_vec();
    segment[6..8].copy_from_slice(&[0, 0]);
    let expected = !fold(ones_sum(&pseudo) + ones_sum(&segment));
    let mut header = [0u8; HDR];
    header[0] = 1; // NEEDS_CSUM
    header[6..8].copy_from_slice(&34u16.to_le_bytes());
    header[8..10].copy_from_slice(&6u16.to_le_bytes());
    a.send_split(0, header, &frame, &[0]);
    let got = b.recv(0);
    assert_eq!(
        got.header[0], 0,
        "NEEDS_CSUM cleared for a guest without GUEST_CSUM"
    );
    assert_eq!(got.num_buffers(), 1);
    assert_eq!(
        u16::from_be_bytes([got.frame[40], got.frame[41]]),
        expected,
        "checksum bytes"
    );
    assert_eq!(&got.frame[..34], &frame[..34]);
    assert_eq!(&got.frame[42..], &frame[42..]);
}

/// The 32-bit one's-complement sum of big-endian 16-bit words (odd tail padded with 0).
fn ones_sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// Folds carries into 16 bits.
fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[test]
fn both_queue_pairs_carry_traffic() {
    // Two-pair ports. The switch picks a receiver's rx queue from the sender's MAC (its last
    // byte, modulo the pairs): from ...0a to pair 0, from ...0d to pair 1.
    const D: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0d];
    let daemon = Daemon::start(&[
        "--net",
        "socket={dir}/a.sock,switch=s,queues=2,mac=52:54:00:00:00:0a",
        "--net",
        "socket={dir}/b.sock,switch=s,queues=2,mac=52:54:00:00:00:0b",
        "--net",
        "socket={dir}/d.sock,switch=s,queues=2,mac=52:54:00:00:00:0d",
    ]);
    let mut a = NetClient::connect(&daemon.path("a.sock"), 2, 0);
    let mut b = NetClient::connect(&daemon.path("b.sock"), 2, 0);
    let mut d = NetClient::connect(&daemon.path("d.sock"), 2, 0);
    b.post_rx(0, 8, 2048);
    b.post_rx(1, 8, 2048);
    // Each sender uses its second pair's tx queue.
    let from_a = ethernet(B, A, 0x0800, &payload(1, 3));
    let from_d = ethernet(B, D, 0x0800, &payload(2, 3));
    a.send(1, &from_a);
    d.send(1, &from_d);
    assert_eq!(b.recv(0).frame, from_a, "a's frame on b's pair 0");
    assert_eq!(b.recv(1).frame, from_d, "d's frame on b's pair 1");
    assert_eq!(stats(&daemon, "a")["tx_frames"], 1);
    assert_eq!(stats(&daemon, "d")["tx_frames"], 1);
    assert_eq!(stats(&daemon, "b")["rx_frames"], 2);
}
