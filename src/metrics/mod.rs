//! Prometheus metrics at `GET /metrics` (`--metrics ADDR:PORT`).
//!
//! The numbers are the counters the data path already keeps (relaxed atomics owned by each
//! worker), read at scrape time through `prometheus-client`'s [`Collector`]: a scrape takes
//! the registry lock once to copy the typed stats structs the control plane also returns
//! ([`crate::registry::views::Snapshot`]), releases it, and encodes. Each stats type writes
//! its own families (`devices::blk::metrics`, `devices::net::metrics`, `qos::metrics`,
//! `storage::tier::metrics`) through the helpers in [`family`]; the text format is the
//! crate's (Prometheus text 0.0.4). Series, all labelled `device` (and `queue` where per
//! queue):
//!
//! - `novacron_blk_requests_total{op}`, `novacron_blk_bytes_total{direction}`,
//!   `novacron_blk_io_errors_total`, `novacron_blk_rejected_total{reason}`,
//!   `novacron_blk_in_flight`, `novacron_blk_request_latency_seconds` (histogram),
//!   `novacron_blk_throttled_total`, `novacron_blk_throttle_wait_seconds_total`,
//!   `novacron_blk_ring_errors_total`, `novacron_blk_resubmitted_total`, `novacron_blk_connected`;
//! - net devices (`device`) and switches (`switch`): `novacron_net_frames_total{direction}`,
//!   `novacron_net_bytes_total{direction}`, `novacron_net_drops_total{direction,reason}`,
//!   `novacron_net_rx_stalls_total`, `novacron_net_throttled_total{direction}`,
//!   `novacron_net_ring_errors_total`, `novacron_net_connected`, `novacron_net_link_up`,
//!   `novacron_switch_frames_total{direction}` (in = entering the switch, out = copies
//!   delivered), `novacron_switch_drops_total{direction,reason}`, `novacron_switch_ports`,
//!   `novacron_switch_learnt_macs`;
//! - tiering: `novacron_tier_extents{device,tier}`, `novacron_tier_bytes{device,tier}`,
//!   `novacron_tier_moves_total{device,kind}`, `novacron_tier_cold_reads_total`,
//!   `novacron_tier_corrupt_records_total`;
//! - `novacron_device_failed{device,kind}`: 1 for each recorded device that could not start
//!   (its backing missing or locked; see `device.list`, `device.retry`);
//! - `novacron_blk_flush_errors_total`: failed FLUSH requests (durability at risk);
//! - QoS: `novacron_qos_tokens{device,limit}`, `novacron_qos_group_tokens{group,limit}`,
//!   `novacron_qos_group_members{group}`, `novacron_qos_group_waits_total{group}` (held-back
//!   requests and frames are in the device families: `*_throttled_total`).
//!
//! - [`server`]: the HTTP endpoint.

pub mod family;
pub mod server;

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::lock::lock;
use crate::registry::views::Snapshot;
use crate::registry::Registry;

pub use server::{MetricsError, MetricsServer};

/// Encodes `snapshot`'s families.
pub fn encode(snapshot: &Snapshot, mut encoder: DescriptorEncoder) -> std::fmt::Result {
    crate::devices::blk::metrics::encode(&snapshot.blk, &mut encoder)?;
    crate::devices::net::metrics::encode_devices(&snapshot.net, &mut encoder)?;
    crate::devices::net::metrics::encode_switches(&snapshot.switches, &mut encoder)?;
    crate::qos::metrics::encode(&snapshot.qos, &snapshot.groups, &mut encoder)?;
    crate::storage::tier::metrics::encode(&snapshot.tiers, &mut encoder)?;
    family::gauge(
        &mut encoder,
        "novacron_device_failed",
        "Recorded devices that could not start (device.list says why; device.retry).",
        snapshot.failed.iter().map(|f| {
            (
                vec![("device", f.id.clone()), ("kind", f.kind.clone())],
                1u64,
            )
        }),
    )
}

/// Reads the registry on each scrape.
#[derive(Debug)]
pub struct RegistryCollector(Arc<Mutex<Registry>>);

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registry")
    }
}

impl Collector for RegistryCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
        // The lock is held only to copy the stats; encoding runs without it.
        let snapshot = lock(&self.0).snapshot();
        encode(&snapshot, encoder)
    }
}

/// A `prometheus-client` registry whose one collector reads `registry` on each scrape.
pub fn exposition(registry: Arc<Mutex<Registry>>) -> prometheus_client::registry::Registry {
    let mut exposition = prometheus_client::registry::Registry::default();
    exposition.register_collector(Box::new(RegistryCollector(registry)));
    exposition
}

