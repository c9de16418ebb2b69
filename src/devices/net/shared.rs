//! State shared by a net device's connections and queue-pair workers: configuration,
//! counters, QoS, link state, acked features, the tap queues between connections, the switch
//! port and the backend-request channel. Imports nothing of the device's lifecycle, backend
//! or workers, so they can all depend on it.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::config::NetConfig;
use super::fabric::{Port, PortSink, SwitchHub};
use super::frame::FrameRef;
use super::header::{NetHeader, HEADER_LEN};
use super::rx::RxTarget;
use super::spec::ConfigSpace;
use super::stats::NetStats;
use super::switch::Mac;
use super::tap_queue::TapQueue;
use crate::devices::shell::channel::BackendChannel;
use crate::lock::lock;
use crate::qos::handle::QosHandle;

/// Most migration announcements (RARPs) a device sends per second.
const MAX_ANNOUNCES_PER_SECOND: u32 = 8;

/// State shared by a device's connections and workers.
pub struct NetShared {
    /// The device's configuration.
    pub config: NetConfig,
    /// Counters (both directions, all pairs).
    pub stats: Arc<NetStats>,
    /// Whether a front-end is connected now.
    pub connected: Arc<AtomicBool>,
    /// Rate limits (own and group); a switch port's senders consult it too.
    pub qos: Arc<QosHandle>,
    link_up: AtomicBool,
    acked_features: Arc<AtomicU64>,
    taps: Mutex<Vec<Option<TapQueue>>>,
    port: Option<(Arc<SwitchHub>, Arc<Port>)>,
    /// The front-end's backend-request channel, for config-change notifications.
    backend_channel: BackendChannel,
    /// A duplicate of the first tap queue's fd, to send the migration announcement on while
    /// the queues themselves belong to a connection's workers.
    announce_tap: Option<std::fs::File>,
    /// Announcements sent in the current second (a front-end may not flood the switch).
    announced: Mutex<(std::time::Instant, u32)>,
}

impl NetShared {
    /// Shared state over opened taps (one per pair) or an attached switch port.
    pub fn new(
        config: NetConfig,
        stats: Arc<NetStats>,
        qos: Arc<QosHandle>,
        taps: Vec<Option<TapQueue>>,
        port: Option<(Arc<SwitchHub>, Arc<Port>)>,
    ) -> Self {
        let announce_tap = taps.iter().flatten().next().and_then(|tap| {
            // SAFETY: F_DUPFD_CLOEXEC on the tap queue's open fd; the new fd is owned at once.
            let fd = unsafe { libc::fcntl(tap.poll_fd(), libc::F_DUPFD_CLOEXEC, 0) };
            // SAFETY: a fresh descriptor nobody else owns (checked non-negative).
            (fd >= 0).then(|| unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
        });
        Self {
            announce_tap,
            announced: Mutex::new((std::time::Instant::now(), 0)),
            config,
            stats,
            connected: Arc::new(AtomicBool::new(false)),
            qos,
            link_up: AtomicBool::new(true),
            acked_features: Arc::new(AtomicU64::new(0)),
            taps: Mutex::new(taps),
            port,
            backend_channel: BackendChannel::default(),
        }
    }

    /// The features the current front-end acked.
    pub fn acked_features(&self) -> u64 {
        self.acked_features.load(Ordering::Acquire)
    }

    /// The acked features as a cell the switch port's receive side reads too.
    pub fn acked_features_cell(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.acked_features)
    }

