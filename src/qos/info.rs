//! QoS state as typed structs: a device's limits and how much they held it back, a group's
//! limits and members. `qos.get`/`qos.group.list` serialize them; `/metrics` encodes them.

use std::collections::BTreeMap;

use serde::Serialize;

use super::limiter::Rate;

/// A device's rate limits and how much they held it back.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct QosInfo {
    /// Device id.
    pub id: String,
    /// QoS group, if any.
    pub group: Option<String>,
    /// Configured limits by key.
    pub limits: BTreeMap<&'static str, Rate>,
    /// Current tokens by limit (negative: debt).
    pub tokens: BTreeMap<String, i64>,
    /// Requests or frames held back.
    pub throttled: u64,
    /// Time spent held back.
    pub throttle_wait_ns: u64,
}

/// A QoS group.
#[derive(Debug, Clone, Serialize)]
pub struct GroupInfo {
    /// Group name.
    pub name: String,
    /// Configured limits by key.
    pub limits: BTreeMap<&'static str, Rate>,
    /// Member devices.
    pub members: Vec<String>,
    /// Current tokens by limit.
    pub tokens: BTreeMap<String, i64>,
    /// Times a member had to wait for the group's tokens.
    pub waits: u64,
}
