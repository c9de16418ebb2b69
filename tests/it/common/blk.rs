//! A virtio-blk test client over vhost-user: negotiates like QEMU does, then issues requests
//! (well-formed or not) on split virtqueues in memfd guest memory.

use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use vm_memory::{Bytes, GuestAddress};

use super::memory::TestMemory;
use super::virtq::Virtq;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

pub const F_RO: u64 = 1 << 5;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_MQ: u64 = 1 << 12;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;
pub const F_INDIRECT: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_PROTOCOL: u64 = 1 << 30;
pub const F_VERSION_1: u64 = 1 << 32;

const RING_STRIDE: u64 = 0x1_0000;
const HEAP_START: u64 = 4 << 20;
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// How to connect.
#[derive(Clone)]
pub struct ConnectOptions {
    pub queues: u16,
    pub queue_size: u16,
    pub event_idx: bool,
    /// Guest memory ranges `(gpa, size)`; the first must start at 0.
    pub memory: Vec<(u64, usize)>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            queues: 1,
            queue_size: 256,
            event_idx: true,
            memory: vec![(0, 32 << 20)],
        }
    }
}

/// A connected virtio-blk front-end.
pub struct BlkClient {
    pub frontend: Frontend,
    pub mem: TestMemory,
    pub queues: Vec<Virtq>,
    pub device_features: u64,
    heap: u64,
    heap_end: u64,
}

/// The outcome of one request.
#[derive(Debug)]
pub struct Reply {
    pub status: u8,
    pub used_len: u32,
    pub data: Vec<u8>,
}

impl BlkClient {
    /// Connects with defaults (1 queue of 256, EVENT_IDX, 32 MiB of memory).
    pub fn connect(socket: &Path) -> BlkClient {
        Self::connect_with(socket, ConnectOptions::default())
    }

    /// Connects and sets up every queue.
    pub fn connect_with(socket: &Path, options: ConnectOptions) -> BlkClient {
        let mut client = Self::negotiate(socket, &options);
        for q in 0..usize::from(options.queues) {
            client.setup_queue(q, options.queue_size);
        }
        client
    }

    /// Feature and memory negotiation only; queues are set up by the caller.
    pub fn negotiate(socket: &Path, options: &ConnectOptions) -> BlkClient {
        Self::negotiate_declining(socket, options, 0)
    }

    /// Like [`BlkClient::negotiate`], not acking the feature bits in `decline` (any device:
    /// the vhost-user setup is the same).
    pub fn negotiate_declining(socket: &Path, options: &ConnectOptions, decline: u64) -> BlkClient {
        let mut frontend = Frontend::connect(socket, 8).expect("connect");
        frontend.set_owner().expect("set_owner");
        let device_features = frontend.get_features().expect("get_features");
        assert_ne!(
            device_features & F_PROTOCOL,
            0,
            "PROTOCOL_FEATURES not offered"
        );
        let protocol = frontend
            .get_protocol_features()
            .expect("get_protocol_features");
        for needed in [
            VhostUserProtocolFeatures::MQ,
            VhostUserProtocolFeatures::CONFIG,
            VhostUserProtocolFeatures::REPLY_ACK,
            VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        ] {
            assert!(protocol.contains(needed), "{needed:?} not offered");
        }
        frontend
            .set_protocol_features(
                VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                    | (protocol & VhostUserProtocolFeatures::BACKEND_REQ),
            )
            .expect("set_protocol_features");
        frontend.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
        let queue_num = frontend.get_queue_num().expect("get_queue_num");
        assert!(
            queue_num >= u64::from(options.queues),
            "device has {queue_num} queues"
        );
        let mut acked = device_features & !F_EVENT_IDX & !decline;
        if options.event_idx {
            acked |= device_features & F_EVENT_IDX;
        }
        frontend.set_features(acked).expect("set_features");
        let mem = TestMemory::new(&options.memory);
        frontend
            .set_mem_table(&mem.regions())
            .expect("set_mem_table");
        let heap_end = options
            .memory
            .iter()
            .map(|&(gpa, size)| gpa + size as u64)
            .max()
            .unwrap();
        BlkClient {
            frontend,
            mem,
            queues: Vec::new(),
            device_features,
            heap: HEAP_START,
            heap_end,
        }
    }

