//! A virtio-net test client over vhost-user (the `vhost` crate's front-end, memfd memory):
//! posts rx buffers, sends frames with a virtio-net header, collects received frames.

use std::collections::HashMap;
use std::path::Path;

use super::blk::{BlkClient, ConnectOptions};

pub const HDR: usize = 12;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_MRG_RXBUF: u64 = 1 << 15;

/// A connected virtio-net front-end with `pairs` queue pairs.
pub struct NetClient {
    pub vq: BlkClient,
    /// Posted rx buffers by (queue, head): (address, length).
    rx_buffers: HashMap<(usize, u16), (u64, u32)>,
}

/// A received frame.
#[derive(Debug, Clone)]
pub struct Received {
    pub header: [u8; HDR],
    pub frame: Vec<u8>,
    pub buffers: usize,
}

impl Received {
    pub fn num_buffers(&self) -> u16 {
        u16::from_le_bytes([self.header[10], self.header[11]])
    }
}

impl NetClient {
    /// Connects acking every offered feature except those in `decline`.
    pub fn connect(socket: &Path, pairs: u16, decline: u64) -> NetClient {
        let options = ConnectOptions {
            queues: pairs * 2,
            ..ConnectOptions::default()
        };
        let mut vq = BlkClient::negotiate_declining(socket, &options, decline);
        for q in 0..usize::from(pairs * 2) {
            vq.setup_queue(q, options.queue_size);
        }
        NetClient {
            vq,
            rx_buffers: HashMap::new(),
        }
    }

    /// Posts `count` rx buffers of `len` bytes on pair `pair`.
    pub fn post_rx(&mut self, pair: usize, count: usize, len: u32) {
        let q = pair * 2;
        for _ in 0..count {
            let at = self.vq.alloc(u64::from(len));
            let head = self.vq.post(q, &[(at, len, true)]);
            self.rx_buffers.insert((q, head), (at, len));
        }
    }

    /// Sends `frame` with `header` on pair `pair` as the chain `split` describes (lengths of
    /// the descriptors; the last one takes the rest) and waits until it is consumed.
    pub fn send_split(&mut self, pair: usize, header: [u8; HDR], frame: &[u8], split: &[u32]) {
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(frame);
        let mut chain = Vec::new();
        let mut offset = 0usize;
        for (i, &len) in split.iter().enumerate() {
            let len = if i + 1 == split.len() {
                bytes.len() - offset
            } else {
                len as usize
            };
            let at = self.vq.alloc(len as u64);
            self.vq.poke(at, &bytes[offset..offset + len]);
            chain.push((at, len as u32, false));
            offset += len;
        }
        let used = self.vq.roundtrip(pair * 2 + 1, &chain);
        assert_eq!(used, 0, "tx used length must be 0");
    }

    /// Sends a frame with a plain header in one descriptor.
    pub fn send(&mut self, pair: usize, frame: &[u8]) {
        self.send_split(pair, [0; HDR], frame, &[0]);
    }

    /// Sends raw descriptors `(addr, len, writable)` on the tx queue and waits.
    pub fn send_raw(&mut self, pair: usize, chain: &[(u64, u32, bool)]) {
        self.vq.roundtrip(pair * 2 + 1, chain);
    }

    /// Waits for the next frame on pair `pair` (gathering mergeable buffers).
    pub fn recv(&mut self, pair: usize) -> Received {
        let q = pair * 2;
        let first = self.vq.wait(q, 1)[0];
        let mut data = self.take_rx(q, first);
        let header: [u8; HDR] = data[..HDR].try_into().unwrap();
        let count = u16::from_le_bytes([header[10], header[11]]).max(1) as usize;
        if count > 1 {
            for used in self.vq.wait(q, count - 1) {
                data.extend(self.take_rx(q, used));
            }
        }
        Received {
            header,
            frame: data[HDR..].to_vec(),
            buffers: count,
        }
    }

    /// Whether a frame is waiting on pair `pair` (no blocking).
    pub fn rx_pending(&self, pair: usize) -> bool {
        self.vq.queues[pair * 2].used_pending(&self.vq.mem.mem)
    }

    fn take_rx(&mut self, q: usize, (head, len): (u16, u32)) -> Vec<u8> {
        let (at, size) = self
            .rx_buffers
            .remove(&(q, head))
            .unwrap_or_else(|| panic!("used entry for a head we never posted: {head}"));
        assert!(
            len <= size,
            "device wrote {len} bytes into a {size}-byte buffer"
        );
        self.vq.peek(at, len as usize)
    }
}

/// An Ethernet frame `dst <- src` with `ethertype` and `payload`.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}
