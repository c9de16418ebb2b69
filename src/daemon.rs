//! The daemon: starts every configured device, then waits for SIGINT/SIGTERM/SIGHUP and stops
//! them (each finishes its in-flight I/O and removes its socket). It never daemonizes itself:
//! the supervisor (systemd, libvirt, the orchestrator) owns the process.

use crate::devices::blk::config::BlkConfig;
use crate::devices::blk::device::{BlkDevice, DeviceError};
use crate::sys::signals;

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A device failed to start; devices started before it are stopped again.
    #[error("device `{id}` failed to start")]
    Device {
        /// The device id.
        id: String,
        /// The cause.
        #[source]
        source: DeviceError,
    },
    /// Two devices share an id or a socket.
    #[error("duplicate device {0}")]
    Duplicate(String),
    /// Signal setup failed.
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
}

/// What the daemon serves.
#[derive(Debug, Clone, Default)]
pub struct DaemonConfig {
    /// Block devices.
    pub blk: Vec<BlkConfig>,
}

/// Starts every device, blocks until a termination signal, stops every device.
pub fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    signals::block_termination_signals().map_err(DaemonError::Signals)?;
    let devices = start_devices(config)?;
    log::info!("novacrond ready: {} device(s)", devices.len());
    let signal = signals::wait_for_termination().map_err(DaemonError::Signals)?;
    log::info!("signal {signal}: stopping");
    for device in devices {
        device.stop();
    }
    log::info!("novacrond stopped");
    Ok(())
}

fn start_devices(config: DaemonConfig) -> Result<Vec<BlkDevice>, DaemonError> {
    let mut devices: Vec<BlkDevice> = Vec::with_capacity(config.blk.len());
    for blk in config.blk {
        let duplicate = devices
            .iter()
            .any(|d| d.config().id == blk.id || d.config().socket == blk.socket);
        if duplicate {
            return Err(DaemonError::Duplicate(format!(
                "`{}` ({})",
                blk.id,
                blk.socket.display()
            )));
        }
        let id = blk.id.clone();
        let device = BlkDevice::start(blk).map_err(|source| DaemonError::Device { id, source })?;
        devices.push(device);
    }
    Ok(devices)
}
