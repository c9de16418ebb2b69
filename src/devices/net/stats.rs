//! Counters of a net device (all its queue pairs) and of a switch.
//!
//! Several threads count into one device (a switch port's rx side is written by every sender),
//! so counters are relaxed atomic adds. Readers take a [`NetSnapshot`], each counter's own value
//! at the time it was read, not a consistent cut.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::switch::DropReason as SwitchDrop;

/// Why a frame or buffer was dropped; each has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// The descriptor chain was cut short (loop, bad indirect table).
    BrokenChain,
    /// A device-writable buffer in a tx chain, or a readable one in an rx chain.
    BadLayout,
    /// A tx chain shorter than the virtio-net header, or an rx buffer too small for it.
    ShortHeader,
    /// Bad GSO type or size, or checksum offsets outside the frame.
    BadHeader,
    /// Larger than MTU + Ethernet header (64 KiB with GSO).
    TooLarge,
    /// A buffer outside guest memory.
    BadAddress,
    /// More segments than one `readv`/`writev` takes.
    TooManySegments,
    /// The receiving guest had no rx buffers (switch delivery).
    NoRxBuffers,
    /// A GSO frame for a guest that did not accept that GSO type.
    GsoUnsupported,
    /// The tap refused the frame.
    TapError,
    /// The link is down (tap gone, receiver not connected).
    LinkDown,
    /// The switch refused it.
    Switch(SwitchDrop),
    /// The receiver's rate limit (switch delivery: the switch drops what a limited port
    /// cannot take now).
    Throttled,
}

impl Drop {
    const COUNT: usize = 18;
    /// Every reason, in counter order.
    pub const ALL: [Drop; Self::COUNT] = [
        Drop::BrokenChain,
        Drop::BadLayout,
        Drop::ShortHeader,
        Drop::BadHeader,
        Drop::TooLarge,
        Drop::BadAddress,
        Drop::TooManySegments,
        Drop::NoRxBuffers,
        Drop::GsoUnsupported,
        Drop::TapError,
        Drop::LinkDown,
        Drop::Switch(SwitchDrop::Runt),
        Drop::Switch(SwitchDrop::BadSource),
        Drop::Switch(SwitchDrop::Spoofed),
        Drop::Switch(SwitchDrop::TaggedOnAccess),
        Drop::Switch(SwitchDrop::UnknownPort),
        Drop::Switch(SwitchDrop::Hairpin),
        Drop::Throttled,
    ];

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }

    /// Stable name for stats and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Drop::BrokenChain => "broken-chain",
            Drop::BadLayout => "bad-layout",
            Drop::ShortHeader => "short-header",
            Drop::BadHeader => "bad-header",
            Drop::TooLarge => "too-large",
            Drop::BadAddress => "bad-address",
            Drop::TooManySegments => "too-many-segments",
            Drop::NoRxBuffers => "no-rx-buffers",
            Drop::GsoUnsupported => "gso-unsupported",
            Drop::TapError => "tap-error",
            Drop::LinkDown => "link-down",
            Drop::Switch(reason) => reason.name(),
            Drop::Throttled => "throttled",
        }
    }
}

/// Live counters.
#[derive(Debug, Default)]
pub struct NetStats {
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    tx_drops: [AtomicU64; Drop::COUNT],
    rx_drops: [AtomicU64; Drop::COUNT],
    rx_stalls: AtomicU64,
    tx_throttled: AtomicU64,
    rx_throttled: AtomicU64,
    throttle_wait_ns: AtomicU64,
    ring_errors: AtomicU64,
}

/// Which way a dropped frame was going, seen from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Sent by the guest.
    Tx,
    /// On its way to the guest.
    Rx,
}

