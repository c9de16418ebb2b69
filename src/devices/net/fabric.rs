//! Named L2 switches inside the daemon and their ports: where the forwarding decisions of
//! [`Switch`] turn into copies from one guest's tx buffers into other guests' rx buffers.
//!
//! - A **guest port** is a net device with `switch=NAME`. Its receive side ([`RxTarget`]) is
//!   filled by whichever thread sends to it, under that rx queue's lock: one copy, guest
//!   memory to guest memory. A receiver with no rx buffers loses the frame (counted
//!   `no-rx-buffers` on its rx side) — the sender never waits, so one slow guest never
//!   blocks the others. A port with no front-end connected counts `link-down`.
//! - An **uplink** is a tap (`switch.add NAME uplink=TAP`): frames to it are written with
//!   `writev` straight from the sender's buffers; frames from it are read into the uplink
//!   thread's buffer, then copied into the receivers.
//!
//! Offloads: a frame with a partial checksum for a guest that did not accept `GUEST_CSUM` is
//! checksummed in software first (through one bounce buffer). A GSO frame for a guest that
//! did not accept that GSO type is **dropped and counted** (`gso-unsupported`); we do not
//! segment in software. Linux guests accept every offload we offer, so this only concerns
//! front-ends that decline them.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use smallvec::SmallVec;

use super::frame::{FrameRef, Frames};
use super::rx::RxTarget;
use super::stats::{Direction, Drop, NetStats, Tally};
use super::switch::{DropReason, Forward, Mac, PortConfig, Switch};
use super::tap_queue::TapQueue;
use crate::lock::lock;
use crate::qos::gate::admit;
use crate::qos::handle::QosHandle;
use crate::qos::limiter::{Cost, CostKind};

/// How long a learnt MAC stays valid without traffic from it.
pub const AGING: std::time::Duration = std::time::Duration::from_secs(300);

/// Why a port could not join a switch.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Another guest port has that MAC.
    #[error("MAC {mac} is already used by port {port} on this switch")]
    MacInUse {
        /// The MAC.
        mac: String,
        /// The port that has it.
        port: String,
    },
}

/// Where frames for a port go.
pub enum PortSink {
    /// A guest's receive side (absent while no front-end is connected).
    Guest(RwLock<Option<Arc<RxTarget>>>),
    /// An uplink tap.
    Uplink(Mutex<TapQueue>),
}

/// One port of a switch.
pub struct Port {
    /// Port number inside the switch.
    pub number: u32,
    /// The device (or `uplink:TAP`) behind it.
    pub name: String,
    /// Its forwarding settings.
    pub config: PortConfig,
    /// Where its frames go.
    pub sink: PortSink,
    /// Its counters (the device's own counters for a guest port).
    pub stats: Arc<NetStats>,
    /// The device's rate limits (a guest port), charged for what it receives.
    pub qos: Option<Arc<QosHandle>>,
}

impl Port {
    /// Delivers `frames[i]` for each `i` in `picks`, in order; drops are counted on this
    /// port and in `hub`, deliveries in `hub`.
    fn deliver_burst<F: Frames + ?Sized>(
        &self,
        frames: &F,
        picks: &[u16],
        hash: usize,
        hub: &NetStats,
    ) {
        let len = |i: u16| {
            frames
                .frame(usize::from(i))
                .map_or(0, |f| u64::from(f.len()))
        };
        // The hub's deliveries are added once for the burst (see `NetStats::sent_tally`).
        let delivered = std::cell::Cell::new(Tally::default());
        let outcome = |_: u16, bytes: u64, result: Result<(), Drop>| match result {
            Ok(()) => {
                let mut tally = delivered.get();
                tally.add(bytes);
                delivered.set(tally);
            }
            Err(reason) => {
                self.stats.dropped(Direction::Rx, reason);
                hub.dropped(Direction::Rx, reason);
            }
        };
        self.deliver_counted(frames, picks, hash, len, outcome);
        hub.received_tally(delivered.get());
    }

