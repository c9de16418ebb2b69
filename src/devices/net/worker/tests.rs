//! In-process tests of the queue-pair worker: two switch ports built from their parts (shared
//! state, a switch, test virtqueues), connected through the shell's `Device::connect`, and
//! driven through the shell's `Worker` interface.

use std::sync::{Arc, RwLock};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::config::options::OptionList;
use crate::devices::net::config::NetConfig;
use crate::devices::net::fabric::{PortSink, SwitchHub};
use crate::devices::net::frame::{FrameRef, TxFrame};
use crate::devices::net::shared::NetShared;
use crate::devices::net::stats::NetStats;
use crate::devices::net::switch::PortConfig;
use crate::devices::shell::{Device, Event, Pass, Worker};
use crate::devices::testing::{memory, TestQueue};
use crate::qos::config::{Family, QosConfig};
use crate::qos::handle::QosHandle;
use crate::vring::GuestMemory;

const DATA: u64 = 0x10_0000;

/// One guest on the switch: its memory, queue pairs and workers.
struct Guest {
    mem: &'static GuestMemory,
    mac: [u8; 6],
    shared: Arc<NetShared>,
    /// `(rx, tx)` per pair.
    queues: Vec<(TestQueue, TestQueue)>,
    workers: Vec<PairWorker>,
    next: u64,
}

impl Guest {
    fn attach(hub: &Arc<SwitchHub>, id: &str, last: u8, pairs: u16, qos: &str) -> Self {
        Self::try_attach(hub, id, last, pairs, qos, Arc::default(), "").unwrap()
    }

    /// A port that is the destination of a migration (`incoming=on`).
    fn attach_incoming(hub: &Arc<SwitchHub>, id: &str, last: u8) -> Result<Self, String> {
        Self::try_attach(hub, id, last, 1, "", Arc::default(), ",incoming=on")
    }

    /// A guest whose connection has dirty-page log `log`, with `extra` options (`,k=v`);
    /// `Err` if the switch refuses the port.
    fn try_attach(
        hub: &Arc<SwitchHub>,
        id: &str,
        last: u8,
        pairs: u16,
        qos: &str,
        log: Arc<crate::ring::dirty::DirtyLog>,
        extra: &str,
    ) -> Result<Self, String> {
        let mac = [0x52, 0x54, 0, 0, 0, last];
        let spec = format!(
            "socket=/nonexistent/{id}.sock,switch=t,queues={pairs},mac=52:54:00:00:00:{last:02x}{extra}"
        );
        let config = NetConfig::parse(&spec).unwrap();
        let stats = Arc::new(NetStats::default());
        let handle = Arc::new(QosHandle::default());
        if !qos.is_empty() {
            let mut options = OptionList::parse(qos).unwrap();
            let limits = QosConfig::from_options_for(&mut options, Family::Net).unwrap();
            handle.set_limits(&limits).unwrap();
        }
        let port = hub
            .attach(
                id,
                PortConfig {
                    mac,
                    vlan: None,
                    uplink: false,
                },
                config.incoming,
                PortSink::Guest(RwLock::new(None)),
                Arc::clone(&stats),
                Some(Arc::clone(&handle)),
            )
            .map_err(|e| e.to_string())?;
        let shared = Arc::new(NetShared::new(
            config,
            stats,
            handle,
            Vec::new(),
            Some((Arc::clone(hub), port)),
        ));
        let (mem, atomic) = memory(4 << 20);
        let queues: Vec<(TestQueue, TestQueue)> = (0..u64::from(pairs))
            .map(|p| {
                (
                    TestQueue::new(mem, &atomic, p * 0x4000, 16),
                    TestQueue::new(mem, &atomic, p * 0x4000 + 0x2000, 16),
                )
            })
            .collect();
        let workers: Vec<PairWorker> = shared
            .connect(atomic, log)
            .unwrap()
            .into_iter()
            .map(Option::unwrap)
            .collect();
        let vrings: Vec<_> = queues
            .iter()
            .flat_map(|(rx, tx)| [rx.vring.clone(), tx.vring.clone()])
            .collect();
        shared.vrings_created(&vrings);
        Ok(Self {
            mem,
            mac,
            shared,
            queues,
            workers,
            next: DATA,
        })
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let at = self.next;
        self.next += len.div_ceil(64) * 64;
        at
    }

