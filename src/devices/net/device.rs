//! A net device's lifetime: its taps or switch port, its socket, its counters.
//!
//! Tap queues are opened when the device starts (so a bad tap name fails `device.add`, not
//! the first guest) and stay open across front-end reconnects: frames that arrive while no
//! guest is attached wait in the tap. A switch port is attached when the device starts and
//! detached when it stops; between front-ends it exists but is down (frames for it are
//! counted `link-down`).

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::backend::NetBackend;
use super::config::{NetBackendSpec, NetConfig};
use super::fabric::{Fabric, Port, PortSink, RxTarget, SwitchHub};
use super::spec::ConfigSpace;
use super::stats::{NetSnapshot, NetStats};
use super::switch::PortConfig;
use super::tap_queue::{TapQueue, TapQueueError};
use crate::devices::runner::{BackendFactory, DeviceRunner, RunnerError};
use crate::lock::lock;
use crate::qos::handle::QosHandle;

/// Errors starting a net device.
#[derive(Debug, thiserror::Error)]
pub enum NetDeviceError {
    /// A tap queue could not be opened.
    #[error("tap {name}")]
    Tap {
        /// The tap.
        name: String,
        /// The cause.
        #[source]
        source: TapQueueError,
    },
    /// The socket or its thread could not be set up.
    #[error(transparent)]
    Runner(#[from] RunnerError),
}

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
    backend_channel: Mutex<Option<std::os::unix::net::UnixStream>>,
}

impl NetShared {
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
            if let Some(channel) = lock(&self.backend_channel).as_mut() {
                if let Err(e) = crate::devices::relay::send_config_change(channel) {
                    log::warn!("{}: cannot notify the config change: {e}", self.config.id);
                }
            }
        }
    }

    /// Keeps (or with `None` drops) the front-end's backend-request channel.
    pub fn set_backend_channel(&self, channel: Option<std::os::unix::net::UnixStream>) {
        if let Some(channel) = &channel {
            // Never let a front-end that does not read its channel block a worker.
            if let Err(e) = channel.set_nonblocking(true) {
                log::warn!("{}: backend channel: {e}", self.config.id);
            }
        }
        *lock(&self.backend_channel) = channel;
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

/// A running net device.
pub struct NetDevice {
    shared: Arc<NetShared>,
    runner: Option<DeviceRunner>,
}

impl NetDevice {
    /// Opens the taps (or joins the switch), listens on the socket.
    pub fn start(config: NetConfig, fabric: &Fabric) -> Result<Self, NetDeviceError> {
        let stats = Arc::new(NetStats::default());
        let qos = Arc::new(QosHandle::default());
        if let Err(e) = qos.set_limits(&config.qos) {
            // Validated when the options were parsed; unreachable unless that changes.
            log::error!("{}: rate limits ignored: {e}", config.id);
        }
        let mut taps = Vec::new();
        let mut port = None;
        match &config.backend {
            NetBackendSpec::Tap(name) => {
                let multi_queue = config.queue_pairs > 1;
                for _ in 0..config.queue_pairs {
                    let tap = TapQueue::open(name, multi_queue).map_err(|source| {
                        NetDeviceError::Tap {
                            name: name.clone(),
                            source,
                        }
                    })?;
                    taps.push(Some(tap));
                }
            }
            NetBackendSpec::Switch(name) => {
                let hub = fabric.switch(name);
                let attached = hub.attach(
                    &config.id,
                    PortConfig {
                        mac: config.mac,
                        vlan: config.vlan,
                        uplink: false,
                    },
                    PortSink::Guest(RwLock::new(None)),
                    Arc::clone(&stats),
                    Some(Arc::clone(&qos)),
                );
                port = Some((hub, attached));
            }
        }
        let shared = Arc::new(NetShared {
            config,
            stats,
            connected: Arc::new(AtomicBool::new(false)),
            qos,
            link_up: AtomicBool::new(true),
            acked_features: Arc::new(AtomicU64::new(0)),
            taps: Mutex::new(taps),
            port,
            backend_channel: Mutex::new(None),
        });
        let factory: BackendFactory<NetBackend> = {
            let shared = Arc::clone(&shared);
            Box::new(move |memory| Ok(Arc::new(NetBackend::new(Arc::clone(&shared), memory)?)))
        };
        let started = DeviceRunner::start(
            &shared.config.id,
            &shared.config.socket,
            Arc::clone(&shared.connected),
            factory,
        );
        let runner = match started {
            Ok(runner) => runner,
            Err(e) => {
                if let Some((hub, port)) = &shared.port {
                    hub.detach(port.number);
                }
                return Err(e.into());
            }
        };
        log::info!(
            "{}: serving virtio-net ({}, mac {}, {} queue pair(s)) on {}",
            shared.config.id,
            match &shared.config.backend {
                NetBackendSpec::Tap(name) => format!("tap {name}"),
                NetBackendSpec::Switch(name) => format!("switch {name}"),
            },
            super::config::format_mac(&shared.config.mac),
            shared.config.queue_pairs,
            shared.config.socket.display()
        );
        Ok(Self {
            shared,
            runner: Some(runner),
        })
    }

    /// The device's configuration.
    pub fn config(&self) -> &NetConfig {
        &self.shared.config
    }

    /// Whether a front-end is connected.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    /// The device's shared state (QoS, counters).
    pub fn shared(&self) -> &Arc<NetShared> {
        &self.shared
    }

    /// The device's counters.
    pub fn stats(&self) -> NetSnapshot {
        self.shared.stats.snapshot()
    }

    /// Whether the link is up.
    pub fn link_up(&self) -> bool {
        self.shared.link_up()
    }

    /// Disconnects the front-end, leaves the switch, closes the taps, removes the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(runner) = self.runner.take() {
            runner.stop();
        }
        if let Some((hub, port)) = &self.shared.port {
            hub.detach(port.number);
        }
    }
}

impl Drop for NetDevice {
    fn drop(&mut self) {
        if self.runner.is_some() {
            self.shutdown();
        }
    }
}