    fn deliver_counted<F: Frames + ?Sized>(
        &self,
        frames: &F,
        picks: &[u16],
        hash: usize,
        len: impl Fn(u16) -> u64,
        outcome: impl Fn(u16, u64, Result<(), Drop>),
    ) {
        match &self.sink {
            PortSink::Guest(target) => {
                // Delivered under the read guard (only queue start/stop write it): no reference
                // count round trip per frame.
                let guard = target
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let Some(target) = guard.as_ref() else {
                    picks
                        .iter()
                        .for_each(|&i| outcome(i, len(i), Err(Drop::LinkDown)));
                    return;
                };
                let limits = self.qos.as_ref().filter(|q| q.is_enabled());
                let cost = |i: u16| Cost {
                    kind: CostKind::Rx,
                    bytes: len(i),
                };
                let mut admitted: SmallVec<[u16; MAX_BURST]> = SmallVec::new();
                match limits {
                    None => admitted.extend_from_slice(picks),
                    Some(qos) => {
                        let mut now = None;
                        for &i in picks {
                            // Over the receiver's limit: the switch drops (its policy for a
                            // port that cannot take a frame now: a sender never waits).
                            match admit(qos, Some(cost(i)), &mut now) {
                                Ok(()) => admitted.push(i),
                                Err(wait) => {
                                    self.stats.throttled(Direction::Rx, wait);
                                    outcome(i, len(i), Err(Drop::Throttled));
                                }
                            }
                        }
                    }
                }
                target.deliver_burst(frames, &admitted, hash, &self.stats, |i, result| {
                    if let (Err(_), Some(qos)) = (&result, limits) {
                        qos.refund(cost(i));
                    }
                    outcome(i, len(i), result);
                });
            }
            PortSink::Uplink(tap) => {
                let mut tap = lock(tap);
                for &i in picks {
                    let Some(frame) = frames.frame(usize::from(i)) else {
                        continue;
                    };
                    let result = tap.send(&frame).map(|()| self.stats.received(len(i)));
                    outcome(i, len(i), result);
                }
            }
        }
    }
}

/// Most frames a sender hands the switch at once.
pub const MAX_BURST: usize = 64;
// A burst's frames index its decisions with a `u8` (`SwitchHub::transmit_burst`).
const _: () = assert!(MAX_BURST < 256);

/// A named switch: its forwarding table and ports.
pub struct SwitchHub {
    name: String,
    table: Mutex<Switch>,
    ports: RwLock<BTreeMap<u32, Arc<Port>>>,
    next_port: AtomicU32,
    /// Frames in (tx side), copies out (rx side) and drops by reason.
    pub stats: NetStats,
}