    /// Posts a frame (with a plain 12-byte header) on pair `pair`'s tx queue and kicks it.
    fn send(&mut self, pair: usize, frame: &[u8]) -> u16 {
        let head = self.post_tx(pair, frame);
        self.kick(pair, Event::Queue(1));
        head
    }

    /// Posts `count` rx buffers of 2 KiB on pair `pair`; returns their addresses by head.
    fn post_rx(&mut self, pair: usize, count: usize) -> Vec<(u16, u64)> {
        (0..count)
            .map(|_| {
                let at = self.alloc(2048);
                (self.queues[pair].0.post(&[(at, 2048, true)]), at)
            })
            .collect()
    }

    /// Posts a frame on pair `pair`'s tx queue without a kick; returns its head.
    fn post_tx(&mut self, pair: usize, frame: &[u8]) -> u16 {
        let at = self.alloc(12 + frame.len() as u64);
        self.mem.write_slice(&[0u8; 12], GuestAddress(at)).unwrap();
        self.mem.write_slice(frame, GuestAddress(at + 12)).unwrap();
        self.queues[pair]
            .1
            .post(&[(at, 12 + frame.len() as u32, false)])
    }

    fn kick(&mut self, pair: usize, event: Event) {
        let vrings = [
            self.queues[pair].0.vring.clone(),
            self.queues[pair].1.vring.clone(),
        ];
        self.workers[pair].handle(event, &vrings).unwrap();
    }
}

