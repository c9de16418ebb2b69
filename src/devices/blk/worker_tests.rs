//! In-process tests of the queue worker, built from its parts (shared state, null engine,
//! a test virtqueue) and driven through the shell's `Worker` interface: kick → parse →
//! engine → used ring, QoS holding, and the drain a queue stop does.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::config::options::OptionList;
use crate::devices::blk::request::Limits;
use crate::devices::shell::{Event, Worker};
use crate::devices::testing::{memory, TestQueue};
use crate::qos::config::QosConfig;
use crate::qos::handle::QosHandle;
use crate::storage::null::NullEngine;
use crate::storage::EngineSource;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const DATA: u64 = 0x10_0000;

fn shared(qos: &str) -> Arc<DeviceShared> {
    let handle = QosHandle::default();
    if !qos.is_empty() {
        let mut options = OptionList::parse(qos).unwrap();
        handle
            .set_limits(&QosConfig::from_options(&mut options).unwrap())
            .unwrap();
    }
    let limits = Limits {
        capacity: 1 << 20,
        readonly: false,
    };
    Arc::new(DeviceShared {
        qos: handle,
        ..DeviceShared::new("t", 1, 16, limits, EngineSource::default())
    })
}

struct Rig {
    mem: &'static GuestMemory,
    queue: TestQueue,
    worker: QueueWorker,
    shared: Arc<DeviceShared>,
    next: u64,
}

impl Rig {
    fn new(qos: &str) -> Self {
        Self::with_queue(qos, 16)
    }

    fn with_queue(qos: &str, size: u16) -> Self {
        Self::with_engine(qos, size, Box::new(NullEngine::default()))
    }

    fn with_engine(qos: &str, size: u16, engine: Box<dyn crate::storage::Engine>) -> Self {
        let (mem, atomic) = memory(4 << 20);
        let queue = TestQueue::new(mem, &atomic, 0, size);
        let shared = shared(qos);
        let worker =
            QueueWorker::new(0, Arc::clone(&shared), engine, atomic, Arc::default()).unwrap();
        Self {
            mem,
            queue,
            worker,
            shared,
            next: DATA,
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let at = self.next;
        self.next += len.div_ceil(16) * 16;
        at
    }

    /// Posts header + data + status; returns (head, status address).
    fn post(&mut self, request_type: u32, sector: u64, data: Option<(u32, bool)>) -> (u16, u64) {
        let header = self.alloc(16);
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&request_type.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(header)).unwrap();
        let status = self.alloc(1);
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let mut chain = vec![(header, 16, false)];
        if let Some((len, writable)) = data {
            let at = self.alloc(u64::from(len));
            self.mem
                .write_slice(&vec![0xaa; len as usize], GuestAddress(at))
                .unwrap();
            chain.push((at, len, writable));
        }
        chain.push((status, 1, true));
        (self.queue.post(&chain), status)
    }

    fn kick(&mut self) {
        let vrings = [self.queue.vring.clone()];
        self.worker.handle(Event::Queue(0), &vrings).unwrap();
    }

    /// Kicks, then serves engine completions until every status byte in `statuses` is
    /// written.
    fn kick_and_complete(&mut self, statuses: &[u64]) {
        use crate::devices::shell::WorkerFd;
        self.kick();
        let vrings = [self.queue.vring.clone()];
        while statuses.iter().any(|&s| self.status(s) == 0xff) {
            let fd = self.worker.completion_fd().unwrap();
            crate::sys::poll::wait_readable_for(fd, std::time::Duration::from_secs(5)).unwrap();
            self.worker
                .handle(Event::Fd(WorkerFd::Completion), &vrings)
                .unwrap();
        }
    }

    fn status(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }
}