    /// Configures queue `q` with `size` entries and enables it.
    pub fn setup_queue(&mut self, q: usize, size: u16) {
        let mut vq = Virtq::new(size, RING_STRIDE * q as u64);
        vq.reset(&self.mem.mem);
        self.frontend.set_vring_num(q, size).expect("set_vring_num");
        let config = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: self.mem.host_address(vq.desc),
            used_ring_addr: self.mem.host_address(vq.used),
            avail_ring_addr: self.mem.host_address(vq.avail),
            log_addr: None,
        };
        self.frontend
            .set_vring_addr(q, &config)
            .expect("set_vring_addr");
        self.frontend.set_vring_base(q, 0).expect("set_vring_base");
        self.frontend
            .set_vring_call(q, &vq.call)
            .expect("set_vring_call");
        self.frontend
            .set_vring_kick(q, &vq.kick)
            .expect("set_vring_kick");
        self.frontend
            .set_vring_enable(q, true)
            .expect("set_vring_enable");
        if self.queues.len() <= q {
            self.queues.push(vq);
        } else {
            self.queues[q] = vq;
        }
    }

    /// Reads `size` bytes of config space at `offset`.
    pub fn config(&mut self, offset: u32, size: u32) -> Vec<u8> {
        let (_, payload) = self
            .frontend
            .get_config(
                offset,
                size,
                VhostUserConfigFlags::WRITABLE,
                &vec![0u8; size as usize],
            )
            .expect("get_config");
        payload.to_vec()
    }

    /// Capacity from the config space, in sectors.
    pub fn capacity_sectors(&mut self) -> u64 {
        u64::from_le_bytes(self.config(0, 8).try_into().unwrap())
    }

    /// Allocates guest memory for buffers (bump allocator, wraps around).
    pub fn alloc(&mut self, len: u64) -> u64 {
        let len = (len.max(1) + 511) & !511;
        if self.heap + len > self.heap_end {
            self.heap = HEAP_START;
        }
        let at = self.heap;
        self.heap += len;
        at
    }

    /// Writes bytes into guest memory.
    pub fn poke(&self, gpa: u64, bytes: &[u8]) {
        self.mem.mem.write_slice(bytes, GuestAddress(gpa)).unwrap();
    }

    /// Reads bytes from guest memory.
    pub fn peek(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem
            .mem
            .read_slice(&mut out, GuestAddress(gpa))
            .unwrap();
        out
    }

    /// A request header in fresh guest memory.
    pub fn header(&mut self, request_type: u32, sector: u64) -> u64 {
        let at = self.alloc(16);
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&request_type.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        self.poke(at, &raw);
        at
    }

    /// Posts `buffers` on queue `q` without waiting; returns the head.
    pub fn post(&mut self, q: usize, buffers: &[(u64, u32, bool)]) -> u16 {
        let mem = &self.mem.mem;
        self.queues[q].post(mem, buffers)
    }

    /// Posts `buffers` on queue `q` without a kick (only a polling device finds them).
    pub fn post_quiet(&mut self, q: usize, buffers: &[(u64, u32, bool)]) -> u16 {
        let mem = &self.mem.mem;
        self.queues[q].post_quiet(mem, buffers)
    }

    /// Waits for `count` completions on queue `q`.
    pub fn wait(&mut self, q: usize, count: usize) -> Vec<(u16, u32)> {
        let mem = &self.mem.mem;
        self.queues[q].wait_used(mem, count, TIMEOUT)
    }

    /// Posts a chain and waits for its completion; returns `used_len`.
    pub fn roundtrip(&mut self, q: usize, buffers: &[(u64, u32, bool)]) -> u32 {
        let head = self.post(q, buffers);
        let used = self.wait(q, 1);
        assert_eq!(used[0].0, head, "completion for another head");
        used[0].1
    }

    /// A standard three-part request: header, data (out or in), status.
    pub fn request(
        &mut self,
        q: usize,
        request_type: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
    ) -> Reply {
        let header = self.header(request_type, sector);
        let status = self.alloc(1);
        self.poke(status, &[0xff]);
        let mut buffers = vec![(header, 16, false)];
        if !out.is_empty() {
            let data = self.alloc(out.len() as u64);
            self.poke(data, out);
            buffers.push((data, out.len() as u32, false));
        }
        let mut in_at = 0;
        if in_len > 0 {
            in_at = self.alloc(u64::from(in_len));
            buffers.push((in_at, in_len, true));
        }
        buffers.push((status, 1, true));
        let used_len = self.roundtrip(q, &buffers);
        Reply {
            status: self.peek(status, 1)[0],
            used_len,
            data: if in_len > 0 {
                self.peek(in_at, in_len as usize)
            } else {
                Vec::new()
            },
        }
    }

    pub fn read(&mut self, q: usize, sector: u64, len: u32) -> Vec<u8> {
        let reply = self.request(q, T_IN, sector, &[], len);
        assert_eq!(reply.status, S_OK, "read at sector {sector}");
        assert_eq!(reply.used_len, len + 1);
        reply.data
    }

    pub fn write(&mut self, q: usize, sector: u64, data: &[u8]) {
        let reply = self.request(q, T_OUT, sector, data, 0);
        assert_eq!(reply.status, S_OK, "write at sector {sector}");
    }

    pub fn flush(&mut self, q: usize) -> u8 {
        self.request(q, T_FLUSH, 0, &[], 0).status
    }

    /// Discard or write-zeroes with `(sector, num_sectors, flags)` segments.
    pub fn ranges(&mut self, q: usize, request_type: u32, segments: &[(u64, u32, u32)]) -> u8 {
        let mut raw = Vec::new();
        for &(sector, n, flags) in segments {
            raw.extend_from_slice(&sector.to_le_bytes());
            raw.extend_from_slice(&n.to_le_bytes());
            raw.extend_from_slice(&flags.to_le_bytes());
        }
        self.request(q, request_type, 0, &raw, 0).status
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures replay.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
