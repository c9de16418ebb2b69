//! Prometheus / OpenMetrics-compatible text exposition at `GET /metrics` (`--metrics ADDR:PORT`).
//!
//! The numbers are the per-queue counters the data path already keeps (relaxed atomics owned
//! by each worker), read at scrape time: scraping takes the registry lock briefly and never
//! touches a queue. Series, all labelled `device` (and `queue` where per queue):
//!
//! - `novacron_blk_requests_total{op}`, `novacron_blk_bytes_total{direction}`,
//!   `novacron_blk_io_errors_total`, `novacron_blk_rejected_total{reason}`,
//!   `novacron_blk_in_flight`, `novacron_blk_request_latency_seconds` (histogram),
//!   `novacron_blk_connected`;
//! - net devices (`device`) and switches (`switch`): `novacron_net_frames_total{direction}`,
//!   `novacron_net_bytes_total{direction}`, `novacron_net_drops_total{direction,reason}`,
//!   `novacron_net_rx_stalls_total`, `novacron_net_throttled_total{direction}`,
//!   `novacron_net_connected`, `novacron_net_link_up`,
//!   `novacron_switch_frames_total{direction}` (in = entering the switch, out = copies
//!   delivered), `novacron_switch_drops_total{direction,reason}`, `novacron_switch_ports`,
//!   `novacron_switch_learnt_macs`;
//! - tiering: `novacron_tier_extents{device,tier}`, `novacron_tier_bytes{device,tier}`,
//!   `novacron_tier_moves_total{device,kind}`, `novacron_tier_cold_reads_total`,
//!   `novacron_tier_corrupt_records_total`;
//! - QoS: `novacron_qos_tokens{device,limit}`, `novacron_qos_group_tokens{group,limit}`,
//!   `novacron_qos_group_members{group}`, `novacron_qos_group_waits_total{group}` (held-back
//!   requests and frames are in the device families: `*_throttled_total`).
//!
//! The text is written here rather than through a metrics crate because the histogram
//! buckets already exist as our own counters; the crates we looked at want to own the
//! observations. The format is small and the label values are escaped per the spec.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::devices::blk::stats::QueueSnapshot;
use crate::devices::net::stats::NetSnapshot;
use crate::registry::Registry;

/// Errors starting the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address could not be bound.
    #[error("cannot serve metrics on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The server thread could not start.
    #[error("cannot start the metrics thread")]
    Thread(#[source] std::io::Error),
}

/// A running metrics endpoint.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Serves `/metrics` on `addr` from `registry`.
    pub fn start(addr: SocketAddr, registry: Arc<Mutex<Registry>>) -> Result<Self, MetricsError> {
        let server = Arc::new(
            tiny_http::Server::http(addr).map_err(|e| MetricsError::Bind {
                addr,
                reason: e.to_string(),
            })?,
        );
        let serving = Arc::clone(&server);
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for request in serving.incoming_requests() {
                    let response = if request.url() == "/metrics" {
                        let text = {
                            let registry = crate::lock::lock(&registry);
                            let mut text = render(&registry.metrics_snapshot());
                            text.push_str(&render_net(
                                &registry.net_metrics_snapshot(),
                                &registry.switch_metrics_snapshot(),
                            ));
                            text.push_str(&render_qos(&registry.qos_metrics_snapshot()));
                            text.push_str(&render_tier(&registry.tier_metrics_snapshot()));
                            text
                        };
                        let mut response = tiny_http::Response::from_string(text);
                        if let Ok(header) = tiny_http::Header::from_bytes(
                            &b"Content-Type"[..],
                            &b"text/plain; version=0.0.4; charset=utf-8"[..],
                        ) {
                            response = response.with_header(header);
                        }
                        response
                    } else {
                        tiny_http::Response::from_string("try /metrics\n").with_status_code(404)
                    };
                    if let Err(e) = request.respond(response) {
                        log::debug!("metrics: cannot respond: {e}");
                    }
                }
            })
            .map_err(MetricsError::Thread)?;
        log::info!("metrics on http://{addr}/metrics");
        Ok(Self {
            server,
            thread: Some(thread),
        })
    }

    /// Stops serving.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

/// Per device: (id, connected, per-queue snapshots).
pub type Snapshot = Vec<(String, bool, Vec<QueueSnapshot>)>;