#[test]
fn a_kick_runs_requests_on_the_engine_and_returns_them_in_the_used_ring() {
    let mut rig = Rig::new("");
    let (read, read_status) = rig.post(T_IN, 0, Some((4096, true)));
    let (write, write_status) = rig.post(T_OUT, 8, Some((512, false)));
    let (flush, flush_status) = rig.post(T_FLUSH, 0, None);
    rig.kick();
    assert_eq!(
        rig.queue.used(),
        vec![(read, 4097), (write, 1), (flush, 1)],
        "every request completes once, reads with their data length + status"
    );
    for status in [read_status, write_status, flush_status] {
        assert_eq!(rig.status(status), 0, "VIRTIO_BLK_S_OK");
    }
    let stats = rig.shared.stats();
    assert_eq!(stats[0].bytes_read, 4096);
    assert_eq!(stats[0].bytes_written, 512);
    assert_eq!(stats[0].in_flight, 0);
}

#[test]
fn a_bad_request_is_refused_with_ioerr_and_the_next_one_still_runs() {
    let mut rig = Rig::new("");
    // Past the end of the 1 MiB disk.
    let (bad, bad_status) = rig.post(T_IN, 1 << 20, Some((512, true)));
    let (good, good_status) = rig.post(T_IN, 0, Some((512, true)));
    rig.kick();
    assert_eq!(rig.queue.used(), vec![(bad, 1), (good, 513)]);
    assert_eq!(rig.status(bad_status), 1, "VIRTIO_BLK_S_IOERR");
    assert_eq!(rig.status(good_status), 0);
}

#[test]
fn qos_holds_requests_in_order_and_a_queue_stop_answers_every_one_it_took() {
    // One request's worth of tokens. The worker parses a chunk of requests before QoS
    // admits them: the first runs, the rest of the chunk is held in order, and the worker
    // stops taking requests off the ring (back-pressure): the two behind the chunk stay in
    // the ring.
    let mut rig = Rig::with_queue("iops=1,iops-burst=1", 256);
    let posted: Vec<(u16, u64)> = (0..super::ADMIT_CHUNK as u64 + 2)
        .map(|i| rig.post(T_IN, i, Some((512, true))))
        .collect();
    rig.kick();
    let first = posted[0].0;
    assert_eq!(rig.queue.used(), vec![(first, 513)]);
    let held = super::ADMIT_CHUNK - 1;
    assert_eq!(rig.shared.stats()[0].throttled, held as u64);
    // GET_VRING_BASE: what the worker took must be answered, limits or not, in order; what
    // it left in the ring stays there for the next front-end.
    rig.worker.stop_queue(0);
    let answered: Vec<(u16, u32)> = posted[..super::ADMIT_CHUNK]
        .iter()
        .map(|&(head, _)| (head, 513))
        .collect();
    assert_eq!(rig.queue.used(), answered);
    for &(_, status) in &posted[..super::ADMIT_CHUNK] {
        assert_eq!(rig.status(status), 0);
    }
    assert_eq!(
        rig.queue.vring.queue_next_avail(),
        super::ADMIT_CHUNK as u16
    );
    assert!(
        !rig.worker.gate.timer_armed(),
        "nothing held after the stop: an armed timer would wake the worker for nothing"
    );
}

#[test]
fn after_a_failed_flush_every_later_flush_fails() {
    let mut rig = Rig::new("");
    rig.shared.flush_failed.store(true, Ordering::Release);
    let (flush, status) = rig.post(T_FLUSH, 0, None);
    rig.kick();
    assert_eq!(rig.queue.used(), vec![(flush, 1)]);
    assert_eq!(
        rig.status(status),
        1,
        "fsyncgate: never report a later flush as success"
    );
}

