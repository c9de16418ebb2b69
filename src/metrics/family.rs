//! The few shapes every family takes, over `prometheus-client`'s encoder: a counter or gauge
//! family with one sample per label set. Each stats type writes its own families with these
//! (see `devices::blk::metrics` and its siblings); the text format is the crate's.

use std::fmt;

use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, NoLabelSet,
};
use prometheus_client::metrics::MetricType;

/// One sample's labels, in order.
pub type Labels = Vec<(&'static str, String)>;

/// A counter family (the encoder appends `_total` to `name`).
pub fn counter<V: EncodeCounterValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in rows {
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, V, u64>(&value, None)?;
    }
    Ok(())
}

/// A gauge family.
pub fn gauge<V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// `labels` with one more label.
pub fn with(mut labels: Labels, key: &'static str, value: impl ToString) -> Labels {
    labels.push((key, value.to_string()));
    labels
}