/// The text of one scrape of `registry`.
pub fn render(registry: &prometheus_client::registry::Registry) -> String {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, registry) {
        log::error!("metrics: cannot encode: {e}");
    }
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::devices::blk::info::{BlkStats, BlkTotals};
    use crate::devices::blk::stats::{OpClass, QueueStats};
    use crate::devices::net::info::{NetStatsView, SwitchInfo};
    use crate::devices::net::stats::{Direction, Drop, NetStats};
    use std::time::Duration;

    #[derive(Debug)]
    struct Fixed(Snapshot);

    impl Collector for Fixed {
        fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
            super::encode(&self.0, encoder)
        }
    }

    fn text(snapshot: Snapshot) -> String {
        let mut exposition = prometheus_client::registry::Registry::default();
        exposition.register_collector(Box::new(Fixed(snapshot)));
        render(&exposition)
    }

    /// Every family is declared once and its samples follow its declaration.
    fn assert_families_contiguous(text: &str) -> std::collections::HashSet<String> {
        let mut current = String::new();
        let mut seen = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap().to_string();
                assert!(seen.insert(current.clone()), "family {current} twice");
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix).filter(|f| *f == current))
                .unwrap_or(name);
            assert_eq!(family, current, "sample `{line}` outside its family");
        }
        seen
    }

    fn blk(id: &str, queues: Vec<crate::devices::blk::stats::QueueSnapshot>) -> BlkStats {
        BlkStats {
            id: id.into(),
            connected: true,
            total: BlkTotals::of(&queues),
            queues,
        }
    }

    #[test]
    fn block_counters_and_a_cumulative_histogram() {
        let stats = QueueStats::default();
        for us in [3, 300] {
            stats.started();
            stats.completed(OpClass::Read, 4096, true, Duration::from_micros(us));
        }
        let text = text(Snapshot {
            blk: vec![blk("vd\"a", vec![stats.snapshot()])],
            ..Snapshot::default()
        });
        assert!(
            text.contains("novacron_blk_connected{device=\"vd\\\"a\"} 1"),
            "{text}"
        );
        assert!(text
            .contains("novacron_blk_requests_total{device=\"vd\\\"a\",queue=\"0\",op=\"read\"} 2"));
        assert!(text.contains("direction=\"read\"} 8192"));
        assert!(text.contains("le=\"4e-06\"} 1"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 2"), "{text}");
        assert!(text.contains(
            "novacron_blk_request_latency_seconds_sum{device=\"vd\\\"a\",queue=\"0\"} 0.000303"
        ));
        assert!(text.contains(
            "novacron_blk_request_latency_seconds_count{device=\"vd\\\"a\",queue=\"0\"} 2"
        ));
        let seen = assert_families_contiguous(&text);
        assert!(seen.contains("novacron_blk_ring_errors_total"));
        assert!(seen.contains("novacron_blk_request_latency_seconds"));
    }

    #[test]
    fn net_devices_and_switches_with_each_family_contiguous() {
        let stats = NetStats::default();
        stats.sent(100);
        stats.received(60);
        stats.dropped(Direction::Rx, Drop::NoRxBuffers);
        let snap = stats.snapshot();
        let text = text(Snapshot {
            blk: vec![blk("a", vec![QueueStats::default().snapshot(); 2])],
            net: vec![NetStatsView {
                id: "n0".into(),
                connected: true,
                link_up: false,
                drops: snap.total_drops(),
                total: snap.clone(),
            }],
            switches: vec![SwitchInfo {
                name: "t7".into(),
                ports: 3,
                learnt_macs: 2,
                uplink: None,
                persistent: false,
                stats: snap,
            }],
            ..Snapshot::default()
        });
        assert!(
            text.contains("novacron_net_connected{device=\"n0\"} 1"),
            "{text}"
        );
        assert!(text.contains("novacron_net_link_up{device=\"n0\"} 0"));
        assert!(text.contains("novacron_net_bytes_total{device=\"n0\",direction=\"tx\"} 100"));
        assert!(text.contains(
            "novacron_net_drops_total{device=\"n0\",direction=\"rx\",reason=\"no-rx-buffers\"} 1"
        ));
        assert!(text.contains("novacron_switch_ports{switch=\"t7\"} 3"));
        assert!(text.contains("novacron_switch_frames_total{switch=\"t7\",direction=\"out\"} 1"));
        assert_families_contiguous(&text);
    }
}