/// Per net device: (id, connected, link up, counters).
pub type NetDevices = Vec<NetDevice>;
/// One net device's metrics row.
pub type NetDevice = (String, bool, bool, NetSnapshot);
/// Per switch: (name, ports, learnt MACs, counters).
pub type Switches = Vec<(String, usize, usize, NetSnapshot)>;

/// Escapes a label value (backslash, double quote, newline).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Samples per device and queue, labelled `device` and `queue`: `value` gives each queue's
/// `(extra labels, value)` pairs (extra labels start with a comma, or are empty).
fn per_queue(
    devices: &Snapshot,
    value: impl Fn(&QueueSnapshot) -> Vec<(String, String)>,
) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    for (id, _, queues) in devices {
        let device = escape(id);
        for (q, snap) in queues.iter().enumerate() {
            for (labels, v) in value(snap) {
                rows.push((format!("device=\"{device}\",queue=\"{q}\"{labels}"), v));
            }
        }
    }
    rows
}

/// `(no extra labels, value)`.
fn plain(value: impl ToString) -> Vec<(String, String)> {
    vec![(String::new(), value.to_string())]
}

/// A per-queue block family: name, type, help and each queue's samples.
type QueueFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&QueueSnapshot) -> Vec<(String, String)>,
);

/// Renders the block device families.
pub fn render(devices: &Snapshot) -> String {
    let mut out = String::new();
    family_of(
        &mut out,
        "novacron_blk_connected",
        "gauge",
        "1 while a vhost-user front-end is connected.",
        &samples(
            devices,
            "device",
            |d| &d.0,
            |d| vec![(String::new(), u8::from(d.1))],
        ),
    );
    let families: [QueueFamily; 8] = [
        (
            "novacron_blk_requests_total",
            "counter",
            "Completed requests by type.",
            |s| {
                s.requests
                    .iter()
                    .map(|(op, n)| (format!(",op=\"{op}\""), n.to_string()))
                    .collect()
            },
        ),
        (
            "novacron_blk_bytes_total",
            "counter",
            "Bytes transferred by the guest.",
            |s| {
                vec![
                    (",direction=\"read\"".into(), s.bytes_read.to_string()),
                    (",direction=\"write\"".into(), s.bytes_written.to_string()),
                ]
            },
        ),
        (
            "novacron_blk_io_errors_total",
            "counter",
            "Requests failed by the backing (guest saw IOERR).",
            |s| plain(s.io_errors),
        ),
        (
            "novacron_blk_in_flight",
            "gauge",
            "Requests submitted and not yet completed.",
            |s| plain(s.in_flight),
        ),
        (
            "novacron_blk_throttled_total",
            "counter",
            "Requests held back by QoS.",
            |s| plain(s.throttled),
        ),
        (
            "novacron_blk_throttle_wait_seconds_total",
            "counter",
            "Time requests spent held back by QoS.",
            |s| plain(s.throttle_wait_ns as f64 / 1e9),
        ),
        (
            "novacron_blk_rejected_total",
            "counter",
            "Requests refused by validation, by reason.",
            |s| {
                s.rejected
                    .iter()
                    .map(|(reason, n)| (format!(",reason=\"{reason}\""), n.to_string()))
                    .collect()
            },
        ),
        (
            "novacron_blk_ring_errors_total",
            "counter",
            "Kicks that found a corrupt available ring.",
            |s| plain(s.ring_errors),
        ),
    ];
    for (name, kind, help, value) in families {
        family_of(&mut out, name, kind, help, &per_queue(devices, value));
    }
    let latency = "novacron_blk_request_latency_seconds";
    family_header(
        &mut out,
        latency,
        "histogram",
        "Request latency from submission to completion.",
    );
    let buckets = per_queue(devices, |s| {
        let mut cumulative = 0u64;
        s.latency_us
            .iter()
            .map(|(bound_us, n)| {
                cumulative = cumulative.saturating_add(*n);
                let le = if *bound_us == u64::MAX {
                    "+Inf".to_string()
                } else {
                    (*bound_us as f64 / 1e6).to_string()
                };
                (format!(",le=\"{le}\""), cumulative.to_string())
            })
            .collect()
    });
    write_samples(&mut out, &format!("{latency}_bucket"), &buckets);
    let sums = per_queue(devices, |s| plain(s.latency_ns_total as f64 / 1e9));
    write_samples(&mut out, &format!("{latency}_sum"), &sums);
    let counts = per_queue(devices, |s| {
        plain(
            s.latency_us
                .iter()
                .map(|(_, n)| *n)
                .fold(0u64, u64::saturating_add),
        )
    });
    write_samples(&mut out, &format!("{latency}_count"), &counts);
    out
}