    /// Records the features the front-end acked.
    pub fn set_acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
    }

    /// Records link state (config space status, stats), logging changes and telling the
    /// front-end (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG) when it gave us a channel for that.
    pub fn set_link(&self, up: bool) {
        if self.link_up.swap(up, Ordering::AcqRel) != up {
            log::info!(
                "{}: link {}",
                self.config.id,
                if up { "up" } else { "down" }
            );
            self.backend_channel.config_changed(&self.config.id);
        }
    }

    /// Keeps (or with `None` drops) the front-end's backend-request channel.
    pub fn set_backend_channel(&self, channel: Option<std::os::unix::net::UnixStream>) {
        self.backend_channel.set(&self.config.id, channel);
    }

    /// Whether the link is up.
    pub fn link_up(&self) -> bool {
        self.link_up.load(Ordering::Acquire)
    }

    /// The config space as it reads now.
    pub fn config_space(&self) -> ConfigSpace {
        ConfigSpace {
            mac: self.config.mac,
            link_up: self.link_up(),
            max_queue_pairs: self.config.queue_pairs,
            mtu: self.config.mtu,
        }
    }

    /// Takes tap queue `pair` for a connection's worker.
    pub fn take_tap(&self, pair: u16) -> Option<TapQueue> {
        lock(&self.taps).get_mut(usize::from(pair))?.take()
    }

    /// Makes the device's tap persistent or not, through its first queue held here.
    pub fn set_tap_persist(&self, on: bool) -> Result<(), crate::sys::tap::TapError> {
        let taps = lock(&self.taps);
        match taps.iter().flatten().next() {
            Some(queue) => queue.set_persist(on),
            None => Err(crate::sys::tap::TapError::Ioctl(
                "TUNSETPERSIST",
                std::io::Error::from_raw_os_error(libc::ENODEV),
            )),
        }
    }

    /// Gives a tap queue back when the connection ends.
    pub fn return_tap(&self, pair: u16, tap: TapQueue) {
        if let Some(slot) = lock(&self.taps).get_mut(usize::from(pair)) {
            *slot = Some(tap);
        }
    }

    /// The switch and port, for a switch port.
    pub fn switch_port(&self) -> Option<(Arc<SwitchHub>, Arc<Port>)> {
        self.port
            .as_ref()
            .map(|(hub, port)| (Arc::clone(hub), Arc::clone(port)))
    }

    /// The switch port's connected receive side, if any.
    pub fn port_target(&self) -> Option<Arc<RxTarget>> {
        let (_, port) = self.port.as_ref()?;
        match &port.sink {
            PortSink::Guest(slot) => slot
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            PortSink::Uplink(_) => None,
        }
    }

    /// Announces the guest's MAC where it now lives (`VHOST_USER_SEND_RARP`, after a live
    /// migration): a RARP broadcast into the switch from this port (peers and the switch learn
    /// the port at once), or out of the tap (the host's bridge learns it). Only the device's own
    /// MAC is announced: the front-end cannot make us send as another.
    pub fn announce(&self, mac: Mac) {
        if mac != self.config.mac {
            log::warn!(
                "{}: front-end asked to announce MAC {}, not this device's; ignored",
                self.config.id,
                super::config::format_mac(&mac)
            );
            return;
        }
        // QEMU announces a handful of times over a second or so; more is a flood.
        if !admit_announcement(&mut lock(&self.announced), std::time::Instant::now()) {
            self.stats
                .dropped(super::stats::Direction::Tx, super::stats::Drop::Throttled);
            return;
        }
        let frame = super::announce::rarp(mac);
        if let Some((hub, port)) = &self.port {
            let sent = FrameRef::Bytes {
                header: NetHeader::default(),
                frame: &frame,
            };
            if let Err(reason) = hub.transmit(port, &sent) {
                log::warn!("{}: announcement refused: {reason:?}", self.config.id);
            }
        } else if let Some(tap) = &self.announce_tap {
            // A zeroed virtio-net header (no offloads), then the frame.
            let mut bytes = [0u8; HEADER_LEN + super::announce::RARP_LEN];
            if let Some(body) = bytes.get_mut(HEADER_LEN..) {
                body.copy_from_slice(&frame);
            }
            if let Err(e) = std::io::Write::write(&mut &*tap, &bytes) {
                log::warn!("{}: announcement on the tap: {e}", self.config.id);
            }
        }
        log::info!(
            "{}: announced MAC {} (migration)",
            self.config.id,
            super::config::format_mac(&mac)
        );
    }

    /// Connects (or with `None` disconnects) the switch port's receive side.
    pub fn connect_port(&self, target: Option<Arc<RxTarget>>) {
        if let Some((_, port)) = &self.port {
            if let PortSink::Guest(slot) = &port.sink {
                *slot
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = target;
            }
        }
    }
}

/// Whether one more announcement fits `window` (its start and how many it has let through)
/// at `now`: at most [`MAX_ANNOUNCES_PER_SECOND`] per window of a second.
fn admit_announcement(window: &mut (std::time::Instant, u32), now: std::time::Instant) -> bool {
    if now.saturating_duration_since(window.0) >= std::time::Duration::from_secs(1) {
        *window = (now, 0);
    }
    if window.1 >= MAX_ANNOUNCES_PER_SECOND {
        return false;
    }
    window.1 = window.1.saturating_add(1);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn at_most_eight_announcements_a_second() {
        let start = Instant::now();
        let mut window = (start, 0);
        let admitted = (0..9)
            .filter(|_| admit_announcement(&mut window, start))
            .count();
        assert_eq!(admitted, 8);
        assert!(!admit_announcement(
            &mut window,
            start + Duration::from_millis(999)
        ));
        assert!(admit_announcement(
            &mut window,
            start + Duration::from_secs(1)
        ));
    }
}