impl SwitchHub {
    /// An empty switch.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            table: Mutex::new(Switch::new(
                u64::try_from(AGING.as_nanos()).unwrap_or(u64::MAX),
            )),
            ports: RwLock::new(BTreeMap::new()),
            next_port: AtomicU32::new(1),
            stats: NetStats::default(),
        }
    }

    /// The switch's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Attaches a port; returns it. A guest port's MAC must be unique on the switch: two
    /// ports claiming one MAC would each be allowed to send as the other (anti-spoofing checks
    /// the port's own MAC) and would steal each other's traffic.
    ///
    /// The one exception is a live migration on this switch: the destination's port, declared
    /// `incoming`, may share its MAC with one other port (the source's) while both exist. Only
    /// one of the two has a running guest at any time (QEMU stops the source before the
    /// destination starts); frames to the MAC follow the last port it was seen on, so it moves
    /// to the destination with its first frame (the RARP QEMU has us send at the switchover).
    pub fn attach(
        &self,
        name: &str,
        config: PortConfig,
        incoming: bool,
        sink: PortSink,
        stats: Arc<NetStats>,
        qos: Option<Arc<QosHandle>>,
    ) -> Result<Arc<Port>, AttachError> {
        let mut ports = self
            .ports
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !config.uplink {
            let mut same = ports
                .values()
                .filter(|p| !p.config.uplink && p.config.mac == config.mac);
            if let Some(other) = same.next() {
                if !incoming || same.next().is_some() {
                    return Err(AttachError::MacInUse {
                        mac: mac_text(&config.mac),
                        port: other.name.clone(),
                    });
                }
                log::info!(
                    "switch {}: {name} shares MAC {} with {} (incoming migration)",
                    self.name,
                    mac_text(&config.mac),
                    other.name
                );
            }
        }
        let number = self.next_port.fetch_add(1, Ordering::Relaxed);
        let port = Arc::new(Port {
            number,
            name: name.to_string(),
            config,
            sink,
            stats,
            qos,
        });
        lock(&self.table).attach(number, config);
        ports.insert(number, Arc::clone(&port));
        log::info!("switch {}: port {number} ({name}) attached", self.name);
        Ok(port)
    }

    /// Detaches a port and forgets its MACs.
    pub fn detach(&self, number: u32) {
        lock(&self.table).detach(number);
        let removed = self
            .ports
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&number);
        if let Some(port) = removed {
            log::info!(
                "switch {}: port {number} ({}) detached",
                self.name,
                port.name
            );
        }
    }

    /// The ports, in number order.
    pub fn ports(&self) -> Vec<Arc<Port>> {
        self.ports
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// MACs learnt and still alive.
    pub fn learnt(&self) -> usize {
        lock(&self.table).learnt(crate::sys::clock::coarse_now_ns())
    }

    /// Forwards a frame that entered on port `ingress`; `Err` if the switch refused it.
    pub fn transmit(&self, ingress: &Port, frame: &FrameRef<'_>) -> Result<(), Drop> {
        let mut result = Ok(());
        self.transmit_burst(ingress, std::slice::from_ref(frame), |_, reason| {
            result = Err(reason);
        });
        result
    }

    /// Forwards a burst of frames (at most [`MAX_BURST`]; the rest are refused) that entered
    /// on port `ingress`, in order: the forwarding table is locked once, and each receiver
    /// gets its frames in one delivery (one rx queue lock, one used-index store, at most one
    /// interrupt). `refused(i, reason)` hears about each frame the switch itself dropped,
    /// under the ports' read lock: it must not attach or detach ports, nor read them.
    /// Each frame's Ethernet header was read once, with its virtio header, when its chain was
    /// checked; the decision is made on that copy and the frame leaves with it.
    pub fn transmit_burst<F: Frames + ?Sized>(
        &self,
        ingress: &Port,
        frames: &F,
        mut refused: impl FnMut(u16, Drop),
    ) {
        let count = frames.count().min(MAX_BURST);
        for i in MAX_BURST..frames.count() {
            refused(u16::try_from(i).unwrap_or(u16::MAX), Drop::TooLarge);
        }
        // Each decision once per run of frames with the same header, and each frame's index
        // into them (no copy of a flood list per frame).
        let mut decisions: SmallVec<[Forward; MAX_BURST]> = SmallVec::new();
        let mut chosen: SmallVec<[u8; MAX_BURST]> = SmallVec::new();
        let mut sent = Tally::default();
        {
            let now = crate::sys::clock::coarse_now_ns();
            let mut table = lock(&self.table);
            // The previous frame's Ethernet header and probe length: a frame with the same
            // ones gets the same decision without a second look-up. (`forward` depends only
            // on the ingress port, those bytes, the clock, fixed for the burst, and the table,
            // which the previous frame's learning already left as this one's would.)
            let mut previous: Option<HeaderKey> = None;
            for i in 0..count {
                let Some(frame) = frames.frame(i) else {
                    // Not a frame: refused below as choosing no decision.
                    chosen.push(u8::MAX);
                    continue;
                };
                // The header the frame was checked with, and leaves with: read where it lies
                // (a copy by value went through the stack, with the stall `HeaderKey` says).
                let owned;
                let eth = match frame.checked_ethernet() {
                    Some(eth) => eth,
                    None => {
                        owned = frame.ethernet_header();
                        &owned
                    }
                };
                let len = usize::try_from(frame.len()).unwrap_or(usize::MAX);
                sent.add(u64::from(frame.len()));
                let probe_len = len.min(eth.len());
                let key = HeaderKey::of(eth, probe_len);
                let repeat = previous == Some(key);
                if !repeat {
                    // The forwarding core looks at the Ethernet header only; pass it with the
                    // real length so runts are still recognised.
                    decisions.push(table.forward(
                        ingress.number,
                        eth.get(..probe_len).unwrap_or_default(),
                        now,
                    ));
                }
                // At most MAX_BURST (a u8) decisions.
                chosen.push(u8::try_from(decisions.len().saturating_sub(1)).unwrap_or(u8::MAX));
                previous = Some(key);
            }
        }
        self.stats.sent_tally(sent);
        // Delivered under the ports' read lock (only attach/detach write it): no reference
        // counting per frame.
        let ports = self
            .ports
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut picks: SmallVec<[u16; MAX_BURST]> = SmallVec::new();
        // One decision for every frame (a flow's burst, the usual case): the frames go in
        // order, with no (port, frame) pairs to build and sort.
        if let [only] = decisions.as_slice() {
            if chosen.iter().all(|&c| c == 0) {
                picks.extend((0..count).filter_map(|i| u16::try_from(i).ok()));
                let receivers: &[u32] = match only {
                    Forward::Unicast(port) => std::slice::from_ref(port),
                    // Sorted and without repeats (the switch builds it from its port map):
                    // the order and deliveries the general path's sort would give.
                    Forward::Flood(list) => {
                        debug_assert!(list.windows(2).all(|w| w.first() < w.get(1)));
                        list
                    }
                    Forward::Drop(reason) => {
                        for &i in &picks {
                            self.stats.dropped(Direction::Tx, Drop::Switch(*reason));
                            refused(i, Drop::Switch(*reason));
                        }
                        return;
                    }
                };
                for number in receivers {
                    if let Some(port) = ports.get(number) {
                        self.deliver_to(port, frames, &picks);
                    }
                }
                return;
            }
        }
        // (port, frame) pairs, sorted by port; the sort is stable, so each port gets its
        // frames in the order they were sent.
        let mut pairs: SmallVec<[(u32, u16); MAX_BURST]> = SmallVec::new();
        for (i, &choice) in chosen.iter().enumerate() {
            let i = u16::try_from(i).unwrap_or(u16::MAX);
            match decisions.get(usize::from(choice)) {
                Some(Forward::Drop(reason)) => {
                    self.stats.dropped(Direction::Tx, Drop::Switch(*reason));
                    refused(i, Drop::Switch(*reason));
                }
                Some(Forward::Unicast(port)) => pairs.push((*port, i)),
                Some(Forward::Flood(list)) => pairs.extend(list.iter().map(|p| (*p, i))),
                // Every frame chose a decision made before it (`u8::MAX`, above any index
                // since MAX_BURST < 256, marks an index the view had no frame for).
                None => {
                    self.stats
                        .dropped(Direction::Tx, Drop::Switch(DropReason::UnknownPort));
                    refused(i, Drop::Switch(DropReason::UnknownPort));
                }
            }
        }
        pairs.sort_by_key(|&(port, _)| port);
        for run in pairs.chunk_by(|a, b| a.0 == b.0) {
            let Some(port) = run.first().and_then(|(n, _)| ports.get(n)) else {
                continue;
            };
            picks.clear();
            picks.extend(run.iter().map(|&(_, i)| i));
            self.deliver_to(port, frames, &picks);
        }
    }

    /// Delivers `frames[i]` for each `i` in `picks` to `port`, in one delivery.
    fn deliver_to<F: Frames + ?Sized>(&self, port: &Port, frames: &F, picks: &[u16]) {
        // The rx queue: by the first frame's source MAC (its last byte).
        let hash = picks
            .first()
            .and_then(|&i| frames.frame(usize::from(i)))
            .and_then(|f| f.ethernet_header().get(11).copied())
            .map_or(0, usize::from);
        port.deliver_burst(frames, picks, hash, &self.stats);
    }
}