/// Writes a family's `# HELP` and `# TYPE` lines.
fn family_header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Writes samples `name{labels} value`.
fn write_samples(out: &mut String, name: &str, samples: &[(String, String)]) {
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// Writes one family of samples, `(labels, value)` each.
fn family_of(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, String)]) {
    family_header(out, name, kind, help);
    write_samples(out, name, samples);
}

/// Samples of a directional counter over named snapshots (`tx`/`rx` or `in`/`out`).
fn directional(
    rows: &[(String, &NetSnapshot)],
    names: [&str; 2],
    value: impl Fn(&NetSnapshot) -> [u64; 2],
) -> Vec<(String, String)> {
    rows.iter()
        .flat_map(|(label, snap)| {
            names
                .iter()
                .zip(value(snap))
                .map(move |(dir, v)| (format!("{label},direction=\"{dir}\""), v.to_string()))
        })
        .collect()
}

fn drops(rows: &[(String, &NetSnapshot)], names: [&str; 2]) -> Vec<(String, String)> {
    rows.iter()
        .flat_map(|(label, snap)| {
            let [tx, rx] = names;
            snap.tx_drops
                .iter()
                .map(move |(r, n)| (format!("{label},direction=\"{tx}\",reason=\"{r}\""), *n))
                .chain(
                    snap.rx_drops.iter().map(move |(r, n)| {
                        (format!("{label},direction=\"{rx}\",reason=\"{r}\""), *n)
                    }),
                )
                .map(|(l, n)| (l, n.to_string()))
        })
        .collect()
}

/// Samples `{key="name",<labels>} value`: for each item, its name and its `(extra labels,
/// value)` pairs (extra labels start with a comma, or are empty).
fn samples<T, V: ToString>(
    items: &[T],
    key: &str,
    name: impl Fn(&T) -> &str,
    values: impl Fn(&T) -> Vec<(String, V)>,
) -> Vec<(String, String)> {
    items
        .iter()
        .flat_map(|item| {
            let id = format!("{key}=\"{}\"", escape(name(item)));
            values(item)
                .into_iter()
                .map(move |(labels, v)| (format!("{id}{labels}"), v.to_string()))
        })
        .collect()
}

/// `(",limit=\"NAME\"", tokens)` for each bucket.
fn by_limit(tokens: &Tokens) -> Vec<(String, i64)> {
    tokens
        .iter()
        .map(|(limit, n)| (format!(",limit=\"{}\"", escape(limit)), *n))
        .collect()
}

/// Tokens by limit name.
pub type Tokens = Vec<(String, i64)>;
/// A group's row: name, members, waits, tokens.
pub type GroupRow = (String, usize, u64, Tokens);

/// QoS state for `/metrics`: per device `(id, tokens by limit)`, per group
/// `(name, members, waits, tokens by limit)`.
pub struct QosSnapshot {
    /// Devices with limits of their own.
    pub devices: Vec<(String, Tokens)>,
    /// Groups.
    pub groups: Vec<GroupRow>,
}

/// Renders the QoS families: current tokens of every device and group bucket, group members
/// and the times members had to wait for their group.
pub fn render_qos(qos: &QosSnapshot) -> String {
    let mut out = String::new();
    family_of(
        &mut out,
        "novacron_qos_tokens",
        "gauge",
        "Tokens in a device's own buckets (negative: debt).",
        &samples(&qos.devices, "device", |d| &d.0, |d| by_limit(&d.1)),
    );
    family_of(
        &mut out,
        "novacron_qos_group_tokens",
        "gauge",
        "Tokens in a group's buckets (negative: debt).",
        &samples(&qos.groups, "group", |g| &g.0, |g| by_limit(&g.3)),
    );
    family_of(
        &mut out,
        "novacron_qos_group_members",
        "gauge",
        "Devices in the group.",
        &samples(
            &qos.groups,
            "group",
            |g| &g.0,
            |g| vec![(String::new(), g.1)],
        ),
    );
    family_of(
        &mut out,
        "novacron_qos_group_waits_total",
        "counter",
        "Times a member had to wait for the group's tokens.",
        &samples(
            &qos.groups,
            "group",
            |g| &g.0,
            |g| vec![(String::new(), g.2)],
        ),
    );
    out
}

