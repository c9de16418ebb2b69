//! The daemon: starts the configured devices (command line, then the state directory), serves
//! the control socket, waits for SIGINT/SIGTERM (or `daemon.shutdown`), then stops the
//! control socket and every device (each finishes its in-flight I/O and removes its socket).
//! It never daemonizes itself: the supervisor (systemd, libvirt, the orchestrator) owns the
//! process.
//!
//! Under systemd (`Type=notify`, through the `sd-notify` crate; nothing is sent without
//! `NOTIFY_SOCKET`): `READY=1` once every device and the control socket serve, `STATUS=` with
//! the device count, `WATCHDOG=1` at half of `WatchdogSec` from a thread that must take the
//! registry lock first (a wedged control plane stops the pings and systemd restarts us), and
//! `STOPPING=1` when shutdown begins. SIGHUP reloads nothing: configuration changes go
//! through the control socket; it is logged and answered with a fresh `STATUS=`.

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
use sd_notify::NotifyState;

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
    /// A socket passed by the service manager matches no device or control socket.
    #[error("inherited socket {0} matches no device or control socket")]
    Unclaimed(PathBuf),
    /// The sandbox could not be set up (`--sandbox off` runs without it).
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    /// The SIGBUS handler could not be installed.
    #[error(transparent)]
    Sigbus(crate::sys::sigbus::SigbusError),
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
    /// Whether to run sandboxed (`crate::sandbox`).
    pub sandbox: bool,
    /// Filesystem roots the daemon is limited to (Landlock); empty: no limit.
    pub fs_roots: Vec<PathBuf>,
    /// The user to run as (`--user`), looked up at start.
    pub user: Option<String>,
    /// Started by a live upgrade (`--takeover`): resources the previous process still holds
    /// are waited for at start.
    pub takeover: bool,
}

/// How long a live upgrade's new process waits for the old one's images, taps and port.
const TAKEOVER_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// How long any start waits for them (a crashed predecessor's still being released).
const RESTART_WINDOW: std::time::Duration = std::time::Duration::from_secs(3);

/// Starts everything, blocks until told to stop, stops everything.
pub fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    crate::storage::backing::allow_block_devices(config.allow_block_devices);
    signals::block_termination_signals().map_err(DaemonError::Signals)?;
    // Before any guest memory is mapped: a front-end shrinking its memory file must not end
    // the daemon (see `sys::sigbus`).
    crate::sys::sigbus::install().map_err(DaemonError::Sigbus)?;
    // Looked up before Landlock hides the user database.
    let user = config
        .user
        .as_deref()
        .map(crate::sandbox::privileges::User::lookup)
        .transpose()?;
    if user.is_some() && !config.sandbox {
        return Err(crate::sandbox::SandboxError::Privileges(
            "--user needs the sandbox (--sandbox on)".into(),
        )
        .into());
    }
    if (config.sandbox || !config.fs_roots.is_empty()) && crate::storage::rbd::lib::preload() {
        // Before Landlock hides the libraries and seccomp the loader's calls: an `rbd:` disk
        // added later finds librbd loaded. Not installed: only `rbd:` disks fail, clearly.
        log::info!("librbd loaded: rbd: disks can be served");
    }
    if !config.fs_roots.is_empty() {
        // Before any thread exists: a Landlock domain covers the threads started after it.
        crate::sandbox::enter_roots(&config.fs_roots)?;
    }
    if config.sandbox {
        // Capabilities are per thread: dropped here, before any thread exists.
        crate::sandbox::privileges::drop_privileges(user)?;
        crate::sandbox::enter_daemon()?;
    } else {
        log::warn!("sandbox off (--sandbox off): no seccomp filters");
    }
    let state = config
        .state_dir
        .as_deref()
        .map(StateStore::open)
        .transpose()?;
    let mut registry = Registry::new(state);
    // A live upgrade: the previous process drains and exits meanwhile; the images, taps and
    // metrics port it holds are retried until it has (`sys::takeover`). After a crash, the
    // kernel may still be releasing the dead process's image locks (its io_uring is torn down
    // asynchronously): a short window covers that too.
    crate::sys::takeover::set_window(Some(if config.takeover {
        TAKEOVER_WINDOW
    } else {
        RESTART_WINDOW
    }));
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
    crate::sys::takeover::set_window(None);
    // A socket handed to us that nothing serves would accept front-ends and clients that
    // then hang: a misconfiguration (e.g. `--control none` under novacrond.socket), refused.
    let mut unclaimed = crate::sys::inherited::unclaimed();
    if config.takeover {
        // A live upgrade: the predecessor handed over every socket it served; one whose
        // device did not come back (added at run time without --state-dir) must not take
        // every other tenant's down with the start. Its front-end finds nobody listening.
        for path in unclaimed.drain(..) {
            log::warn!(
                "live upgrade: no device for handed-over socket {}; closed",
                path.display()
            );
            drop(crate::sys::inherited::take(&path));
        }
    }
    if let Some(path) = unclaimed.first() {
        if let Some(control) = control {
            control.stop();
        }
        if let Some(metrics) = metrics {
            metrics.stop();
        }
        stop_registry(&registry);
        return Err(DaemonError::Unclaimed(path.clone()));
    }
    let devices = lock(&registry).ids().len();
    log::info!("novacrond ready: {devices} device(s)");
    notify(&[NotifyState::Ready, NotifyState::Status(&status(&registry))]);
    let watchdog = Watchdog::start(Arc::clone(&registry));
    let waited = loop {
        match signals::wait_for_termination() {
            Ok(libc::SIGHUP) => {
                log::info!(
                    "SIGHUP: nothing to reload (configuration changes go through the control socket)"
                );
                notify(&[NotifyState::Status(&status(&registry))]);
            }
            other => break other,
        }
    };
    match &waited {
        Ok(signal) => log::info!("signal {signal}: stopping"),
        Err(e) => log::error!("waiting for signals failed: {e}; stopping"),
    }
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    drop(watchdog);
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

/// Tells the service manager `states`, if there is one; a failure is logged, never fatal.
fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("cannot notify the service manager: {e}");
    }
}

/// The service manager's one-line status.
fn status(registry: &Mutex<Registry>) -> String {
    let registry = lock(registry);
    let failed = registry.failed_count();
    let devices = registry.ids().len();
    if failed > 0 {
        format!("serving {devices} device(s); {failed} failed (see device.list)")
    } else {
        format!("serving {devices} device(s)")
    }
}

/// Sends `WATCHDOG=1` at half the interval systemd asked for, as long as the registry lock
/// can be taken (a control plane wedged on it stops the pings; systemd then restarts us).
struct Watchdog {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(registry: Arc<Mutex<Registry>>) -> Self {
        let Some(interval) = sd_notify::watchdog_enabled().filter(|i| !i.is_zero()) else {
            return Self {
                stop: None,
                thread: None,
            };
        };
        let period = interval.checked_div(2).unwrap_or(interval);
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(period)
                {
                    let line = status(&registry);
                    notify(&[NotifyState::Watchdog, NotifyState::Status(&line)]);
                }
            });
        match thread {
            Ok(thread) => Self {
                stop: Some(stop),
                thread: Some(thread),
            },
            Err(e) => {
                log::error!("cannot start the watchdog thread: {e}; systemd will restart us");
                Self {
                    stop: None,
                    thread: None,
                }
            }
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
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