fn frame(dst: [u8; 6], src: [u8; 6], fill: u8) -> Vec<u8> {
    let mut f = Vec::from(dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend(std::iter::repeat_n(fill, 50));
    f
}

#[test]
fn a_frame_sent_on_one_port_lands_whole_in_the_other_guests_rx_buffer() {
    let hub = Arc::new(SwitchHub::new("t"));
    let mut a = Guest::attach(&hub, "a", 0x0a, 1, "");
    let mut b = Guest::attach(&hub, "b", 0x0b, 1, "");
    let buffers = b.post_rx(0, 2);
    let sent = frame(b.mac, a.mac, 0x5a);
    let head = a.send(0, &sent);
    assert_eq!(a.queues[0].1.used(), vec![(head, 0)], "tx chain returned");
    let used = b.queues[0].0.used();
    assert_eq!(used, vec![(buffers[0].0, 12 + sent.len() as u32)]);
    let mut got = vec![0u8; 12 + sent.len()];
    b.mem
        .read_slice(&mut got, GuestAddress(buffers[0].1))
        .unwrap();
    assert_eq!(&got[12..], &sent[..], "frame bytes intact");
    assert_eq!(a.shared.stats.snapshot().tx_frames, 1);
    assert_eq!(b.shared.stats.snapshot().rx_frames, 1);
}

#[test]
fn a_burst_decides_each_frame_on_its_own_header_though_repeats_reuse_the_decision() {
    let hub = Arc::new(SwitchHub::new("t"));
    // A MAC ending in 00 and EtherType 0: the good header's last four bytes are zeros, so
    // a 10-byte runt of its first bytes reads as the same 14 bytes (zero-filled).
    let mut a = Guest::attach(&hub, "a", 0x00, 1, "");
    let mut b = Guest::attach(&hub, "b", 0x0b, 1, "");
    b.post_rx(0, 8);
    let mut good = frame(b.mac, a.mac, 1);
    good[12..14].fill(0);
    let spoofed = frame(b.mac, [0x52, 0x54, 0, 0, 0, 0x0c], 2);
    // One burst: repeats, a spoofed source between them, and a runt whose bytes are the
    // start of the good header (same 14 bytes read, shorter: a different decision).
    for f in [
        &good,
        &good,
        &spoofed,
        &spoofed,
        &good,
        &good[..10].to_vec(),
        &good,
    ] {
        a.post_tx(0, f);
    }
    a.kick(0, Event::Queue(1));
    assert_eq!(a.queues[0].1.used().len(), 7, "every chain returned");
    assert_eq!(
        b.queues[0].0.used().len(),
        4,
        "the four good frames delivered"
    );
    let drops = hub.stats.snapshot().tx_drops;
    assert_eq!(drops["spoofed"], 2, "{drops:?}");
    assert_eq!(drops["runt"], 1, "{drops:?}");
}

#[test]
fn a_burst_with_one_decision_reaches_every_receiver_in_order_or_is_all_refused() {
    let hub = Arc::new(SwitchHub::new("t"));
    let mut a = Guest::attach(&hub, "a", 0x0a, 1, "");
    let mut b = Guest::attach(&hub, "b", 0x0b, 1, "");
    let mut c = Guest::attach(&hub, "c", 0x0c, 1, "");
    let rx_b = b.post_rx(0, 8);
    let rx_c = c.post_rx(0, 8);
    // Five broadcasts in one burst: one flood decision for all of them.
    for fill in 1..=5u8 {
        a.post_tx(0, &frame([0xff; 6], a.mac, fill));
    }
    a.kick(0, Event::Queue(1));
    for (guest, rx) in [(&b, &rx_b), (&c, &rx_c)] {
        let used = guest.queues[0].0.used();
        assert_eq!(used.len(), 5);
        for (k, (head, _)) in used.iter().enumerate() {
            let at = rx.iter().find(|(h, _)| h == head).unwrap().1;
            let mut fill = [0u8];
            guest
                .mem
                .read_slice(&mut fill, GuestAddress(at + 12 + 14))
                .unwrap();
            assert_eq!(fill[0], k as u8 + 1, "frame {k} out of order");
        }
    }
    assert_eq!(hub.stats.snapshot().tx_frames, 5);
    // Four spoofed frames in one burst: one drop decision, each refused once, every chain
    // returned, nothing sent.
    let sent = a.shared.stats.snapshot().tx_frames;
    for _ in 0..4 {
        a.post_tx(0, &frame(b.mac, [0x52, 0x54, 0, 0, 0, 0x0d], 9));
    }
    a.kick(0, Event::Queue(1));
    assert_eq!(a.queues[0].1.used().len(), 9, "every chain returned");
    assert_eq!(hub.stats.snapshot().tx_drops["spoofed"], 4);
    assert_eq!(a.shared.stats.snapshot().tx_frames, sent);
    assert_eq!(b.queues[0].0.used().len(), 5, "no spoofed frame delivered");
}

#[test]
fn an_rx_buffer_the_one_step_copy_cannot_use_goes_the_general_way() {
    // A receiver's chains outside its memory, then a good one: the one-step copy takes each
    // bad one, finds it not all guest memory, puts it back; the general way refuses it (back
    // empty, a drop) and the frame lands in the good one.
    let hub = Arc::new(SwitchHub::new("t"));
    let mut a = Guest::attach(&hub, "a", 0x0a, 1, "");
    let mut b = Guest::attach(&hub, "b", 0x0b, 1, "");
    let outside = b.queues[0].0.post(&[(0x4000_0000, 2048, true)]);
    // Starts inside the guest's 4 MiB, runs 1 MiB past their end: refused as a whole,
    // though the frame's bytes would fit in the part that exists.
    let past_end = b.queues[0].0.post(&[(0x3f_f000, 0x10_0000, true)]);
    let good = b.post_rx(0, 1)[0];
    let sent = frame(b.mac, a.mac, 0x77);
    a.send(0, &sent);
    let used = b.queues[0].0.used();
    assert_eq!(
        used,
        vec![
            (outside, 0),
            (past_end, 0),
            (good.0, 12 + sent.len() as u32)
        ],
        "the bad chains back empty, the frame in the good one"
    );
    let mut got = vec![0u8; sent.len()];
    b.mem
        .read_slice(&mut got, GuestAddress(good.1 + 12))
        .unwrap();
    assert_eq!(got, sent);
    let drops = b.shared.stats.snapshot().rx_drops;
    assert_eq!(drops.values().sum::<u64>(), 2, "{drops:?}");
}

#[test]
fn tx_chains_of_one_buffer_and_of_several_are_sent_alike_in_one_burst() {
    // One readable buffer takes the one-load path; a header and frame in two buffers, a
    // writable buffer (refused: bad layout) and one buffer again go the general way or back
    // to it, in ring order.
    let hub = Arc::new(SwitchHub::new("t"));
    let mut a = Guest::attach(&hub, "a", 0x0a, 1, "");
    let mut b = Guest::attach(&hub, "b", 0x0b, 1, "");
    let rx = b.post_rx(0, 4);
    let frames: Vec<Vec<u8>> = (1..=3u8).map(|fill| frame(b.mac, a.mac, fill)).collect();
    a.post_tx(0, &frames[0]);
    let header = a.alloc(12);
    let body = a.alloc(frames[1].len() as u64);
    a.mem.write_slice(&[0u8; 12], GuestAddress(header)).unwrap();
    a.mem.write_slice(&frames[1], GuestAddress(body)).unwrap();
    a.queues[0]
        .1
        .post(&[(header, 12, false), (body, frames[1].len() as u32, false)]);
    let bad = a.alloc(128);
    a.queues[0].1.post(&[(bad, 128, true)]);
    a.post_tx(0, &frames[2]);
    a.kick(0, Event::Queue(1));
    assert_eq!(a.queues[0].1.used().len(), 4, "every chain returned");
    let used = b.queues[0].0.used();
    assert_eq!(used.len(), 3);
    for (k, (head, len)) in used.iter().enumerate() {
        assert_eq!(*len, 12 + frames[k].len() as u32);
        let at = rx.iter().find(|(h, _)| h == head).unwrap().1;
        let mut got = vec![0u8; frames[k].len()];
        b.mem.read_slice(&mut got, GuestAddress(at + 12)).unwrap();
        assert_eq!(got, frames[k], "frame {k}");
    }
    assert_eq!(a.shared.stats.snapshot().tx_drops["bad-layout"], 1);
}

#[test]
fn runs_of_flood_and_unicast_decisions_in_one_burst_each_reach_their_own_ports() {
    let hub = Arc::new(SwitchHub::new("t"));
    let mut a = Guest::attach(&hub, "a", 0x0a, 1, "");
    let mut b = Guest::attach(&hub, "b", 0x0b, 1, "");
    let mut c = Guest::attach(&hub, "c", 0x0c, 1, "");
    a.post_rx(0, 2);
    b.post_rx(0, 16);
    c.post_rx(0, 16);
    // b speaks first, so the switch knows where b is (its broadcast reaches a and c).
    b.send(0, &frame([0xff; 6], b.mac, 9));
    // One burst of runs: broadcasts (one flood decision, reused), unicasts to b, frames to
    // four different unknown MACs (four flood decisions), broadcasts again.
    let broadcast = frame([0xff; 6], a.mac, 1);
    let mut burst = vec![broadcast.clone(); 3];
    burst.extend(vec![frame(b.mac, a.mac, 2); 4]);
    burst.extend((0..4u8).map(|i| frame([0x52, 0x54, 0, 0, 1, i], a.mac, 3)));
    burst.extend(vec![broadcast; 3]);
    for f in &burst {
        a.post_tx(0, f);
    }
    a.kick(0, Event::Queue(1));
    assert_eq!(a.queues[0].1.used().len(), 14, "every chain returned");
    assert_eq!(
        b.queues[0].0.used().len(),
        14,
        "b got the floods and its unicasts"
    );
    assert_eq!(
        c.queues[0].0.used().len(),
        1 + 10,
        "c got b's broadcast and the floods, none of b's unicasts"
    );
    assert!(hub.stats.snapshot().tx_drops.values().all(|&n| n == 0));
}

#[test]
fn a_broken_chain_between_good_ones_leaves_no_trace_in_the_slots() {
    let hub = Arc::new(SwitchHub::new("t"));
    let mut a = Guest::attach(&hub, "a", 0x0a, 1, "");
    let mut b = Guest::attach(&hub, "b", 0x0b, 1, "");
    b.post_rx(0, 8);
    // Two bursts: the first fills slots 0 and 1; in the second, slot 1 is half-filled by a
    // chain too short for the header (refused after its spans were written into the slot)
    // before the next good frame takes it.
    let mut posted = Vec::new();
    for fill in [1u8, 2] {
        posted.push(a.post_tx(0, &frame(b.mac, a.mac, fill)));
    }
    a.kick(0, Event::Queue(1));
    posted.push(a.post_tx(0, &frame(b.mac, a.mac, 3)));
    let at = a.alloc(64);
    let broken = a.queues[0].1.post(&[(at, 8, false)]);
    posted.push(broken);
    posted.push(a.post_tx(0, &frame(b.mac, a.mac, 4)));
    a.kick(0, Event::Queue(1));
    let used = a.queues[0].1.used();
    assert_eq!(used.len(), 5, "every chain returned once: {used:?}");
    assert_eq!(used.iter().filter(|(h, _)| *h == broken).count(), 1);
    // In the order they were posted (VIRTIO_F_IN_ORDER), the broken one in its place.
    let heads: Vec<u16> = used.iter().map(|&(h, _)| h).collect();
    assert_eq!(heads, posted, "{used:?}");
    let got = b.queues[0].0.used();
    assert_eq!(
        got.len(),
        4,
        "four good frames, the broken one not: {got:?}"
    );
    assert_eq!(a.shared.stats.snapshot().tx_drops["short-header"], 1);
}

#[test]
fn the_second_queue_pair_carries_traffic_too() {
    let hub = Arc::new(SwitchHub::new("t"));
    let mut a = Guest::attach(&hub, "a", 0x0a, 2, "");
    let mut b = Guest::attach(&hub, "b", 0x0b, 2, "");
    b.post_rx(0, 4);
    b.post_rx(1, 4);
    let head = a.send(1, &frame(b.mac, a.mac, 1));
    assert_eq!(a.queues[1].1.used(), vec![(head, 0)], "pair 1's tx served");
    assert!(a.queues[0].1.used().is_empty(), "pair 0 untouched");
    let delivered = b.queues[0].0.used().len() + b.queues[1].0.used().len();
    assert_eq!(delivered, 1, "delivered to one of b's rx queues");
}

#[test]
fn over_its_tx_limit_a_frame_goes_back_in_the_ring_not_on_the_wire() {
    let hub = Arc::new(SwitchHub::new("t"));
    let mut a = Guest::attach(&hub, "a", 0x0a, 1, "tx-pps=1,tx-pps-burst=1");
    let mut b = Guest::attach(&hub, "b", 0x0b, 1, "");
    b.post_rx(0, 4);
    let first = a.send(0, &frame(b.mac, a.mac, 1));
    let _second = a.send(0, &frame(b.mac, a.mac, 2));
    assert_eq!(
        a.queues[0].1.used(),
        vec![(first, 0)],
        "only the first went"
    );
    assert_eq!(b.queues[0].0.used().len(), 1);
    assert_eq!(
        a.queues[0].1.vring.queue_next_avail(),
        1,
        "the second frame is back in the ring (back-pressure, no drop)"
    );
    let stats = a.shared.stats.snapshot();
    assert_eq!((stats.tx_throttled, stats.total_drops()), (1, 0));
}

#[test]
fn a_burst_cut_by_qos_returns_what_went_before_in_ring_order_and_puts_the_rest_back() {
    // In one burst: a broken chain, a frame the limit admits, one it refuses, another broken
    // chain and a good frame behind it. What goes back to the guest is what came before the
    // refused frame, in ring order (VIRTIO_F_IN_ORDER); from it on, every chain stays in the
    // ring, the broken one behind it too (it is dropped when its turn comes).
    let hub = Arc::new(SwitchHub::new("t"));
    let mut a = Guest::attach(&hub, "a", 0x0a, 1, "tx-pps=1,tx-pps-burst=1");
    let mut b = Guest::attach(&hub, "b", 0x0b, 1, "");
    b.post_rx(0, 4);
    let broken = |a: &mut Guest| {
        let at = a.alloc(64);
        a.queues[0].1.post(&[(at, 8, false)])
    };
    let first_broken = broken(&mut a);
    let admitted = a.post_tx(0, &frame(b.mac, a.mac, 1));
    let _refused = a.post_tx(0, &frame(b.mac, a.mac, 2));
    let _second_broken = broken(&mut a);
    let _behind = a.post_tx(0, &frame(b.mac, a.mac, 3));
    a.kick(0, Event::Queue(1));
    assert_eq!(
        a.queues[0].1.used(),
        vec![(first_broken, 0), (admitted, 0)],
        "what came before the refused frame, in ring order"
    );
    assert_eq!(
        a.queues[0].1.vring.queue_next_avail(),
        2,
        "three chains back in the ring"
    );
    assert_eq!(b.queues[0].0.used().len(), 1, "one frame on the wire");
    let stats = a.shared.stats.snapshot();
    assert_eq!(
        stats.tx_drops.get("short-header"),
        Some(&1),
        "only the first broken chain"
    );
    assert_eq!(stats.tx_throttled, 1);
}

#[test]
fn a_tx_ring_found_disabled_gets_its_kicks_back_before_the_worker_stops_looking() {
    // The worker left the ring asking for no kicks (it was polling), then the front-end
    // disabled it (SET_VRING_ENABLE 0). Once enabled again, only a kick brings the worker
    // back: the flag must not stay set.
    let hub = Arc::new(SwitchHub::new("t"));
    let mut a = Guest::attach(&hub, "a", 0x0a, 1, "");
    let tx = &a.queues[0].1;
    tx.set_used_flags(1);
    tx.vring.set_enabled(false);
    a.post_tx(0, &frame([2, 0, 0, 0, 0, 9], a.mac, 1));
    a.kick(0, Event::Queue(1));
    let tx = &a.queues[0].1;
    assert_eq!(tx.used_flags(), 0, "kicks back on");
    assert!(tx.used().is_empty(), "a disabled ring is not served");
    // Enabled again: its next kick serves what it published meanwhile.
    tx.vring.set_enabled(true);
    a.kick(0, Event::Queue(1));
    assert_eq!(a.queues[0].1.used().len(), 1);
}

#[test]
fn a_receiver_gets_the_ethernet_header_the_switch_checked_not_a_second_read() {
    // The sender's memory says one source MAC; the header the switch read (and checked
    // against anti-spoofing) says another. What lands in the receiver is the checked one:
    // a sender's other vCPU rewriting its buffer after the check changes nothing. Through
    // the sender's burst map (one copy per part) and without one (vm-memory).
    for mapped in [true, false] {
        let hub = Arc::new(SwitchHub::new("t"));
        let a = Guest::attach(&hub, "a", 0x0a, 1, "");
        let mut b = Guest::attach(&hub, "b", 0x0b, 1, "");
        let buffers = b.post_rx(0, 1);
        // What the sender's memory holds by delivery time: its other vCPU rewrote the
        // source MAC after the switch read and checked the header.
        let mut rewritten = frame(b.mac, a.mac, 7);
        rewritten[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 0x66]);
        let at = DATA;
        a.mem.write_slice(&[0u8; 12], GuestAddress(at)).unwrap();
        a.mem
            .write_slice(&rewritten, GuestAddress(at + 12))
            .unwrap();
        let checked = frame(b.mac, a.mac, 7);
        let mut tx = TxFrame {
            frame_len: rewritten.len() as u32,
            eth: checked[..14].try_into().unwrap(),
            ..TxFrame::default()
        };
        tx.spans.push(crate::devices::sg::Span {
            addr: GuestAddress(at),
            len: 12 + rewritten.len() as u32,
        });
        let map = crate::ring::map::MemMap::new(a.mem);
        let sent = FrameRef::Guest {
            memory: a.mem,
            map: mapped.then_some(&map),
            frame: &tx,
        };
        b.shared
            .port_target()
            .unwrap()
            .deliver(&sent, 0, &b.shared.stats)
            .unwrap();
        let mut got = vec![0u8; 12 + checked.len()];
        b.mem
            .read_slice(&mut got, GuestAddress(buffers[0].1))
            .unwrap();
        assert_eq!(
            &got[12..],
            &checked[..],
            "the checked source MAC, and the rest of the frame (mapped: {mapped})"
        );
        assert_eq!(
            got[..12],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            "header, num_buffers 1"
        );
    }
}