#[test]
fn every_write_into_guest_memory_is_marked_in_the_dirty_log() {
    const MEM: usize = 4 << 20;
    let (mem, atomic) = memory(MEM);
    let queue = TestQueue::new(mem, &atomic, 0, 64);
    let shared = shared("");
    // A 1 MiB image of non-zero bytes behind a real io_uring engine.
    let image = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut &image, &[0x5a; 1 << 20]).unwrap();
    let engine = crate::storage::uring::UringEngine::new(Arc::new(image), 64).unwrap();
    let (log, mut bits) = crate::devices::testing::test_log(4096);
    log.set_logging(true);
    let worker = QueueWorker::new(0, Arc::clone(&shared), Box::new(engine), atomic, log).unwrap();
    let mut rig = Rig {
        mem,
        queue,
        worker,
        shared,
        next: DATA,
    };
    // Reads of assorted sizes spread over memory (some unaligned, across page boundaries),
    // writes (which must not need marks, but change nothing), a GET_ID.
    let mut statuses = Vec::new();
    let mut seed = 7u64;
    for round in 0..12u64 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        rig.next += (seed >> 40) % 9000;
        let sectors = 1 + (seed >> 20) % 24;
        let kind = if round % 4 == 3 { T_OUT } else { T_IN };
        let (_, status) = rig.post(
            kind,
            round * 8,
            Some(((sectors * 512) as u32, kind == T_IN)),
        );
        statuses.push(status);
    }
    let (_, id_status) = rig.post(8, 0, Some((20, true)));
    statuses.push(id_status);
    let before: Vec<u8> = {
        let mut b = vec![0u8; MEM];
        rig.mem.read_slice(&mut b, GuestAddress(0)).unwrap();
        b
    };
    rig.kick_and_complete(&statuses);
    assert!(
        statuses.iter().all(|&s| rig.status(s) == 0),
        "all succeeded"
    );
    let mut now = vec![0u8; MEM];
    rig.mem.read_slice(&mut now, GuestAddress(0)).unwrap();
    let changed = crate::devices::testing::assert_changes_logged(&before, &now, &mut bits);
    assert!(changed >= 10, "the I/O changed pages ({changed})");
}

#[test]
fn a_starting_queue_interrupts_the_driver_once_whatever_event_idx_says() {
    // A previous process may have published used entries and died before interrupting
    // (issue 13's stall): the first pass of a (re)started queue interrupts the driver even
    // with nothing to return, and its first return interrupts whatever `used_event` says.
    use std::os::fd::{AsRawFd, FromRawFd};
    use vmm_sys_util::eventfd::EventFd;
    let mut rig = Rig::new("");
    rig.queue.vring.set_queue_event_idx(true);
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    // SAFETY: a duplicate of our own eventfd, owned by the File from here on.
    let dup = unsafe { std::fs::File::from_raw_fd(libc::dup(call.as_raw_fd())) };
    rig.queue.vring.set_call(Some(dup));
    rig.kick();
    assert!(rig.queue.used().is_empty());
    assert!(
        call.read().is_ok_and(|n| n > 0),
        "a starting queue did not interrupt the driver"
    );
    // Later passes interrupt only as EVENT_IDX asks: nothing to return, no interrupt.
    rig.kick();
    assert!(call.read().is_err(), "interrupted with nothing new");
}

#[test]
fn requests_allocate_nothing_once_the_queue_is_warm() {
    // 4 KiB reads and writes and flushes, 16 per kick, on the null engine and on io_uring
    // over a file: after the first kick (which fills the thread's pool of iovec lists),
    // kicks and their completions must not touch the heap (per-queue state is sized for a
    // full queue, iovec lists are reused). (The test queue cannot wrap a chain around its descriptor table: 5 rounds
    // stay inside 256 entries.)
    let image = tempfile::tempfile().unwrap();
    image.set_len(1 << 20).unwrap();
    let uring = crate::storage::uring::UringEngine::new(Arc::new(image), 64).unwrap();
    let engines: [(&str, Box<dyn crate::storage::Engine>); 2] = [
        ("null", Box::new(NullEngine::default())),
        ("io_uring", Box::new(uring)),
    ];
    for (name, engine) in engines {
        let mut rig = Rig::with_engine("", 256, engine);
        let mut counts = Vec::new();
        for round in 0..5u64 {
            let mut statuses = Vec::new();
            for i in 0..16u64 {
                let kind = [T_IN, T_OUT, T_FLUSH][(i % 3) as usize];
                let data = (kind != T_FLUSH).then_some((4096, kind == T_IN));
                statuses.push(rig.post(kind, round * 64 + i * 8, data).1);
            }
            let ((), allocations) =
                crate::alloc_count::allocations_during(|| rig.kick_and_complete(&statuses));
            assert!(
                statuses.iter().all(|&s| rig.status(s) == 0),
                "{name}: all OK"
            );
            counts.push(allocations);
        }
        assert_eq!(
            rig.queue.used().len(),
            80,
            "{name}: every request completed"
        );
        assert_eq!(
            &counts[1..],
            &[0, 0, 0, 0],
            "{name}: allocations per kick of 16: {counts:?}"
        );
    }
}

