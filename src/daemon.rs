//! The daemon: starts the configured devices (command line, then the state directory), serves
//! the control socket, waits for SIGINT/SIGTERM/SIGHUP (or `daemon.shutdown`), then stops the
//! control socket and every device (each finishes its in-flight I/O and removes its socket).
//! It never daemonizes itself: the supervisor (systemd, libvirt, the orchestrator) owns the
//! process.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::control::server::{ControlConfig, ControlError, ControlServer};
use crate::lock::lock;
use crate::metrics::{MetricsError, MetricsServer};
use crate::registry::{Registry, RegistryError};
use crate::state::{StateError, StateStore};
use crate::sys::signals;

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A command-line device failed to start.
    #[error("--{kind} {spec}")]
    Device {
        /// `blk` or `net`.
        kind: &'static str,
        /// The device's options as given.
        spec: String,
        /// The cause.
        #[source]
        source: RegistryError,
    },
    /// The state directory could not be read or a recorded device not recreated.
    #[error("cannot restore devices from the state directory")]
    Restore(#[source] RegistryError),
    /// The state directory could not be opened.
    #[error(transparent)]
    State(#[from] StateError),
    /// The control socket could not be set up.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The metrics endpoint could not be set up.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// Signal setup failed.
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
}

/// What the daemon serves.
#[derive(Debug, Clone, Default)]
pub struct DaemonConfig {
    /// Block devices from the command line, as option maps (not persisted).
    pub blk: Vec<BTreeMap<String, String>>,
    /// Net devices from the command line, as option maps (not persisted).
    pub net: Vec<BTreeMap<String, String>>,
    /// The control socket, if any.
    pub control: Option<ControlConfig>,
    /// Where devices added at run time are recorded.
    pub state_dir: Option<PathBuf>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// Whether host block devices may back disks.
    pub allow_block_devices: bool,
}

/// Starts everything, blocks until told to stop, stops everything.
pub fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    crate::storage::backing::allow_block_devices(config.allow_block_devices);
    signals::block_termination_signals().map_err(DaemonError::Signals)?;
    let state = config
        .state_dir
        .as_deref()
        .map(StateStore::open)
        .transpose()?;
    let mut registry = Registry::new(state);
    // The state directory first: it holds the QoS groups command-line devices may name.
    let started = registry
        .restore()
        .map_err(DaemonError::Restore)
        .and_then(|restored| {
            if restored > 0 {
                log::info!("restored {restored} device(s) from the state directory");
            }
            start_devices(&mut registry, "blk", config.blk)
                .and_then(|()| start_devices(&mut registry, "net", config.net))
        });
    if let Err(e) = started {
        registry.stop_all();
        return Err(e);
    }
    let registry = Arc::new(Mutex::new(registry));
    let control = match config.control {
        Some(control) => match ControlServer::start(control, Arc::clone(&registry)) {
            Ok(server) => Some(server),
            Err(e) => {
                stop_registry(&registry);
                return Err(e.into());
            }
        },
        None => None,
    };
    let metrics = match config.metrics {
        Some(addr) => match MetricsServer::start(addr, Arc::clone(&registry)) {
            Ok(server) => Some(server),
            Err(e) => {
                if let Some(control) = control {
                    control.stop();
                }
                stop_registry(&registry);
                return Err(e.into());
            }
        },
        None => None,
    };
    let devices = lock(&registry).ids().len();
    log::info!("novacrond ready: {devices} device(s)");
    let waited = signals::wait_for_termination();
    match &waited {
        Ok(signal) => log::info!("signal {signal}: stopping"),
        Err(e) => log::error!("waiting for signals failed: {e}; stopping"),
    }
    if let Some(control) = control {
        control.stop();
    }
    if let Some(metrics) = metrics {
        metrics.stop();
    }
    stop_registry(&registry);
    log::info!("novacrond stopped");
    waited.map(drop).map_err(DaemonError::Signals)
}

fn stop_registry(registry: &Mutex<Registry>) {
    lock(registry).stop_all();
}

fn start_devices(
    registry: &mut Registry,
    kind: &'static str,
    devices: Vec<BTreeMap<String, String>>,
) -> Result<(), DaemonError> {
    for options in devices {
        let spec = options
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        registry
            .add(kind, options, false)
            .map_err(|source| DaemonError::Device { kind, spec, source })?;
    }
    Ok(())
}