#[test]
fn frames_and_used_entries_written_into_guests_are_marked_in_their_dirty_logs() {
    use crate::devices::testing::{assert_changes_logged, test_log};
    let hub = Arc::new(SwitchHub::new("t"));
    let (log_a, mut bits_a) = test_log(4096);
    let (log_b, mut bits_b) = test_log(4096);
    log_a.set_logging(true);
    log_b.set_logging(true);
    let mut a = Guest::try_attach(&hub, "a", 0x0a, 1, "", log_a, "").unwrap();
    let mut b = Guest::try_attach(&hub, "b", 0x0b, 1, "", log_b, "").unwrap();
    b.post_rx(0, 8);
    let snapshot = |g: &Guest| {
        let mut m = vec![0u8; 4 << 20];
        g.mem.read_slice(&mut m, GuestAddress(0)).unwrap();
        m
    };
    let frames: Vec<Vec<u8>> = (0..6u8)
        .map(|i| {
            let mut f = frame(b.mac, a.mac, 0x40 + i);
            f.extend(std::iter::repeat_n(i, usize::from(i) * 250));
            f
        })
        .collect();
    // Posting is the guest's own writing: snapshots are taken after it, so only what the
    // device writes differs.
    let before_b = snapshot(&b);
    for f in &frames {
        let at = a.alloc(12 + f.len() as u64);
        a.mem.write_slice(&[0u8; 12], GuestAddress(at)).unwrap();
        a.mem.write_slice(f, GuestAddress(at + 12)).unwrap();
        a.queues[0].1.post(&[(at, 12 + f.len() as u32, false)]);
    }
    let sent_a = snapshot(&a);
    a.kick(0, Event::Queue(1));
    assert_eq!(a.queues[0].1.used().len(), frames.len(), "all sent");
    assert_eq!(b.queues[0].0.used().len(), frames.len(), "all received");
    let changed_b = assert_changes_logged(&before_b, &snapshot(&b), &mut bits_b);
    assert!(
        changed_b >= 3,
        "rx buffers and the used ring changed ({changed_b})"
    );
    let changed_a = assert_changes_logged(&sent_a, &snapshot(&a), &mut bits_a);
    assert!(changed_a >= 1, "the tx used ring changed");
}