/// A metric family from status fields: name, type, help, `(extra labels, status key)`s.
type Family<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)]);

/// Renders the tiering families from each tiered disk's `tier.status`.
pub fn render_tier(disks: &[(String, serde_json::Value)]) -> String {
    let mut out = String::new();
    // (metric, type, help, [(extra labels, status key)]).
    let families: [Family<'_>; 5] = [
        (
            "novacron_tier_extents",
            "gauge",
            "Extents by tier.",
            &[
                (",tier=\"hot\"", "hot-extents"),
                (",tier=\"cold\"", "cold-extents"),
            ],
        ),
        (
            "novacron_tier_bytes",
            "gauge",
            "Bytes used on each tier (hot: allocated; cold: records).",
            &[
                (",tier=\"hot\"", "hot-bytes-allocated"),
                (",tier=\"cold\"", "cold-bytes"),
            ],
        ),
        (
            "novacron_tier_moves_total",
            "counter",
            "Extent moves by outcome.",
            &[
                (",kind=\"demoted\"", "demoted"),
                (",kind=\"promoted\"", "promoted"),
                (",kind=\"failed\"", "moves-failed"),
            ],
        ),
        (
            "novacron_tier_cold_reads_total",
            "counter",
            "Reads served from the cold tier.",
            &[("", "cold-reads")],
        ),
        (
            "novacron_tier_corrupt_records_total",
            "counter",
            "Cold records found corrupt (those reads failed).",
            &[("", "corrupt-records")],
        ),
    ];
    for (name, kind, help, fields) in families {
        let rows = samples(
            disks,
            "device",
            |d| &d.0,
            |d| {
                fields
                    .iter()
                    .map(|(labels, key)| {
                        (
                            labels.to_string(),
                            d.1.get(*key)
                                .and_then(serde_json::Value::as_u64)
                                .unwrap_or(0),
                        )
                    })
                    .collect()
            },
        );
        family_of(&mut out, name, kind, help, &rows);
    }
    out
}