/// Tokens of `name` left in the device's own buckets.
fn tokens(rig: &Rig, name: &str) -> i64 {
    rig.shared
        .qos
        .tokens()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .unwrap()
}

#[test]
fn limits_that_bind_take_no_credit() {
    // 100 ms of 200 operations a second: a bucket of 20, smaller than a credit.
    let mut rig = Rig::with_queue("iops=200", 128);
    let statuses: Vec<u64> = (0..4)
        .map(|i| rig.post(T_IN, i * 8, Some((512, true))).1)
        .collect();
    rig.kick_and_complete(&statuses);
    assert_eq!(rig.worker.paid_from_credit, 0);
    let ops = tokens(&rig, "iops");
    assert!((16..=17).contains(&ops), "iops tokens {ops}");
}

#[test]
fn limits_that_do_not_bind_charge_exactly_what_the_pass_started() {
    // Buckets of 100 ms: 1000 operations, 40 MiB; refills of 10 operations a millisecond.
    // The pass starts its requests from credits (`qos::credit`), renewed past 32 requests
    // of a kind; what it did not use goes back.
    let mut rig = Rig::with_queue("iops=10000,bps=400M", 128);
    let mut statuses = Vec::new();
    for i in 0..40 {
        statuses.push(rig.post(T_IN, i * 8, Some((4096, true))).1);
    }
    statuses.push(rig.post(T_OUT, 0, Some((512, false))).1);
    statuses.push(rig.post(T_FLUSH, 0, None).1);
    rig.kick_and_complete(&statuses);
    assert!(statuses.iter().all(|&s| rig.status(s) == 0));
    assert_eq!(
        rig.worker.paid_from_credit, 42,
        "every request started as it was parsed"
    );
    let ops = tokens(&rig, "iops");
    assert!(
        (1000 - 42..=1000 - 42 + 50).contains(&ops),
        "iops tokens {ops}"
    );
    let bytes = tokens(&rig, "bps");
    let expected = (400i64 << 20) / 10 - 40 * 4096 - 512;
    assert!(
        (expected..=expected + (2 << 20)).contains(&bytes),
        "bps tokens {bytes}, expected {expected}"
    );
}

#[test]
fn a_refused_credit_gives_its_tokens_back_before_the_chunk_is_charged() {
    // An iops bucket of 40 (100 ms of 400/s): the first read takes a read credit of 32 and
    // uses one; the writes behind it cannot get a write credit (8 left), so they are charged
    // as a chunk, in the middle of the pass once it holds ADMIT_CHUNK (32) of them, which
    // fits only if the read credit's 31 unused tokens went back first. Were they kept, 24
    // writes would be held for the refill timer (and this test's wait for their completions
    // would time out).
    let mut rig = Rig::with_queue("iops=400", 128);
    let mut statuses = vec![rig.post(T_IN, 0, Some((512, true))).1];
    for i in 0..super::ADMIT_CHUNK as u64 {
        statuses.push(rig.post(T_OUT, i, Some((512, false))).1);
    }
    rig.kick_and_complete(&statuses);
    assert!(statuses.iter().all(|&s| rig.status(s) == 0));
    assert_eq!(rig.worker.paid_from_credit, 1, "the read from the credit");
    assert_eq!(rig.shared.stats()[0].throttled, 0, "nothing held");
    let ops = tokens(&rig, "iops");
    assert!(
        (7..=9).contains(&ops),
        "iops tokens {ops}: 40 less the 33 requests"
    );
}
