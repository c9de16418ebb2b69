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

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use super::config::{NetBackendSpec, NetConfig};
use super::fabric::{AttachError, Fabric, PortSink};
use super::info::{NetInfo, NetStatsView};
use super::shared::NetShared;
use super::stats::NetStats;
use super::switch::PortConfig;
use super::tap_queue::{TapQueue, TapQueueError};
use crate::devices::shell::runner::{DeviceRunner, RunnerError};
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
    /// The switch refused the port.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// The socket or its thread could not be set up.
    #[error(transparent)]
    Runner(#[from] RunnerError),
}

/// A running net device.
pub struct NetDevice {
    shared: Arc<NetShared>,
    runner: Option<DeviceRunner>,
    /// The tap this daemon made: persistent, removed with the device.
    owned_tap: Option<String>,
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
        let mut owned_tap = None;
        match &config.backend {
            NetBackendSpec::Tap(name) => {
                let multi_queue = config.queue_pairs > 1;
                let existed = crate::sys::tap::exists(name);
                for _ in 0..config.queue_pairs {
                    let tap = TapQueue::open(name, multi_queue).map_err(|source| {
                        NetDeviceError::Tap {
                            name: name.clone(),
                            source,
                        }
                    })?;
                    taps.push(Some(tap));
                }
                owned_tap = claim_tap(name, existed, &config.socket, taps.iter().flatten().next());
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
                    config.incoming,
                    PortSink::Guest(RwLock::new(None)),
                    Arc::clone(&stats),
                    Some(Arc::clone(&qos)),
                )?;
                port = Some((hub, attached));
            }
        }
        let shared = Arc::new(NetShared::new(config, stats, qos, taps, port));
        let started = DeviceRunner::start(
            &shared.config.socket,
            Arc::clone(&shared.connected),
            Arc::clone(&shared),
        );
        let runner = match started {
            Ok(runner) => runner,
            Err(e) => {
                if let Some((hub, port)) = shared.switch_port() {
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
            owned_tap,
        })
    }

    /// The device's configuration.
    pub fn config(&self) -> &NetConfig {
        &self.shared.config
    }

    /// A copy of the listening socket for a live upgrade's successor (see `DeviceRunner`).
    pub fn hand_over(&self) -> std::io::Result<(std::path::PathBuf, std::os::fd::OwnedFd)> {
        match &self.runner {
            Some(runner) => runner.hand_over(),
            None => Err(std::io::Error::from_raw_os_error(libc::ENOTCONN)),
        }
    }

    /// A successor takes over: the socket's path is its now.
    pub fn keep_socket(&self) {
        if let Some(runner) = &self.runner {
            runner.keep_socket();
        }
    }

    /// Whether a front-end is connected.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    /// The device's shared state (QoS, counters).
    pub fn shared(&self) -> &Arc<NetShared> {
        &self.shared
    }

    /// The device's description.
    pub fn info(&self) -> NetInfo {
        let config = &self.shared.config;
        NetInfo {
            id: config.id.clone(),
            socket: config.socket.clone(),
            backend: config.backend.clone(),
            mac: super::config::format_mac(&config.mac),
            queues: config.queue_pairs,
            queue_size: config.queue_size,
            mtu: config.mtu,
            vlan: config.vlan,
            link_up: self.link_up(),
            connected: self.is_connected(),
            features: super::spec::negotiated_names(self.shared.acked_features()),
        }
    }

    /// The device's counters.
    pub fn stats(&self) -> NetStatsView {
        let total = self.shared.stats.snapshot();
        NetStatsView {
            id: self.shared.config.id.clone(),
            connected: self.is_connected(),
            link_up: self.link_up(),
            drops: total.total_drops(),
            total,
        }
    }

    /// Whether the link is up.
    pub fn link_up(&self) -> bool {
        self.shared.link_up()
    }

    /// Disconnects the front-end, leaves the switch, closes the taps, removes the socket. A
    /// tap the daemon made stays (persistent): a restart finds it as the host configured it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Like [`NetDevice::stop`], for good (`device.remove`): a tap the daemon made goes too.
    pub fn remove(mut self) {
        self.shutdown();
        if let Some(name) = self.owned_tap.take() {
            // Not persistent any more: it goes when our last fd of it closes.
            match self.shared.set_tap_persist(false) {
                Ok(()) => {
                    log::info!("tap {name}: removed with its device");
                    let _ = std::fs::remove_file(tap_marker(&self.shared.config.socket));
                }
                // Still persistent: keep the note, so a later run can still remove it.
                Err(e) => log::warn!("tap {name}: cannot remove it: {e}"),
            }
        }
    }

    fn shutdown(&mut self) {
        if let Some(runner) = self.runner.take() {
            runner.stop();
        }
        if let Some((hub, port)) = self.shared.switch_port() {
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

/// Where the daemon notes that it made tap `socket`'s device uses: beside the socket, which
/// keeps its path across restarts (so a restarted daemon still knows the tap is its own).
fn tap_marker(socket: &std::path::Path) -> std::path::PathBuf {
    let mut name = socket.as_os_str().to_os_string();
    name.push(".tap");
    std::path::PathBuf::from(name)
}

/// Reads the note, never through a symlink or a FIFO (the socket's directory may be writable
/// by others).
fn read_marker(marker: &std::path::Path) -> Option<String> {
    use std::io::Read;
    let mut text = String::new();
    // Nor through a FIFO planted there, whose open would wait for a writer.
    crate::sys::private_file::open_regular(marker)
        .ok()
        .flatten()
        .and_then(|f| f.take(64).read_to_string(&mut text).ok())
        .map(|_| text)
}

/// Writes the note (mode 0600), never through a symlink: a link planted there fails the
/// write instead of truncating what it points at.
fn write_marker(marker: &std::path::Path, name: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(marker)?
        .write_all(name.as_bytes())
}

/// Makes a tap the daemon just created persistent (its host-side configuration then survives
/// a daemon restart) and notes it as ours; a tap that existed already is ours only if our
/// note says so (made by an earlier run), else it is the management layer's and left alone.
/// Returns the tap to remove with the device, if ours.
fn claim_tap(
    name: &str,
    existed: bool,
    socket: &std::path::Path,
    queue: Option<&TapQueue>,
) -> Option<String> {
    let marker = tap_marker(socket);
    if existed {
        let ours = read_marker(&marker).is_some_and(|noted| noted.trim() == name);
        return ours.then(|| name.to_string());
    }
    let persisted = match queue {
        Some(queue) => queue.set_persist(true),
        None => return None,
    };
    if let Err(e) = persisted {
        log::warn!("tap {name}: cannot make it persistent ({e}); it goes when the daemon stops");
        return None;
    }
    if let Err(e) = write_marker(&marker, name) {
        log::warn!(
            "tap {name}: cannot note it as ours in {} ({e}); device.remove will leave it",
            marker.display()
        );
    }
    log::info!("tap {name}: created, persistent across daemon restarts");
    Some(name.to_string())
}
