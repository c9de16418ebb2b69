//! QoS settings of a device as options (`iops=5000,bps=100M,iops-burst=20000,...`), shared by
//! `--blk`, `device.add` and `qos.set`, and their conversion to a live [`Limiter`].
//!
//! Keys: for disks `iops`, `read-iops`, `write-iops` (operations/s) and `bps`, `read-bps`,
//! `write-bps` (bytes/s, size suffixes allowed); for NICs `tx-pps`, `rx-pps` (frames/s) and
//! `tx-bps`, `rx-bps` (bytes/s); each with `<key>-burst` (peak rate) and
//! `<key>-burst-seconds` (how long the peak may last). Groups take any of them. Settings are kept apart from the live
//! buckets: a change builds a new limiter from the settings and swaps it in.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use crate::config::options::{OptionError, OptionList};

use super::limiter::{Direction, LimitError, Limiter, Rate, Unit};

/// Every limit, by option key, unit and direction: six for disks, four for NICs (`tx` is what
/// the guest sends, `rx` what it receives).
pub const LIMITS: [(&str, Unit, Direction); 10] = [
    ("iops", Unit::Operations, Direction::Any),
    ("read-iops", Unit::Operations, Direction::Read),
    ("write-iops", Unit::Operations, Direction::Write),
    ("bps", Unit::Bytes, Direction::Any),
    ("read-bps", Unit::Bytes, Direction::Read),
    ("write-bps", Unit::Bytes, Direction::Write),
    ("tx-pps", Unit::Operations, Direction::Tx),
    ("tx-bps", Unit::Bytes, Direction::Tx),
    ("rx-pps", Unit::Operations, Direction::Rx),
    ("rx-bps", Unit::Bytes, Direction::Rx),
];

/// Which limits a configuration may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// A disk: IOPS and bytes/s.
    Blk,
    /// A NIC: packets/s and bytes/s per direction.
    Net,
    /// A group: any of them (each applies to the members it concerns).
    Any,
}

impl Family {
    fn has(self, direction: Direction) -> bool {
        match self {
            Family::Any => true,
            Family::Blk => matches!(
                direction,
                Direction::Any | Direction::Read | Direction::Write
            ),
            Family::Net => matches!(direction, Direction::Tx | Direction::Rx),
        }
    }
}

/// The option naming the QoS group a device belongs to.
pub const GROUP_KEY: &str = "qos-group";

/// Errors in QoS options.
#[derive(Debug, thiserror::Error)]
pub enum QosConfigError {
    /// An option did not parse.
    #[error(transparent)]
    Option(#[from] OptionError),
    /// A limit is inconsistent.
    #[error(transparent)]
    Limit(#[from] LimitError),
}

/// Configured limits, by key (`iops`, `write-bps`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct QosConfig {
    /// `(key, rate)` for every configured limit, in [`LIMITS`] order.
    pub limits: Vec<(&'static str, Rate)>,
}

impl QosConfig {
    /// Takes the disk QoS keys out of `options` and validates them.
    pub fn from_options(options: &mut OptionList) -> Result<Self, QosConfigError> {
        Self::from_options_for(options, Family::Blk)
    }

    /// Takes the QoS keys of `family` out of `options` and validates them; other families'
    /// keys stay in `options` (and are then refused as unknown by the caller).
    pub fn from_options_for(
        options: &mut OptionList,
        family: Family,
    ) -> Result<Self, QosConfigError> {
        let mut limits = Vec::new();
        for (key, unit, direction) in LIMITS {
            if !family.has(direction) {
                continue;
            }
            let take = |options: &mut OptionList, key: &str| match unit {
                Unit::Operations => options.take::<u64>(key),
                Unit::Bytes => options.take_size(key),
            };
            let per_second = take(options, key)?;
            let burst = take(options, &format!("{key}-burst"))?;
            let burst_seconds = options.take::<u64>(&format!("{key}-burst-seconds"))?;
            match per_second {
                Some(per_second) => limits.push((
                    key,
                    Rate {
                        per_second,
                        burst,
                        burst_seconds,
                    },
                )),
                None if burst.is_some() || burst_seconds.is_some() => {
                    return Err(OptionError::Missing(key).into())
                }
                None => {}
            }
        }
        let config = Self { limits };
        config.limiter(0)?;
        Ok(config)
    }

    /// Whether no limit is set.
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// A live limiter for these settings, with full buckets at `now_ns`.
    pub fn limiter(&self, now_ns: u64) -> Result<Limiter, LimitError> {
        let mut limiter = Limiter::unlimited();
        for (key, rate) in &self.limits {
            if let Some((name, unit, direction)) = LIMITS.iter().find(|(k, _, _)| k == key) {
                limiter.add(name, *unit, *direction, *rate, now_ns)?;
            }
        }
        Ok(limiter)
    }

    /// Whether `key` is one of the QoS option keys (a limit, its burst settings, the group).
    pub fn is_qos_key(key: &str) -> bool {
        key == GROUP_KEY
            || LIMITS.iter().any(|(k, _, _)| {
                key == *k
                    || key.strip_prefix(k) == Some("-burst")
                    || key.strip_prefix(k) == Some("-burst-seconds")
            })
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;

    fn parse(spec: &str) -> Result<QosConfig, QosConfigError> {
        let mut options = OptionList::parse(spec).unwrap();
        let config = QosConfig::from_options(&mut options)?;
        options.finish().unwrap();
        Ok(config)
    }

    #[test]
    fn parses_rates_sizes_and_bursts() {
        let c = parse("iops=5000,iops-burst=20000,iops-burst-seconds=10,write-bps=100M").unwrap();
        assert_eq!(c.limits.len(), 2);
        assert_eq!(c.limits[0].0, "iops");
        assert_eq!(c.limits[0].1.burst, Some(20000));
        assert_eq!(
            c.limits[1],
            (
                "write-bps",
                Rate {
                    per_second: 100 << 20,
                    burst: None,
                    burst_seconds: None
                }
            )
        );
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn bad_settings_are_refused() {
        for spec in [
            "iops=0",
            "iops=-1",
            "iops=10,iops-burst=5",
            "iops-burst=5",
            "bps=1X",
            "iops=99999999999999999999",
        ] {
            assert!(parse(spec).is_err(), "accepted {spec}");
        }
        assert!(QosConfig::is_qos_key("read-bps-burst-seconds"));
        assert!(!QosConfig::is_qos_key("queues"));
    }
}
