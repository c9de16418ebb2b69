//! `novactl`: the operator's command line for a running `novacrond`, over its control socket.
//!
//! ```text
//! novactl [--control PATH] [--json] info
//! novactl device add blk socket=...,path=...[,key=value...]
//! novactl device add net socket=...,tap=IFNAME|switch=NAME[,key=value...]
//! novactl device rm ID [--force]
//! novactl device ls | get ID | stats ID
//! novactl qos get ID | set ID iops=5000,bps=100M,tx-pps=...[,KEY=none...]
//! novactl qos group add|set NAME iops=...,bps=... | rm NAME | ls
//! novactl switch add NAME [--uplink tap=TAP] | rm NAME | ls | ports NAME
//! novactl tier status ID | demote ID ... | promote ID ... | policy ID KEY=VALUE...
//! novactl shutdown
//! ```
//! Human-readable output by default, the server's JSON with `--json`; on error the server's
//! message goes to stderr and the exit status is 1.

use std::io::Write;
use std::process::ExitCode;

use anyhow::bail;
use clap::{Parser, Subcommand};
use novacron::control::client::Client;
use serde_json::{json, Value};

/// Control a running novacrond: devices (disks and NICs), QoS, switches, tiering.
#[derive(Debug, Parser)]
#[command(name = "novactl", version)]
struct Args {
    /// The daemon's control socket.
    #[arg(long, default_value = "/run/novacron/control.sock")]
    control: String,
    /// Print the server's JSON result instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Daemon version, device types and engines.
    Info,
    /// Manage devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Rate limits.
    #[command(subcommand)]
    Qos(QosCommand),
    /// In-daemon L2 switches.
    #[command(subcommand)]
    Switch(SwitchCommand),
    /// Storage tiering of tiered disks.
    #[command(subcommand)]
    Tier(TierCommand),
    /// Stop the daemon (devices finish in-flight I/O first).
    Shutdown,
    /// Replace the running daemon with a new process (a new binary, by default the file it
    /// runs): sockets are handed over, guests see a reconnect.
    Upgrade {
        /// The binary to run instead of the running one's file.
        #[arg(long)]
        binary: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum QosCommand {
    /// Show a device's limits and how much they held it back.
    Get {
        /// Device id.
        id: String,
    },
    /// Change limits live: `iops=5000 bps=100M iops-burst=20000`; `KEY=none` removes one.
    Set {
        /// Device id.
        id: String,
        /// Settings as key=value, comma-separated or as separate words.
        #[arg(required = true)]
        settings: Vec<String>,
    },
    /// Shared limits for several devices.
    #[command(subcommand)]
    Group(GroupCommand),
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// Create a group: `novactl qos group add tenant7 iops=20000,bps=1G`.
    Add {
        /// Group name.
        name: String,
        /// Limits as key=value.
        #[arg(required = true)]
        settings: Vec<String>,
    },
    /// Change a group's limits; `KEY=none` removes one.
    Set {
        /// Group name.
        name: String,
        /// Limits as key=value.
        #[arg(required = true)]
        settings: Vec<String>,
    },
    /// Delete an unused group.
    Rm {
        /// Group name.
        name: String,
    },
    /// List groups with their members.
    Ls,
}

#[derive(Debug, Subcommand)]
enum TierCommand {
    /// Extents and bytes per tier, moves, progress of the latest batch.
    Status {
        /// Device id.
        id: String,
    },
    /// Move extents to the cold tier: `--all`, `--extents 0,5,6` or `--idle-for 10m`.
    Demote {
        /// Device id.
        id: String,
        #[command(flatten)]
        which: Which,
    },
    /// Automatic moves: `hot-budget=2G idle-for=10m promote-after=3`; `KEY=none` removes one.
    Policy {
        /// Device id.
        id: String,
        /// Settings as key=value.
        #[arg(required = true)]
        settings: Vec<String>,
    },
    /// Move extents back to the hot tier: `--all` or `--extents 0,5,6`.
    Promote {
        /// Device id.
        id: String,
        #[command(flatten)]
        which: Which,
    },
}

#[derive(Debug, clap::Args)]
struct Which {
    /// Every extent.
    #[arg(long)]
    all: bool,
    /// These extents (comma-separated).
    #[arg(long, value_delimiter = ',')]
    extents: Vec<u64>,
    /// Extents not accessed for this long (demote only): 30s, 10m, 2h.
    #[arg(long)]
    idle_for: Option<String>,
    /// Return at once and let the move run in the background (progress in `tier status`).
    #[arg(long)]
    no_wait: bool,
}

impl Which {
    fn params(&self, id: &str) -> Value {
        let mut params = json!({"id": id, "wait": !self.no_wait});
        if self.all {
            params["all"] = json!(true);
        }
        if !self.extents.is_empty() {
            params["extents"] = json!(self.extents);
        }
        if let Some(idle) = &self.idle_for {
            params["idle-for"] = json!(idle);
        }
        params
    }
}

#[derive(Debug, Subcommand)]
enum SwitchCommand {
    /// Create a switch: `novactl switch add tenant7 --uplink tap=br-up0`.
    Add {
        /// Switch name.
        name: String,
        /// A tap as the switch's uplink (`tap=NAME` or `NAME`).
        #[arg(long)]
        uplink: Option<String>,
    },
    /// Delete a switch without device ports.
    #[command(alias = "remove")]
    Rm {
        /// Switch name.
        name: String,
    },
    /// List switches.
    #[command(alias = "list")]
    Ls,
    /// Show a switch's ports and their counters.
    Ports {
        /// Switch name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Add a device: `blk socket=PATH,path=FILE[,size=20G][,queues=2]...` or
    /// `net socket=PATH,tap=IFNAME|switch=NAME[,mac=..][,queues=2]...`.
    Add {
        /// Device type (blk or net).
        kind: String,
        /// Options as key=value, comma-separated or as separate words.
        #[arg(required = true)]
        options: Vec<String>,
    },
    /// Remove a device.
    #[command(alias = "remove")]
    Rm {
        /// Device id.
        id: String,
        /// Disconnect a connected front-end.
        #[arg(long)]
        force: bool,
    },
    /// List devices.
    #[command(alias = "list")]
    Ls,
    /// Show one device.
    Get {
        /// Device id.
        id: String,
    },
    /// Show a device's counters.
    Stats {
        /// Device id.
        id: String,
    },
    /// Start a recorded device that failed to start (after fixing its backing).
    Retry {
        /// Device id.
        id: String,
    },
    /// Grow a disk (an rbd: image, an image file or the null device); the guest is told.
    Resize {
        /// Device id.
        id: String,
        /// New size in bytes, or with a K/M/G/T suffix.
        size: String,
    },
}

fn call(control: &str, method: &str, params: Value) -> anyhow::Result<Value> {
    let mut client = Client::connect(std::path::Path::new(control), None)?;
    Ok(client.call(method, params)?)
}

/// Splits `key=value` words (comma-separated or separate) into a params object that starts
/// with `first`; `bare` gives the value of a word without `=`, `map` turns each value to JSON.
fn key_values(
    first: (&str, &str),
    words: &[String],
    bare: Option<&str>,
    map: impl Fn(&str) -> Value,
) -> anyhow::Result<Value> {
    let mut params = serde_json::Map::new();
    params.insert(first.0.into(), Value::String(first.1.to_string()));
    for item in words
        .iter()
        .flat_map(|w| w.split(','))
        .filter(|s| !s.is_empty())
    {
        let (key, value) = match (item.split_once('='), bare) {
            (Some(pair), _) => pair,
            (None, Some(default)) => (item, default),
            (None, None) => bail!("`{item}` is not key=value"),
        };
        if params.insert(key.to_string(), map(value)).is_some() {
            bail!("`{key}` given twice");
        }
    }
    Ok(Value::Object(params))
}

fn options_to_params(kind: &str, words: &[String]) -> anyhow::Result<Value> {
    key_values(("type", kind), words, Some("on"), |v| {
        Value::String(v.to_string())
    })
}

fn qos_params(first: (&str, &str), words: &[String]) -> anyhow::Result<Value> {
    key_values(first, words, None, |v| match v {
        "none" => Value::Null,
        v => Value::String(v.to_string()),
    })
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(items) if items.iter().all(Value::is_string) => {
            let names: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
            if names.is_empty() {
                "-".into()
            } else {
                names.join(",")
            }
        }
        other => other.to_string(),
    }
}

fn print_table(rows: &[Vec<String>]) -> std::io::Result<()> {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = std::io::stdout().lock();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(())
}

fn print_device(device: &Value) -> std::io::Result<()> {
    let rows: Vec<Vec<String>> = device
        .as_object()
        .map(|m| m.iter().map(|(k, v)| vec![k.clone(), text(v)]).collect())
        .unwrap_or_default();
    print_table(&rows)
}

/// Sum of a net counter snapshot's drops, both directions.
fn drop_total(stats: &Value) -> u64 {
    ["tx_drops", "rx_drops"]
        .iter()
        .filter_map(|k| stats[*k].as_object())
        .flat_map(|m| m.values())
        .filter_map(Value::as_u64)
        .sum()
}

/// One row per named net counter snapshot; drops listed by reason when there are any.
fn print_net_counters(named: &[(&str, &Value)]) -> std::io::Result<()> {
    let mut rows = vec![[
        "NAME",
        "TX FRAMES",
        "TX BYTES",
        "RX FRAMES",
        "RX BYTES",
        "DROPS",
    ]
    .map(String::from)
    .to_vec()];
    for (name, s) in named {
        let reasons: Vec<String> = ["tx_drops", "rx_drops"]
            .iter()
            .filter_map(|dir| Some((dir, s[*dir].as_object()?)))
            .flat_map(|(dir, m)| {
                m.iter()
                    .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
                    .map(move |(k, n)| format!("{}:{k}={n}", &dir[..2]))
            })
            .collect();
        rows.push(vec![
            name.to_string(),
            text(&s["tx_frames"]),
            text(&s["tx_bytes"]),
            text(&s["rx_frames"]),
            text(&s["rx_bytes"]),
            if reasons.is_empty() {
                "0".into()
            } else {
                reasons.join(" ")
            },
        ]);
    }
    print_table(&rows)
}

fn run(args: Args) -> anyhow::Result<()> {
    if let Command::Upgrade { binary } = &args.command {
        let done = novacron::control::upgrade::upgrade(
            std::path::Path::new(&args.control),
            binary.as_deref(),
        )?;
        if let Some(note) = &done.note {
            writeln!(std::io::stderr(), "novactl: {note}")?;
        }
        if args.json {
            writeln!(
                std::io::stdout(),
                "{}",
                json!({"old-pid": done.old_pid, "new-pid": done.new_pid,
                       "binary": done.binary, "seconds": done.took.as_secs_f64()})
            )?;
        } else {
            writeln!(
                std::io::stdout(),
                "upgraded: pid {} -> pid {} ({}) in {:.2} s",
                done.old_pid,
                done.new_pid,
                done.binary.display(),
                done.took.as_secs_f64()
            )?;
        }
        return Ok(());
    }
    let (method, params) = match &args.command {
        Command::Info => ("daemon.info", json!({})),
        Command::Shutdown => ("daemon.shutdown", json!({})),
        Command::Upgrade { .. } => return Ok(()),
        Command::Device(DeviceCommand::Add { kind, options }) => {
            ("device.add", options_to_params(kind, options)?)
        }
        Command::Device(DeviceCommand::Rm { id, force }) => {
            ("device.remove", json!({"id": id, "force": force}))
        }
        Command::Device(DeviceCommand::Ls) => ("device.list", json!({})),
        Command::Device(DeviceCommand::Get { id }) => ("device.get", json!({"id": id})),
        Command::Device(DeviceCommand::Retry { id }) => ("device.retry", json!({"id": id})),
        Command::Device(DeviceCommand::Resize { id, size }) => {
            ("device.resize", json!({"id": id, "size": size}))
        }
        Command::Device(DeviceCommand::Stats { id }) => ("device.stats", json!({"id": id})),
        Command::Qos(QosCommand::Get { id }) => ("qos.get", json!({"id": id})),
        Command::Qos(QosCommand::Set { id, settings }) => {
            ("qos.set", qos_params(("id", id), settings)?)
        }
        Command::Qos(QosCommand::Group(GroupCommand::Add { name, settings })) => {
            ("qos.group.add", qos_params(("name", name), settings)?)
        }
        Command::Qos(QosCommand::Group(GroupCommand::Set { name, settings })) => {
            ("qos.group.set", qos_params(("name", name), settings)?)
        }
        Command::Qos(QosCommand::Group(GroupCommand::Rm { name })) => {
            ("qos.group.remove", json!({"name": name}))
        }
        Command::Qos(QosCommand::Group(GroupCommand::Ls)) => ("qos.group.list", json!({})),
        Command::Switch(SwitchCommand::Add { name, uplink }) => {
            let mut params = json!({"name": name});
            if let Some(uplink) = uplink {
                let tap = uplink.strip_prefix("tap=").unwrap_or(uplink);
                params["uplink"] = json!(tap);
            }
            ("switch.add", params)
        }
        Command::Switch(SwitchCommand::Rm { name }) => ("switch.remove", json!({"name": name})),
        Command::Switch(SwitchCommand::Ls) => ("switch.list", json!({})),
        Command::Switch(SwitchCommand::Ports { name }) => ("switch.ports", json!({"name": name})),
        Command::Tier(TierCommand::Status { id }) => ("tier.status", json!({"id": id})),
        Command::Tier(TierCommand::Demote { id, which }) => ("tier.demote", which.params(id)),
        Command::Tier(TierCommand::Promote { id, which }) => ("tier.promote", which.params(id)),
        Command::Tier(TierCommand::Policy { id, settings }) => {
            ("tier.policy", qos_params(("id", id), settings)?)
        }
    };
    let result = call(&args.control, method, params)?;
    if args.json {
        writeln!(
            std::io::stdout(),
            "{}",
            serde_json::to_string_pretty(&result)?
        )?;
        return Ok(());
    }
    match &args.command {
        Command::Device(DeviceCommand::Ls) => {
            let mut rows = vec![[
                "ID",
                "TYPE",
                "SOCKET",
                "PATH",
                "SIZE",
                "QUEUES",
                "ENGINE",
                "CONNECTED",
            ]
            .map(String::from)
            .to_vec()];
            for d in result.as_array().into_iter().flatten() {
                rows.push(
                    [
                        "id",
                        "type",
                        "socket",
                        "path",
                        "size",
                        "queues",
                        "engine",
                        "connected",
                    ]
                    .iter()
                    .map(|k| text(&d[*k]))
                    .collect(),
                );
            }
            print_table(&rows)?;
        }
        Command::Device(DeviceCommand::Stats { .. }) if result["type"] == "net" => {
            print_net_counters(&[("device", &result["total"])])?;
        }
        Command::Switch(SwitchCommand::Ls) => {
            let mut rows = vec![["SWITCH", "PORTS", "MACS", "UPLINK", "FRAMES IN", "DROPS"]
                .map(String::from)
                .to_vec()];
            for sw in result.as_array().into_iter().flatten() {
                rows.push(vec![
                    text(&sw["name"]),
                    text(&sw["ports"]),
                    text(&sw["learnt-macs"]),
                    text(&sw["uplink"]),
                    text(&sw["stats"]["tx_frames"]),
                    drop_total(&sw["stats"]).to_string(),
                ]);
            }
            print_table(&rows)?;
        }
        Command::Switch(SwitchCommand::Ports { .. }) => {
            let ports: Vec<(String, &Value)> = result
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    (
                        format!("{} {}", text(&p["port"]), text(&p["name"])),
                        &p["stats"],
                    )
                })
                .collect();
            let named: Vec<(&str, &Value)> = ports.iter().map(|(n, v)| (n.as_str(), *v)).collect();
            print_net_counters(&named)?;
        }
        Command::Tier(TierCommand::Status { .. }) => {
            let p = &result["progress"];
            let bar = |done: u64, total: u64| {
                let width = 30u64;
                let filled = done
                    .saturating_mul(width)
                    .checked_div(total)
                    .unwrap_or(width)
                    .min(width);
                format!(
                    "[{}{}] {done}/{total}",
                    "#".repeat(filled as usize),
                    ".".repeat(width.saturating_sub(filled) as usize)
                )
            };
            let mut rows = vec![["FIELD", "VALUE"].map(String::from).to_vec()];
            for key in [
                "extent-size",
                "extents",
                "hot-extents",
                "cold-extents",
                "hot-bytes-allocated",
                "cold-bytes",
                "compression-ratio",
                "demoted",
                "promoted",
                "moves-failed",
                "cold-reads",
                "corrupt-records",
            ] {
                rows.push(vec![key.to_string(), text(&result[key])]);
            }
            if p["total"].as_u64().unwrap_or(0) > 0 {
                rows.push(vec![
                    format!(
                        "{} ({})",
                        text(&p["operation"]),
                        if p["running"] == true {
                            "running"
                        } else {
                            "done"
                        }
                    ),
                    bar(
                        p["handled"].as_u64().unwrap_or(0),
                        p["total"].as_u64().unwrap_or(0),
                    ),
                ]);
            }
            print_table(&rows)?;
        }
        Command::Switch(SwitchCommand::Rm { name }) => {
            writeln!(std::io::stdout(), "removed switch {name}")?;
        }
        Command::Device(DeviceCommand::Stats { .. }) => {
            let mut rows = vec![[
                "QUEUE",
                "READS",
                "WRITES",
                "FLUSHES",
                "BYTES READ",
                "BYTES WRITTEN",
                "IO ERRORS",
                "IN FLIGHT",
            ]
            .map(String::from)
            .to_vec()];
            for (i, q) in result["queues"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                let count = |name: &str| {
                    q["requests"]
                        .as_array()
                        .and_then(|r| r.iter().find(|p| p[0] == name))
                        .map_or("0".into(), |p| text(&p[1]))
                };
                rows.push(vec![
                    i.to_string(),
                    count("read"),
                    count("write"),
                    count("flush"),
                    text(&q["bytes_read"]),
                    text(&q["bytes_written"]),
                    text(&q["io_errors"]),
                    text(&q["in_flight"]),
                ]);
            }
            print_table(&rows)?;
        }
        Command::Qos(QosCommand::Group(GroupCommand::Ls)) => {
            let mut rows = vec![["GROUP", "LIMITS", "MEMBERS"].map(String::from).to_vec()];
            for g in result.as_array().into_iter().flatten() {
                rows.push(vec![
                    text(&g["name"]),
                    text(&g["limits"]),
                    text(&g["members"]),
                ]);
            }
            print_table(&rows)?;
        }
        Command::Qos(QosCommand::Group(GroupCommand::Rm { name })) => {
            writeln!(std::io::stdout(), "removed group {name}")?;
        }
        Command::Device(DeviceCommand::Rm { id, .. }) => {
            writeln!(std::io::stdout(), "removed {id}")?;
        }
        Command::Shutdown => writeln!(std::io::stdout(), "shutting down")?,
        _ => print_device(&result)?,
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "novactl: {error:#}");
            ExitCode::FAILURE
        }
    }
}
