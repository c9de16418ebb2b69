//! QoS Prometheus families, encoded from [`QosInfo`] and [`GroupInfo`] (the structs `qos.get`
//! and `qos.group.list` return). Held-back requests and frames are counted in the device
//! families (`novacron_blk_throttled_total`, `novacron_net_throttled_total`).

use std::fmt;

use prometheus_client::encoding::DescriptorEncoder;

use super::info::{GroupInfo, QosInfo};
use crate::metrics::family::{counter, gauge};

/// Writes the QoS families.
pub fn encode(
    devices: &[QosInfo],
    groups: &[GroupInfo],
    encoder: &mut DescriptorEncoder,
) -> fmt::Result {
    gauge(
        encoder,
        "novacron_qos_tokens",
        "Tokens in a device's own buckets (negative: debt).",
        devices.iter().flat_map(|d| {
            d.tokens
                .iter()
                .map(|(limit, n)| (vec![("device", d.id.clone()), ("limit", limit.clone())], *n))
        }),
    )?;
    gauge(
        encoder,
        "novacron_qos_group_tokens",
        "Tokens in a group's buckets (negative: debt).",
        groups.iter().flat_map(|g| {
            g.tokens.iter().map(|(limit, n)| {
                (
                    vec![("group", g.name.clone()), ("limit", limit.clone())],
                    *n,
                )
            })
        }),
    )?;
    gauge(
        encoder,
        "novacron_qos_group_members",
        "Devices in the group.",
        groups
            .iter()
            .map(|g| (vec![("group", g.name.clone())], g.members.len())),
    )?;
    counter(
        encoder,
        "novacron_qos_group_waits",
        "Times a member had to wait for the group's tokens.",
        groups
            .iter()
            .map(|g| (vec![("group", g.name.clone())], g.waits)),
    )
}
