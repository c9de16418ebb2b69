//! `novacrond`: the NovaCron vhost-user backend daemon.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use novacron::config::options::OptionList;
use novacron::control::server::ControlConfig;
use novacron::daemon::{self, DaemonConfig};
use novacron::devices::blk::config::BlkConfig;
use novacron::devices::net::config::NetConfig;
use std::path::PathBuf;

/// Where the control socket lives unless `--control` says otherwise.
const DEFAULT_CONTROL: &str = "/run/novacron/control.sock";

/// Serve virtio devices to VMs over vhost-user sockets.
#[derive(Debug, Parser)]
#[command(name = "novacrond", version, about)]
struct Args {
    /// A virtio-blk device:
    /// socket=PATH,path=FILE|null[,size=N][,id=NAME][,readonly][,direct][,queues=N]
    /// [,queue-size=N][,serial=S][,engine=uring|sync][,logical-block-size=512|4096].
    /// Repeat for more devices.
    #[arg(long = "blk", value_name = "SPEC")]
    blk: Vec<String>,

    /// A virtio-net device:
    /// socket=PATH,tap=IFNAME|switch=NAME[,mac=52:54:00:..][,id=NAME][,queues=PAIRS]
    /// [,queue-size=N][,mtu=N][,vlan=ID]. Repeat for more devices.
    #[arg(long = "net", value_name = "SPEC")]
    net: Vec<String>,

    /// vhost-user backend convention: the device type this program serves with
    /// --socket-path/--fd and reports with --print-capabilities. Default: `net` when the
    /// program is invoked under a name containing "net" (the `vhost-user-net` link the
    /// package installs), else `block`.
    #[arg(long = "type", value_name = "block|net")]
    backend_type: Option<BackendType>,

    /// vhost-user backend convention: listen for the front-end on PATH (one device:
    /// --blk-file for block, --tap or --switch for net).
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    socket_path: Option<String>,

    /// vhost-user backend convention: the listening socket is already open as fd FDNUM (it
    /// must be bound to a path). Also: systemd socket activation (LISTEN_FDS) works for any
    /// device or control socket whose path matches a passed socket.
    #[arg(long, value_name = "FDNUM")]
    fd: Option<i32>,

    /// vhost-user convention (block): backing file of the device.
    #[arg(long, value_name = "PATH")]
    blk_file: Option<String>,

    /// vhost-user convention (block): serve the device read-only.
    #[arg(long, requires = "blk_file")]
    read_only: bool,

    /// Our extension of the convention (net): the tap the device uses.
    #[arg(long, value_name = "IFNAME", conflicts_with = "switch")]
    tap: Option<String>,

    /// Our extension of the convention (net): the switch the device joins.
    #[arg(long, value_name = "NAME")]
    switch: Option<String>,

    /// Our extension of the convention (net): the device's MAC.
    #[arg(long, value_name = "MAC")]
    mac: Option<String>,

    /// Print the vhost-user backend capabilities of --type as JSON and exit.
    #[arg(long)]
    print_capabilities: bool,

    /// Control socket (JSON-RPC); `none` disables it. Default: /run/novacron/control.sock,
    /// or none for a single device given with --socket-path/--fd (QEMU's backend-program
    /// conventions: one backend process per device must not contend for the host's socket).
    #[arg(long, value_name = "PATH")]
    control: Option<String>,

    /// Extra uid allowed on the control socket (repeatable; root and our uid always are).
    #[arg(long = "control-allow-uid", value_name = "UID")]
    control_allow_uid: Vec<u32>,

    /// Let host block devices back disks (`path=/dev/...`); off by default, so that a
    /// control client cannot hand a guest the host's own disks.
    #[arg(long)]
    allow_block_devices: bool,

    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (a bare PORT means 127.0.0.1).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<String>,

    /// Seconds after which an idle control connection is closed.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    control_idle_timeout: f64,

    /// Directory where devices added at run time are recorded and recreated from at start.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// The sandbox (no_new_privs, seccomp filters per thread kind): `on` (default) or `off`
    /// (debugging only).
    #[arg(long, value_name = "on|off", default_value = "on")]
    sandbox: OnOff,

    /// Run as this user (NAME, or UID:GID) after start-up, keeping only CAP_NET_ADMIN (for
    /// taps); the user must be able to reach the images, sockets and state directory. Without
    /// it a root daemon keeps CAP_NET_ADMIN and CAP_DAC_OVERRIDE and drops every other
    /// capability. Needs the sandbox.
    #[arg(long, value_name = "USER")]
    user: Option<String>,

    /// Started by a live upgrade (`novactl daemon upgrade`): wait up to a minute for the
    /// images, taps and metrics port the previous process still holds.
    #[arg(long, hide = true)]
    takeover: bool,

    /// Limit every file the daemon can reach (images, tiers, sockets, the state directory) to
    /// beneath DIR (repeatable), enforced by the kernel (Landlock). Default: no limit.
    #[arg(long = "fs-root", value_name = "DIR")]
    fs_roots: Vec<PathBuf>,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    log_level: String,
}

/// A switch on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

/// The device types of the vhost-user backend conventions this program serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BackendType {
    /// vhost-user-blk.
    #[value(alias = "blk")]
    Block,
    /// vhost-user-net.
    Net,
}

impl BackendType {
    /// The type `--type` names, else the one the program name implies.
    fn of(args: &Args) -> Self {
        args.backend_type.unwrap_or_else(|| {
            let name = std::env::args_os()
                .next()
                .map(PathBuf::from)
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_default();
            if name.contains("net") {
                Self::Net
            } else {
                Self::Block
            }
        })
    }