/// An Ethernet header and probe length as integers, for the repeat check of
/// [`SwitchHub::transmit_burst`]. Compared as a `([u8; 14], usize)` tuple, the header went
/// through a stack copy whose compare loads straddled the copy's two overlapping 8-byte
/// stores: loads the CPU cannot forward from its store buffer, a stall on every frame (a
/// quarter of the tx pass in a 64-byte drain). Two 8-byte words of the header (bytes 0..8
/// and 6..14: together every byte) stay in registers.
#[derive(Clone, Copy, PartialEq, Eq)]
struct HeaderKey(u64, u64, usize);

impl HeaderKey {
    fn of(eth: &[u8; 14], probe_len: usize) -> Self {
        let word = |bytes: Option<&[u8; 8]>| bytes.map_or(0, |b| u64::from_ne_bytes(*b));
        Self(word(eth.first_chunk()), word(eth.last_chunk()), probe_len)
    }
}

/// Every switch of the daemon, by name.
#[derive(Default)]
pub struct Fabric {
    switches: Mutex<BTreeMap<String, Arc<SwitchHub>>>,
}

impl Fabric {
    /// The switch `name`, created if missing.
    pub fn switch(&self, name: &str) -> Arc<SwitchHub> {
        Arc::clone(
            lock(&self.switches)
                .entry(name.to_string())
                .or_insert_with(|| Arc::new(SwitchHub::new(name))),
        )
    }

    /// The switch `name`, if it exists.
    pub fn get(&self, name: &str) -> Option<Arc<SwitchHub>> {
        lock(&self.switches).get(name).cloned()
    }

    /// Removes switch `name`; refused while it has ports other than an uplink.
    pub fn remove(&self, name: &str) -> Result<Arc<SwitchHub>, usize> {
        let mut switches = lock(&self.switches);
        let Some(hub) = switches.get(name) else {
            return Err(0);
        };
        let guests = hub
            .ports()
            .iter()
            .filter(|p| matches!(p.sink, PortSink::Guest(_)))
            .count();
        if guests > 0 {
            return Err(guests);
        }
        switches.remove(name).ok_or(0)
    }

    /// All switches.
    pub fn list(&self) -> Vec<Arc<SwitchHub>> {
        lock(&self.switches).values().cloned().collect()
    }
}

/// A MAC in the usual notation (for listings).
pub fn mac_text(mac: &Mac) -> String {
    super::config::format_mac(mac)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::HeaderKey;

    #[test]
    fn header_keys_differ_in_every_byte_and_in_the_probe_length() {
        let eth: [u8; 14] = std::array::from_fn(|i| i as u8);
        let key = HeaderKey::of(&eth, 14);
        assert!(key == HeaderKey::of(&eth.clone(), 14));
        assert!(
            key != HeaderKey::of(&eth, 13),
            "a runt is not its longer twin"
        );
        for byte in 0..14 {
            let mut other = eth;
            other[byte] ^= 0x80;
            assert!(key != HeaderKey::of(&other, 14), "byte {byte} ignored");
        }
    }
}
