//! The limits one device obeys: its own and, if it joined one, its group's.
//!
//! Kept under a single mutex per device so a request costs one lock: the device's own buckets
//! are charged first, then the group's; a group refusal refunds the device, so a request that
//! must wait has cost nothing anywhere.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::Arc;
use std::time::Duration;

use super::config::QosConfig;
use super::group::SharedLimiter;
use super::limiter::{Cost, LimitError, Limiter};

/// A device's QoS state.
#[derive(Default)]
pub struct DeviceQos {
    limiter: Limiter,
    config: QosConfig,
    group: Option<Arc<SharedLimiter>>,
}

impl DeviceQos {
    /// Replaces the device's own limits (buckets start full at `now_ns`).
    pub fn set_limits(&mut self, config: &QosConfig, now_ns: u64) -> Result<(), LimitError> {
        self.limiter = config.limiter(now_ns)?;
        self.config = config.clone();
        Ok(())
    }

    /// Joins `group` (or none), leaving the previous group's turn queue.
    pub fn set_group(&mut self, group: Option<Arc<SharedLimiter>>, member: u64) {
        if let Some(old) = self.group.take() {
            old.leave(member);
        }
        self.group = group;
    }

    /// The device's own settings.
    pub fn config(&self) -> &QosConfig {
        &self.config
    }

    /// Whether anything limits this device.
    pub fn is_limited(&self) -> bool {
        !self.config.is_empty() || self.group.is_some()
    }

    /// Current tokens of the device's own buckets.
    pub fn tokens(&mut self, now_ns: u64) -> Vec<(String, i64)> {
        self.limiter.tokens(now_ns)
    }

    /// Gives back a charge made by [`DeviceQos::try_start`] for work that did not happen.
    pub fn refund(&mut self, cost: Cost) {
        self.refund_n(cost, 1);
    }

    /// [`DeviceQos::refund`] of a batch charged by [`DeviceQos::try_start_n`].
    pub fn refund_n(&mut self, cost: Cost, ops: u64) {
        self.limiter.refund_n(cost, ops);
        if let Some(group) = &self.group {
            group.refund_n(cost, ops);
        }
    }

    /// Charges `cost` as one operation to the device and its group whatever their levels
    /// (into debt if need be).
    pub fn charge_anyway(&mut self, cost: Cost, now_ns: u64) {
        self.limiter.charge_anyway(cost, 1, now_ns);
        if let Some(group) = &self.group {
            group.charge_anyway(cost, now_ns);
        }
    }

    /// Charges bytes known only afterwards to the device and its group (into debt if need be).
    pub fn charge_bytes(&mut self, cost: Cost, now_ns: u64) {
        self.limiter.charge_bytes(cost, now_ns);
        if let Some(group) = &self.group {
            group.charge_bytes(cost, now_ns);
        }
    }

    /// Charges `cost` to the device and its group, or neither; on refusal, how long to wait.
    pub fn try_start(&mut self, member: u64, cost: Cost, now_ns: u64) -> Result<(), Duration> {
        self.try_start_n(member, cost, 1, now_ns, false)
    }

    /// [`DeviceQos::try_start`] for a batch of `ops` operations (`cost.bytes` in all); a
    /// `probe` (a whole burst tried at once) leaves the group's turns as they were when
    /// refused ([`SharedLimiter::try_start_n`]).
    pub fn try_start_n(
        &mut self,
        member: u64,
        cost: Cost,
        ops: u64,
        now_ns: u64,
        probe: bool,
    ) -> Result<(), Duration> {
        self.limiter.try_start_n(cost, ops, now_ns)?;
        if let Some(group) = &self.group {
            if let Err(wait) = group.try_start_n(member, cost, ops, now_ns, probe) {
                self.limiter.refund_n(cost, ops);
                return Err(wait);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;
    use crate::config::options::OptionList;
    use crate::qos::limiter::CostKind;

    fn config(spec: &str) -> QosConfig {
        QosConfig::from_options(&mut OptionList::parse(spec).unwrap()).unwrap()
    }

    #[test]
    fn a_group_refusal_refunds_the_device() {
        let mut qos = DeviceQos::default();
        qos.set_limits(&config("iops=20"), 0).unwrap(); // room: 2
        let group = Arc::new(SharedLimiter::new(&config("iops=10"), 0).unwrap()); // room: 1
        qos.set_group(Some(group), 1);
        let cost = Cost {
            kind: CostKind::Read,
            bytes: 512,
        };
        assert!(qos.is_limited());
        assert!(qos.try_start(1, cost, 0).is_ok());
        assert!(qos.try_start(1, cost, 0).is_err(), "group is empty");
        assert_eq!(
            qos.tokens(0),
            vec![("iops".to_string(), 1)],
            "device token refunded"
        );
        qos.set_group(None, 1);
        assert!(
            qos.try_start(1, cost, 0).is_ok(),
            "own limit alone allows it"
        );
    }
}
