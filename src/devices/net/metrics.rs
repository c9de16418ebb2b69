//! The net device's and the switch's Prometheus families, encoded from [`NetStatsView`] and
//! [`SwitchInfo`] (the structs `device.stats` and `switch.list` return) on each scrape.

use std::fmt;

use prometheus_client::encoding::DescriptorEncoder;

use super::info::{NetStatsView, SwitchInfo};
use super::stats::NetSnapshot;
use crate::metrics::family::{counter, gauge, with, Labels};

/// Per-direction samples of `value` (`[tx-side, rx-side]`) under direction names `names`.
fn directional<'a>(
    rows: impl Iterator<Item = (Labels, &'a NetSnapshot)> + 'a,
    names: [&'static str; 2],
    value: impl Fn(&NetSnapshot) -> [u64; 2] + 'a,
) -> impl Iterator<Item = (Labels, u64)> + 'a {
    rows.flat_map(move |(labels, snap)| {
        names
            .into_iter()
            .zip(value(snap))
            .map(move |(dir, v)| (with(labels.clone(), "direction", dir), v))
            .collect::<Vec<_>>()
    })
}

/// Drops by direction and reason.
fn drops<'a>(
    rows: impl Iterator<Item = (Labels, &'a NetSnapshot)> + 'a,
    names: [&'static str; 2],
) -> impl Iterator<Item = (Labels, u64)> + 'a {
    rows.flat_map(move |(labels, snap)| {
        let [tx, rx] = names;
        let sides = [(tx, &snap.tx_drops), (rx, &snap.rx_drops)];
        sides
            .into_iter()
            .flat_map(|(dir, list)| {
                let labels = with(labels.clone(), "direction", dir);
                list.iter()
                    .map(move |(reason, n)| (with(labels.clone(), "reason", reason), *n))
            })
            .collect::<Vec<_>>()
    })
}

/// Writes the net device families.
pub fn encode_devices(devices: &[NetStatsView], encoder: &mut DescriptorEncoder) -> fmt::Result {
    let rows = || {
        devices
            .iter()
            .map(|d| (vec![("device", d.id.clone())], &d.total))
    };
    gauge(
        encoder,
        "novacron_net_connected",
        "1 while a vhost-user front-end is connected.",
        devices
            .iter()
            .map(|d| (vec![("device", d.id.clone())], u64::from(d.connected))),
    )?;
    gauge(
        encoder,
        "novacron_net_link_up",
        "1 while the device's link (tap) is up.",
        devices
            .iter()
            .map(|d| (vec![("device", d.id.clone())], u64::from(d.link_up))),
    )?;
    counter(
        encoder,
        "novacron_net_frames",
        "Frames sent (tx) and received (rx) by the guest.",
        directional(rows(), ["tx", "rx"], |s| [s.tx_frames, s.rx_frames]),
    )?;
    counter(
        encoder,
        "novacron_net_bytes",
        "Frame bytes sent (tx) and received (rx) by the guest.",
        directional(rows(), ["tx", "rx"], |s| [s.tx_bytes, s.rx_bytes]),
    )?;
    counter(
        encoder,
        "novacron_net_drops",
        "Frames dropped, by direction and reason.",
        drops(rows(), ["tx", "rx"]),
    )?;
    counter(
        encoder,
        "novacron_net_rx_stalls",
        "Times receiving paused for lack of guest rx buffers.",
        rows().map(|(l, s)| (l, s.rx_stalls)),
    )?;
    counter(
        encoder,
        "novacron_net_throttled",
        "Frames held back by QoS, by direction.",
        directional(rows(), ["tx", "rx"], |s| [s.tx_throttled, s.rx_throttled]),
    )?;
    counter(
        encoder,
        "novacron_net_ring_errors",
        "Kicks that found a broken available ring.",
        rows().map(|(l, s)| (l, s.ring_errors)),
    )
}

/// Writes the switch families.
pub fn encode_switches(switches: &[SwitchInfo], encoder: &mut DescriptorEncoder) -> fmt::Result {
    let rows = || {
        switches
            .iter()
            .map(|s| (vec![("switch", s.name.clone())], &s.stats))
    };
    gauge(
        encoder,
        "novacron_switch_ports",
        "Ports attached.",
        switches
            .iter()
            .map(|s| (vec![("switch", s.name.clone())], s.ports)),
    )?;
    gauge(
        encoder,
        "novacron_switch_learnt_macs",
        "MAC addresses learnt and not aged out.",
        switches
            .iter()
            .map(|s| (vec![("switch", s.name.clone())], s.learnt_macs)),
    )?;
    counter(
        encoder,
        "novacron_switch_frames",
        "Frames entering the switch (in) and copies delivered (out).",
        directional(rows(), ["in", "out"], |s| [s.tx_frames, s.rx_frames]),
    )?;
    counter(
        encoder,
        "novacron_switch_drops",
        "Frames the switch dropped (in) or could not deliver (out), by reason.",
        drops(rows(), ["in", "out"]),
    )
}