    /// `--print-capabilities`, as QEMU's vhost-user.json schema defines it
    /// (`VHostUserBackendCapabilities`): block names the two options the spec defines;
    /// the spec defines no net feature names.
    fn capabilities(self) -> &'static str {
        match self {
            Self::Block => r#"{"type":"block","features":["read-only","blk-file"]}"#,
            Self::Net => r#"{"type":"net"}"#,
        }
    }
}

/// The one device of the backend conventions (`--socket-path`/`--fd`), as a `--blk` or
/// `--net` spec.
fn convention_device(args: &Args) -> anyhow::Result<Option<(BackendType, String)>> {
    let socket = match (&args.socket_path, args.fd) {
        (Some(path), None) => path.clone(),
        (None, Some(fd)) => novacron::sys::inherited::adopt(fd)
            .with_context(|| format!("--fd {fd}"))?
            .to_string_lossy()
            .into_owned(),
        (None, None) => {
            if args.blk_file.is_some() || args.tap.is_some() || args.switch.is_some() {
                anyhow::bail!("--blk-file, --tap and --switch need --socket-path or --fd");
            }
            return Ok(None);
        }
        (Some(_), Some(_)) => anyhow::bail!("--socket-path and --fd exclude each other"),
    };
    let kind = BackendType::of(args);
    let spec = match kind {
        BackendType::Block => {
            let file = args
                .blk_file
                .as_deref()
                .context("a block backend needs --blk-file")?;
            let mut spec = format!("socket={socket},path={file}");
            if args.read_only {
                spec.push_str(",readonly");
            }
            spec
        }
        BackendType::Net => {
            let link = match (&args.tap, &args.switch) {
                (Some(tap), None) => format!("tap={tap}"),
                (None, Some(switch)) => format!("switch={switch}"),
                _ => anyhow::bail!("a net backend needs --tap IFNAME or --switch NAME"),
            };
            let mut spec = format!("socket={socket},{link}");
            if let Some(mac) = &args.mac {
                spec.push_str(&format!(",mac={mac}"));
            }
            spec
        }
    };
    Ok(Some((kind, spec)))
}

impl TryFrom<Args> for DaemonConfig {
    type Error = anyhow::Error;

    fn try_from(args: Args) -> anyhow::Result<Self> {
        let mut specs = args.blk.clone();
        let mut net_specs = args.net.clone();
        match convention_device(&args)? {
            Some((BackendType::Block, spec)) => specs.push(spec),
            Some((BackendType::Net, spec)) => net_specs.push(spec),
            None => {}
        }
        let mut blk = Vec::with_capacity(specs.len());
        for spec in &specs {
            // Validate now for a clear error before anything starts.
            BlkConfig::parse(spec).with_context(|| format!("--blk {spec}"))?;
            blk.push(OptionList::parse(spec)?.into_pairs());
        }
        let mut net = Vec::with_capacity(net_specs.len());
        for spec in &net_specs {
            NetConfig::parse(spec).with_context(|| format!("--net {spec}"))?;
            net.push(OptionList::parse(spec)?.into_pairs());
        }
        let idle_timeout = std::time::Duration::try_from_secs_f64(args.control_idle_timeout)
            .ok()
            .filter(|t| !t.is_zero())
            .context("--control-idle-timeout must be a positive number of seconds")?;
        let conventions = args.socket_path.is_some() || args.fd.is_some();
        let control_path = match &args.control {
            Some(path) => path.clone(),
            None if conventions => "none".to_string(),
            None => DEFAULT_CONTROL.to_string(),
        };
        let control = (control_path != "none").then(|| ControlConfig {
            socket: PathBuf::from(&control_path),
            allow_uids: args.control_allow_uid.clone(),
            idle_timeout,
        });
        if blk.is_empty() && net.is_empty() && control.is_none() && args.state_dir.is_none() {
            anyhow::bail!(
                "nothing to serve: give --blk, --net, a control socket or a state directory"
            );
        }
        let metrics = args
            .metrics
            .as_deref()
            .map(|text| match text.parse::<u16>() {
                Ok(port) => Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
                Err(_) => text.parse().with_context(|| format!("--metrics {text}")),
            })
            .transpose()?;
        Ok(DaemonConfig {
            blk,
            net,
            control,
            state_dir: args.state_dir,
            allow_block_devices: args.allow_block_devices,
            metrics,
            sandbox: args.sandbox == OnOff::On,
            fs_roots: args.fs_roots.clone(),
            user: args.user.clone(),
            takeover: args.takeover,
        })
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.print_capabilities {
        writeln!(
            std::io::stdout(),
            "{}",
            BackendType::of(&args).capabilities()
        )?;
        return Ok(());
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(&args.log_level))
        .format_timestamp_micros()
        .init();
    // Sockets systemd passed (socket activation), before anything opens an fd.
    let activated = novacron::sys::inherited::adopt_systemd().context("socket activation")?;
    if !activated.is_empty() {
        log::info!("{} socket(s) from socket activation", activated.len());
    }
    let config = DaemonConfig::try_from(args)?;
    daemon::run(config)?;
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The one place errors reach the user: the whole cause chain, then exit 1.
            let _ = writeln!(std::io::stderr(), "novacrond: {error:#}");
            ExitCode::FAILURE
        }
    }
}