#[test]
fn a_migrating_port_shares_its_mac_and_takes_its_traffic_when_it_announces() {
    let hub = Arc::new(SwitchHub::new("t"));
    let mut source = Guest::attach(&hub, "src", 0x0a, 1, "");
    let mut peer = Guest::attach(&hub, "peer", 0x0b, 1, "");
    // Only a declared migration destination may share a MAC, and only with one port.
    assert!(Guest::try_attach(&hub, "x", 0x0a, 1, "", Arc::default(), "").is_err());
    let mut dest = Guest::attach_incoming(&hub, "dst", 0x0a).unwrap();
    assert!(Guest::attach_incoming(&hub, "y", 0x0a).is_err());
    source.post_rx(0, 4);
    dest.post_rx(0, 4);
    peer.post_rx(0, 4);
    let got = |g: &Guest| g.queues[0].0.used().len();
    // Before the switchover, the MAC lives on the source (once the switch has seen it).
    source.send(0, &frame(peer.mac, source.mac, 1));
    let (at_source, at_dest) = (got(&source), got(&dest));
    peer.send(0, &frame(source.mac, peer.mac, 2));
    assert_eq!(got(&source), at_source + 1);
    assert_eq!(got(&dest), at_dest);
    // The destination announces (QEMU's SEND_RARP): the peer hears the broadcast, and the
    // MAC's traffic goes to the destination from then on.
    let at_peer = got(&peer);
    dest.shared.announce(dest.mac);
    assert_eq!(got(&peer), at_peer + 1, "the RARP was flooded");
    let at_source = got(&source);
    peer.send(0, &frame(dest.mac, peer.mac, 3));
    assert_eq!(got(&dest), at_dest + 1);
    assert_eq!(got(&source), at_source, "nothing more for the source");
    // A front-end cannot announce a MAC that is not its device's.
    dest.shared.announce([0x52, 0x54, 0, 0, 0, 0x0b]);
    assert_eq!(got(&peer), at_peer + 1);
}

