//! The block device's Prometheus families, encoded from [`BlkStats`] (the same struct
//! `device.stats` returns) on each scrape.

use std::fmt;

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use super::info::BlkStats;
use super::stats::QueueSnapshot;
use crate::metrics::family::{counter, gauge, with, Labels};

/// `(device, queue)` labels and the queue's counters, for every queue of every device.
fn queues(devices: &[BlkStats]) -> impl Iterator<Item = (Labels, &QueueSnapshot)> {
    devices.iter().flat_map(|d| {
        d.queues.iter().enumerate().map(move |(q, snap)| {
            (
                vec![("device", d.id.clone()), ("queue", q.to_string())],
                snap,
            )
        })
    })
}

/// Writes every block family.
pub fn encode(devices: &[BlkStats], encoder: &mut DescriptorEncoder) -> fmt::Result {
    gauge(
        encoder,
        "novacron_blk_connected",
        "1 while a vhost-user front-end is connected.",
        devices
            .iter()
            .map(|d| (vec![("device", d.id.clone())], u64::from(d.connected))),
    )?;
    counter(
        encoder,
        "novacron_blk_requests",
        "Completed requests by type.",
        queues(devices).flat_map(|(labels, s)| {
            s.requests
                .iter()
                .map(move |(op, n)| (with(labels.clone(), "op", op), *n))
        }),
    )?;
    counter(
        encoder,
        "novacron_blk_bytes",
        "Bytes transferred by the guest.",
        queues(devices).flat_map(|(labels, s)| {
            [
                (with(labels.clone(), "direction", "read"), s.bytes_read),
                (with(labels, "direction", "write"), s.bytes_written),
            ]
        }),
    )?;
    counter(
        encoder,
        "novacron_blk_io_errors",
        "Requests failed by the backing (guest saw IOERR).",
        queues(devices).map(|(l, s)| (l, s.io_errors)),
    )?;
    counter(
        encoder,
        "novacron_blk_flush_errors",
        "FLUSH requests that failed: writes acknowledged before them may not be durable.",
        queues(devices).map(|(l, s)| (l, s.flush_errors)),
    )?;
    gauge(
        encoder,
        "novacron_blk_in_flight",
        "Requests submitted and not yet completed.",
        queues(devices).map(|(l, s)| (l, s.in_flight)),
    )?;
    counter(
        encoder,
        "novacron_blk_throttled",
        "Requests held back by QoS.",
        queues(devices).map(|(l, s)| (l, s.throttled)),
    )?;
    counter(
        encoder,
        "novacron_blk_throttle_wait_seconds",
        "Time requests spent held back by QoS.",
        queues(devices).map(|(l, s)| (l, s.throttle_wait_ns as f64 / 1e9)),
    )?;
    counter(
        encoder,
        "novacron_blk_rejected",
        "Requests refused by validation, by reason.",
        queues(devices).flat_map(|(labels, s)| {
            s.rejected
                .iter()
                .map(move |(reason, n)| (with(labels.clone(), "reason", reason), *n))
        }),
    )?;
    counter(
        encoder,
        "novacron_blk_ring_errors",
        "Kicks that found a broken available ring (corrupt index, head published twice).",
        queues(devices).map(|(l, s)| (l, s.ring_errors)),
    )?;
    counter(
        encoder,
        "novacron_blk_resubmitted",
        "Requests a previous daemon left in flight, resubmitted after its restart (inflight tracking).",
        queues(devices).map(|(l, s)| (l, s.resubmitted)),
    )?;
    let mut latency = encoder.encode_descriptor(
        "novacron_blk_request_latency_seconds",
        "Request latency from submission to completion.",
        None,
        MetricType::Histogram,
    )?;
    for (labels, s) in queues(devices) {
        let buckets: Vec<(f64, u64)> = s
            .latency_us
            .iter()
            .map(|(bound_us, n)| {
                let bound = if *bound_us == u64::MAX {
                    f64::INFINITY
                } else {
                    *bound_us as f64 / 1e6
                };
                (bound, *n)
            })
            .collect();
        let count = s
            .latency_us
            .iter()
            .map(|(_, n)| *n)
            .fold(0u64, u64::saturating_add);
        latency
            .encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(
                s.latency_ns_total as f64 / 1e9,
                count,
                &buckets,
                None,
            )?;
    }
    Ok(())
}
