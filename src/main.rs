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

    /// vhost-user convention: socket of a single block device (with --blk-file).
    #[arg(long, value_name = "PATH", requires = "blk_file")]
    socket_path: Option<String>,

    /// vhost-user convention: backing file of the single block device.
    #[arg(long, value_name = "PATH", requires = "socket_path")]
    blk_file: Option<String>,

    /// vhost-user convention: serve the --blk-file device read-only.
    #[arg(long, requires = "blk_file")]
    read_only: bool,

    /// Print the vhost-user backend capabilities as JSON and exit.
    #[arg(long)]
    print_capabilities: bool,

    /// Control socket (JSON-RPC); `none` disables it.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL)]
    control: String,

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

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    log_level: String,
}

impl TryFrom<Args> for DaemonConfig {
    type Error = anyhow::Error;

    fn try_from(args: Args) -> anyhow::Result<Self> {
        let mut specs = args.blk.clone();
        if let (Some(socket), Some(file)) = (&args.socket_path, &args.blk_file) {
            let mut spec = format!("socket={socket},path={file}");
            if args.read_only {
                spec.push_str(",readonly");
            }
            specs.push(spec);
        }
        let mut blk = Vec::with_capacity(specs.len());
        for spec in &specs {
            // Validate now for a clear error before anything starts.
            BlkConfig::parse(spec).with_context(|| format!("--blk {spec}"))?;
            blk.push(OptionList::parse(spec)?.into_pairs());
        }
        let mut net = Vec::with_capacity(args.net.len());
        for spec in &args.net {
            NetConfig::parse(spec).with_context(|| format!("--net {spec}"))?;
            net.push(OptionList::parse(spec)?.into_pairs());
        }
        let idle_timeout = std::time::Duration::try_from_secs_f64(args.control_idle_timeout)
            .ok()
            .filter(|t| !t.is_zero())
            .context("--control-idle-timeout must be a positive number of seconds")?;
        let control = (args.control != "none").then(|| ControlConfig {
            socket: PathBuf::from(&args.control),
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
        })
    }
}

/// Capabilities in the format of the vhost-user spec's "backend program conventions".
const CAPABILITIES: &str = r#"{"type":"block","features":["read-only","blk-file"]}"#;

fn run(args: Args) -> anyhow::Result<()> {
    if args.print_capabilities {
        writeln!(std::io::stdout(), "{CAPABILITIES}")?;
        return Ok(());
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(&args.log_level))
        .format_timestamp_micros()
        .init();
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