#[test]
fn a_busy_port_in_the_poll_group_forwards_frames_posted_without_a_kick() {
    let hub = Arc::new(SwitchHub::new("t"));
    let mut a = Guest::try_attach(&hub, "a", 0x0a, 1, "", Arc::default(), ",poll=busy").unwrap();
    let mut b = Guest::attach(&hub, "b", 0x0b, 1, "");
    b.post_rx(0, 4);
    let vrings = [a.queues[0].0.vring.clone(), a.queues[0].1.vring.clone()];
    // The first frame comes with a kick; the worker then asks for the group.
    let first = a.send(0, &frame(b.mac, a.mac, 1));
    assert_eq!(a.queues[0].1.used(), vec![(first, 0)]);
    assert!(
        Worker::wants_group(&mut a.workers[0], &vrings),
        "busy mode asks for the group"
    );
    Worker::joined_group(&mut a.workers[0]);
    assert!(
        !Worker::wants_group(&mut a.workers[0], &vrings),
        "once a member, not again"
    );
    // Nothing queued: an idle look.
    assert_eq!(Worker::group_pass(&mut a.workers[0], &vrings), Pass::Idle);
    // A frame posted with no kick at all is forwarded by the group's next pass.
    let at = a.alloc(12 + 64);
    let sent = frame(b.mac, a.mac, 2);
    a.mem.write_slice(&[0u8; 12], GuestAddress(at)).unwrap();
    a.mem.write_slice(&sent, GuestAddress(at + 12)).unwrap();
    let head = a.queues[0].1.post(&[(at, 12 + sent.len() as u32, false)]);
    // One frame of a possible 32: a part burst, after which the round may pause.
    assert_eq!(
        Worker::group_pass(&mut a.workers[0], &vrings),
        Pass::Drained
    );
    assert_eq!(
        a.queues[0].1.used(),
        vec![(first, 0), (head, 0)],
        "tx chain returned"
    );
    assert_eq!(b.queues[0].0.used().len(), 2, "both frames reached b");
    // A stopped queue leaves the group without being touched, and a stopped queue does
    // not join; once it runs again, an event joins it again.
    a.queues[0]
        .1
        .vring
        .get_mut()
        .get_queue_mut()
        .set_ready(false);
    let before = a.queues[0].1.used();
    assert_eq!(Worker::group_pass(&mut a.workers[0], &vrings), Pass::Leave);
    assert_eq!(a.queues[0].1.used(), before);
    assert!(
        !Worker::wants_group(&mut a.workers[0], &vrings),
        "stopped: no group"
    );
    a.queues[0]
        .1
        .vring
        .get_mut()
        .get_queue_mut()
        .set_ready(true);
    assert!(
        Worker::wants_group(&mut a.workers[0], &vrings),
        "a later event joins again"
    );
    // GET_VRING_BASE on the tx queue ends the membership too.
    Worker::joined_group(&mut a.workers[0]);
    Worker::stop_queue(&mut a.workers[0], 1);
    assert_eq!(Worker::group_pass(&mut a.workers[0], &vrings), Pass::Leave);
}

#[test]
fn a_ring_disabled_under_the_poll_group_leaves_it_with_kicks_back_on() {
    // The group polls with kicks off; a front-end's SET_VRING_ENABLE 0 must not leave the
    // ring that way once the group lets go of it (only a kick brings the worker back).
    let hub = Arc::new(SwitchHub::new("t"));
    let mut a = Guest::try_attach(&hub, "a", 0x0a, 1, "", Arc::default(), ",poll=busy").unwrap();
    let vrings = [a.queues[0].0.vring.clone(), a.queues[0].1.vring.clone()];
    Worker::joined_group(&mut a.workers[0]);
    let tx = &a.queues[0].1;
    tx.set_used_flags(1);
    tx.vring.set_enabled(false);
    assert_eq!(Worker::group_pass(&mut a.workers[0], &vrings), Pass::Leave);
    assert_eq!(a.queues[0].1.used_flags(), 0, "kicks back on");
    assert!(
        !Worker::wants_group(&mut a.workers[0], &vrings),
        "disabled: no group"
    );
}
