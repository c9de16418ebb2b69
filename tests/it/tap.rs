//! A tap opened by `novacron::sys::tap` exchanges frames with the kernel, inside a network
//! namespace the test creates (unshare on its own thread): we inject an ARP request from a
//! made-up peer, with a virtio-net header in front, and read back the kernel's ARP reply.
//! Addresses exist only in that namespace; nothing leaves it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use novacron::sys::tap::{offload, Tap};

const TAP_IP: [u8; 4] = [10, 213, 0, 1];
const PEER_IP: [u8; 4] = [10, 213, 0, 2];
const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const VNET_HDR: usize = 12;

fn arp_request() -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR];
    f.extend_from_slice(&[0xff; 6]); // broadcast
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&PEER_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&TAP_IP);
    f
}

fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("iproute2 `ip` is required");
    assert!(status.success(), "ip {args:?} failed");
}

#[test]
fn kernel_answers_arp_through_our_tap_in_a_private_namespace() {
    // A fresh thread gets a fresh network namespace; `ip` run from it inherits that namespace.
    let reply = std::thread::spawn(|| {
        // SAFETY: unshare only changes this thread's namespaces; it touches no memory.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare(CLONE_NEWNET) failed (needs root)");
        let tap = Tap::open("nctest0", false).expect("open tap");
        tap.set_vnet_hdr_size(VNET_HDR as i32).unwrap();
        tap.set_offload(offload::CSUM | offload::TSO4 | offload::TSO6)
            .unwrap();
        ip(&["link", "set", "lo", "up"]);
        ip(&["addr", "add", "10.213.0.1/24", "dev", "nctest0"]);
        ip(&["link", "set", "nctest0", "up"]);
        let mut file = tap.file();
        file.write_all(&arp_request()).expect("inject frame");
        // Read frames (the kernel may also send IPv6 neighbour discovery) until the reply.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; 65_536];
        loop {
            let mut pfd = libc::pollfd {
                fd: file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no ARP reply from the kernel");
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
            let n = match file.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("read tap: {e}"),
            };
            let frame = &buf[VNET_HDR..n];
            if frame.len() >= 42 && frame[12..14] == [0x08, 0x06] && frame[20..22] == [0, 2] {
                return frame.to_vec();
            }
        }
    })
    .join()
    .expect("tap thread");
    assert_eq!(&reply[0..6], &PEER_MAC, "reply not addressed to the peer");
    assert_eq!(&reply[28..32], &TAP_IP, "sender IP");
    assert_eq!(&reply[38..42], &PEER_IP, "target IP");
}