/// Frames and bytes counted locally over a burst, added to the shared counters once.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Frames.
    pub frames: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl Tally {
    /// Counts one frame of `bytes`.
    pub fn add(&mut self, bytes: u64) {
        self.frames = self.frames.saturating_add(1);
        self.bytes = self.bytes.saturating_add(bytes);
    }
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl NetStats {
    /// A frame of `bytes` (without the virtio-net header) left the guest.
    pub fn sent(&self, bytes: u64) {
        self.sent_tally(Tally { frames: 1, bytes });
    }

    /// A frame of `bytes` reached the guest.
    pub fn received(&self, bytes: u64) {
        self.received_tally(Tally { frames: 1, bytes });
    }

    /// A burst's frames left the guest (one atomic add per counter per burst: each is a
    /// full barrier on x86, which waits for the burst's stores into guest memory to drain).
    pub fn sent_tally(&self, tally: Tally) {
        if tally.frames > 0 {
            add(&self.tx_frames, tally.frames);
            add(&self.tx_bytes, tally.bytes);
        }
    }

    /// A burst's frames reached the guest (see [`NetStats::sent_tally`]).
    pub fn received_tally(&self, tally: Tally) {
        if tally.frames > 0 {
            add(&self.rx_frames, tally.frames);
            add(&self.rx_bytes, tally.bytes);
        }
    }

    /// A frame was dropped.
    pub fn dropped(&self, direction: Direction, reason: Drop) {
        let counters = match direction {
            Direction::Tx => &self.tx_drops,
            Direction::Rx => &self.rx_drops,
        };
        if let Some(counter) = counters.get(reason.index()) {
            add(counter, 1);
        }
    }

    /// Receiving paused because the guest had no rx buffers (the tap keeps the frames).
    pub fn rx_stalled(&self) {
        add(&self.rx_stalls, 1);
    }

    /// QoS held a frame back (tx: left in the ring; rx: the tap left unread, or a switch
    /// frame dropped) and the worker waits `wait`.
    pub fn throttled(&self, direction: Direction, wait: std::time::Duration) {
        add(
            match direction {
                Direction::Tx => &self.tx_throttled,
                Direction::Rx => &self.rx_throttled,
            },
            1,
        );
        add(
            &self.throttle_wait_ns,
            u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX),
        );
    }

    /// A kick found a ring that claims frames that cannot be taken (stopped or corrupt).
    pub fn ring_error(&self) {
        add(&self.ring_errors, 1);
    }

    /// The counters now.
    pub fn snapshot(&self) -> NetSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let by_reason = |counters: &[AtomicU64; Drop::COUNT]| {
            Drop::ALL
                .iter()
                .zip(counters)
                .map(|(reason, c)| (reason.name().to_string(), load(c)))
                .collect()
        };
        NetSnapshot {
            tx_frames: load(&self.tx_frames),
            tx_bytes: load(&self.tx_bytes),
            rx_frames: load(&self.rx_frames),
            rx_bytes: load(&self.rx_bytes),
            tx_drops: by_reason(&self.tx_drops),
            rx_drops: by_reason(&self.rx_drops),
            rx_stalls: load(&self.rx_stalls),
            tx_throttled: load(&self.tx_throttled),
            rx_throttled: load(&self.rx_throttled),
            throttle_wait_ns: load(&self.throttle_wait_ns),
            ring_errors: load(&self.ring_errors),
        }
    }
}

/// A copy of the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetSnapshot {
    /// Frames the guest sent that were delivered.
    pub tx_frames: u64,
    /// Their bytes (Ethernet header included, virtio-net header excluded).
    pub tx_bytes: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames from the guest dropped, by reason.
    pub tx_drops: BTreeMap<String, u64>,
    /// Frames for the guest dropped, by reason.
    pub rx_drops: BTreeMap<String, u64>,
    /// Times receiving paused for lack of rx buffers.
    pub rx_stalls: u64,
    /// Times QoS held the guest's frames back.
    pub tx_throttled: u64,
    /// Times QoS held frames for the guest back (or dropped them at a switch).
    pub rx_throttled: u64,
    /// Time QoS timers were armed for, in nanoseconds.
    pub throttle_wait_ns: u64,
    /// Kicks that found a ring claiming frames that could not be taken.
    pub ring_errors: u64,
}

impl NetSnapshot {
    /// All drops in both directions.
    pub fn total_drops(&self) -> u64 {
        self.tx_drops
            .values()
            .chain(self.rx_drops.values())
            .fold(0u64, |a, b| a.saturating_add(*b))
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter_and_name() {
        let stats = NetStats::default();
        for (i, reason) in Drop::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
            for _ in 0..=i {
                stats.dropped(Direction::Tx, *reason);
            }
        }
        stats.dropped(Direction::Rx, Drop::NoRxBuffers);
        stats.sent(60);
        stats.received(1514);
        let snap = stats.snapshot();
        assert_eq!(snap.tx_drops.len(), Drop::COUNT, "names are unique");
        assert_eq!(snap.tx_drops["spoofed"], 14);
        assert_eq!(snap.rx_drops["no-rx-buffers"], 1);
        assert_eq!(
            (snap.tx_frames, snap.tx_bytes, snap.rx_bytes),
            (1, 60, 1514)
        );
        assert_eq!(snap.total_drops(), (1..=18).sum::<u64>() + 1);
    }
}