/// Renders the net device and switch families.
pub fn render_net(devices: &NetDevices, switches: &Switches) -> String {
    let mut out = String::new();
    let dev: Vec<(String, &NetSnapshot)> = devices
        .iter()
        .map(|(id, _, _, s)| (format!("device=\"{}\"", escape(id)), s))
        .collect();
    let sw: Vec<(String, &NetSnapshot)> = switches
        .iter()
        .map(|(name, _, _, s)| (format!("switch=\"{}\"", escape(name)), s))
        .collect();
    let gauge = |pick: &dyn Fn(&NetDevice) -> bool| {
        samples(
            devices,
            "device",
            |d| &d.0,
            |d| vec![(String::new(), u8::from(pick(d)))],
        )
    };
    family_of(
        &mut out,
        "novacron_net_connected",
        "gauge",
        "1 while a vhost-user front-end is connected.",
        &gauge(&|d| d.1),
    );
    family_of(
        &mut out,
        "novacron_net_link_up",
        "gauge",
        "1 while the device's link (tap) is up.",
        &gauge(&|d| d.2),
    );
    family_of(
        &mut out,
        "novacron_net_frames_total",
        "counter",
        "Frames sent (tx) and received (rx) by the guest.",
        &directional(&dev, ["tx", "rx"], |s| [s.tx_frames, s.rx_frames]),
    );
    family_of(
        &mut out,
        "novacron_net_bytes_total",
        "counter",
        "Frame bytes sent (tx) and received (rx) by the guest.",
        &directional(&dev, ["tx", "rx"], |s| [s.tx_bytes, s.rx_bytes]),
    );
    family_of(
        &mut out,
        "novacron_net_drops_total",
        "counter",
        "Frames dropped, by direction and reason.",
        &drops(&dev, ["tx", "rx"]),
    );
    family_of(
        &mut out,
        "novacron_net_rx_stalls_total",
        "counter",
        "Times receiving paused for lack of guest rx buffers.",
        &dev.iter()
            .map(|(l, s)| (l.clone(), s.rx_stalls.to_string()))
            .collect::<Vec<_>>(),
    );
    family_of(
        &mut out,
        "novacron_switch_ports",
        "gauge",
        "Ports attached.",
        &samples(switches, "switch", |s| &s.0, |s| vec![(String::new(), s.1)]),
    );
    family_of(
        &mut out,
        "novacron_switch_learnt_macs",
        "gauge",
        "MAC addresses learnt and not aged out.",
        &samples(switches, "switch", |s| &s.0, |s| vec![(String::new(), s.2)]),
    );
    family_of(
        &mut out,
        "novacron_switch_frames_total",
        "counter",
        "Frames entering the switch (in) and copies delivered (out).",
        &directional(&sw, ["in", "out"], |s| [s.tx_frames, s.rx_frames]),
    );
    family_of(
        &mut out,
        "novacron_switch_drops_total",
        "counter",
        "Frames the switch dropped (in) or could not deliver (out), by reason.",
        &drops(&sw, ["in", "out"]),
    );
    out
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;
    use crate::devices::blk::stats::QueueStats;
    use std::time::Duration;

    /// Asserts each family is announced once and all its samples (histograms: `_bucket`,
    /// `_sum`, `_count`) follow its announcement before the next family; returns the families.
    fn assert_families_contiguous(text: &str) -> std::collections::HashSet<String> {
        let mut current = String::new();
        let mut seen = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap().to_string();
                assert!(
                    seen.insert(current.clone()),
                    "family {current} declared twice"
                );
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix).filter(|f| *f == current))
                .unwrap_or(name);
            assert_eq!(
                family, current,
                "sample `{line}` outside its family's group"
            );
        }
        seen
    }

    #[test]
    fn renders_net_devices_and_switches_with_each_family_contiguous() {
        let stats = crate::devices::net::stats::NetStats::default();
        stats.sent(100);
        stats.received(60);
        stats.dropped(
            crate::devices::net::stats::Direction::Rx,
            crate::devices::net::stats::Drop::NoRxBuffers,
        );
        let text = render_net(
            &vec![("n0".into(), true, false, stats.snapshot())],
            &vec![("t7".into(), 3, 2, stats.snapshot())],
        );
        assert!(text.contains("novacron_net_connected{device=\"n0\"} 1"));
        assert!(text.contains("novacron_net_link_up{device=\"n0\"} 0"));
        assert!(text.contains("novacron_net_bytes_total{device=\"n0\",direction=\"tx\"} 100"));
        assert!(text.contains(
            "novacron_net_drops_total{device=\"n0\",direction=\"rx\",reason=\"no-rx-buffers\"} 1"
        ));
        assert!(text.contains("novacron_switch_ports{switch=\"t7\"} 3"));
        assert!(text.contains("novacron_switch_frames_total{switch=\"t7\",direction=\"out\"} 1"));
        assert_families_contiguous(&text);
    }

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let stats = QueueStats::default();
        stats.started();
        stats.completed(
            crate::devices::blk::stats::OpClass::Read,
            4096,
            true,
            Duration::from_micros(3),
        );
        stats.started();
        stats.completed(
            crate::devices::blk::stats::OpClass::Read,
            4096,
            true,
            Duration::from_micros(300),
        );
        let text = render(&vec![("vd\"a".to_string(), true, vec![stats.snapshot()])]);
        assert!(
            text.contains("novacron_blk_connected{device=\"vd\\\"a\"} 1"),
            "{text}"
        );
        assert!(text
            .contains("novacron_blk_requests_total{device=\"vd\\\"a\",queue=\"0\",op=\"read\"} 2"));
        assert!(text.contains("direction=\"read\"} 8192"));
        assert!(text.contains("le=\"0.000004\"} 1"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 2"));
        assert!(
            text.contains(
                "novacron_blk_request_latency_seconds_sum{device=\"vd\\\"a\",queue=\"0\"} 0.000303"
            ),
            "{text}"
        );
        assert!(text.contains(
            "novacron_blk_request_latency_seconds_count{device=\"vd\\\"a\",queue=\"0\"} 2"
        ));
    }

    #[test]
    fn each_family_is_one_contiguous_group() {
        let a = QueueStats::default();
        let b = QueueStats::default();
        let devices = vec![
            ("a".to_string(), true, vec![a.snapshot(), b.snapshot()]),
            ("b".to_string(), false, vec![a.snapshot()]),
        ];
        let text = render(&devices);
        let seen = assert_families_contiguous(&text);
        assert!(seen.contains("novacron_blk_ring_errors_total"));
        assert!(seen.contains("novacron_blk_request_latency_seconds"));
    }
}
