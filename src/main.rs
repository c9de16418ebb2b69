//! `novacrond`: the NovaCron vhost-user backend daemon.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use novacron::daemon::{self, DaemonConfig};
use novacron::devices::blk::config::BlkConfig;

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

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    log_level: String,
}

impl TryFrom<Args> for DaemonConfig {
    type Error = anyhow::Error;

    fn try_from(args: Args) -> anyhow::Result<Self> {
        let mut blk = args
            .blk
            .iter()
            .map(|spec| BlkConfig::parse(spec).with_context(|| format!("--blk {spec}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let (Some(socket), Some(file)) = (&args.socket_path, &args.blk_file) {
            let mut spec = format!("socket={socket},path={file}");
            if args.read_only {
                spec.push_str(",readonly");
            }
            blk.push(BlkConfig::parse(&spec).context("--socket-path/--blk-file")?);
        }
        if blk.is_empty() {
            anyhow::bail!("nothing to serve: give at least one --blk");
        }
        Ok(DaemonConfig { blk })
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
