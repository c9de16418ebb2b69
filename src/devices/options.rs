//! The options every device kind takes, parsed once: `socket`, `id` (derived from the socket
//! when absent), `queues`, `queue-size`, `poll` (`adaptive`, `busy`, `off`), `poll-us` (the
//! largest adaptive window), `poll-budget` (percent of a core), `mem-max` (most guest memory a
//! front-end may have the daemon map, 1 TiB by default) and `qos-group`. Each kind's config parser
//! takes these first, then its own keys, then finishes the list (unknown keys refused).

use std::path::PathBuf;

use crate::config::id;
use crate::config::options::{OptionError, OptionList};
use crate::qos::config::GROUP_KEY;

use super::poll::{PollConfig, PollMode};

/// Largest virtqueue size a front-end may ask for (virtio's limit for split rings).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Default busy-poll window after a ring runs dry, in microseconds.
pub const DEFAULT_POLL_US: u32 = 32;
/// Longest busy-poll window one may configure (a poll spell is capped anyway).
pub const MAX_POLL_US: u32 = 1000;
/// Default `mem-max`, the most guest memory one front-end may have mapped
/// (`shell::memory_cap`): larger than any guest such a host runs.
pub const DEFAULT_MEMORY_MAX: u64 = 1 << 40;
/// Guest memory all front-ends together may have mapped: three quarters of x86-64's 128 TiB
/// user address space, the rest left to the daemon's own mappings.
pub const MEMORY_BUDGET: u64 = 96 << 40;

/// Errors in the common options.
#[derive(Debug, thiserror::Error)]
pub enum CommonError {
    /// The `key=value` list itself was wrong.
    #[error(transparent)]
    Options(#[from] OptionError),
    /// A value parsed but is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// What a device kind allows for its queues.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Most queues (block) or queue pairs (net) one may ask for.
    pub max_queues: u16,
}

/// The options every device kind has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommonOptions {
    /// Device id (from `id=`, or the socket's file stem).
    pub id: String,
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// Queues (block) or queue pairs (net); 1 by default.
    pub queues: u16,
    /// Largest virtqueue size; 256 by default.
    pub queue_size: u16,
    /// Largest adaptive poll window in microseconds.
    pub poll_us: u32,
    /// How the queues poll.
    pub poll_mode: PollMode,
    /// Most of each second a queue may poll without finding work, in percent.
    pub poll_budget: u8,
    /// The QoS group the device joins, if any.
    pub qos_group: Option<String>,
    /// Most guest memory a front-end may have mapped, in bytes (`mem-max`).
    pub memory_max: u64,
}

impl CommonOptions {
    /// Takes the common keys out of `options` and checks them.
    pub fn take(options: &mut OptionList, limits: QueueLimits) -> Result<Self, CommonError> {
        let socket = PathBuf::from(
            options
                .take_str("socket")
                .ok_or(OptionError::Missing("socket"))?,
        );
        let id = match options.take_str("id") {
            Some(id) => id,
            None => id::from_socket(&socket).map_err(CommonError::Invalid)?,
        };
        id::validate(&id).map_err(CommonError::Invalid)?;
        let queues = options.take::<u16>("queues")?.unwrap_or(1);
        let queue_size = options.take::<u16>("queue-size")?.unwrap_or(256);
        let poll_us = options.take::<u32>("poll-us")?.unwrap_or(DEFAULT_POLL_US);
        let poll_mode = match options.take_str("poll").as_deref() {
            None | Some("adaptive") => PollMode::Adaptive,
            Some("busy") => PollMode::Busy,
            Some("off") => PollMode::Off,
            Some(other) => {
                return Err(CommonError::Invalid(format!(
                    "poll `{other}` unknown: expected adaptive, busy or off"
                )))
            }
        };
        let poll_budget = options.take::<u8>("poll-budget")?.unwrap_or(100);
        if !(1..=100).contains(&poll_budget) {
            return Err(CommonError::Invalid(
                "poll-budget must be 1..=100 (percent)".into(),
            ));
        }
        let qos_group = options.take_str(GROUP_KEY);
        let memory_max = options.take_size("mem-max")?.unwrap_or(DEFAULT_MEMORY_MAX);
        if !(1 << 20..=MEMORY_BUDGET).contains(&memory_max) {
            return Err(CommonError::Invalid(format!(
                "mem-max must be 1M..={MEMORY_BUDGET} bytes (the daemon's guest-memory budget)"
            )));
        }
        let max_queues = limits.max_queues;
        if queues == 0 || queues > max_queues {
            return Err(CommonError::Invalid(format!(
                "queues must be 1..={max_queues}"
            )));
        }
        if queue_size < 2 || !queue_size.is_power_of_two() || queue_size > MAX_QUEUE_SIZE {
            return Err(CommonError::Invalid(format!(
                "queue-size must be a power of two in 2..={MAX_QUEUE_SIZE}"
            )));
        }
        if poll_us > MAX_POLL_US {
            return Err(CommonError::Invalid(format!(
                "poll-us must be 0..={MAX_POLL_US}"
            )));
        }
        Ok(Self {
            id,
            socket,
            queues,
            queue_size,
            poll_us,
            poll_mode,
            poll_budget,
            qos_group,
            memory_max,
        })
    }

    /// The polling settings these options describe.
    pub fn poll_config(&self) -> PollConfig {
        PollConfig {
            mode: self.poll_mode,
            max: std::time::Duration::from_micros(u64::from(self.poll_us)),
            budget_percent: self.poll_budget,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    const LIMITS: QueueLimits = QueueLimits { max_queues: 4 };

    fn take(spec: &str) -> Result<CommonOptions, CommonError> {
        let mut options = OptionList::parse(spec).unwrap();
        CommonOptions::take(&mut options, LIMITS)
    }

    #[test]
    fn defaults_and_derived_id() {
        let c = take("socket=/run/x/vm1-disk.sock").unwrap();
        assert_eq!(c.id, "vm1-disk");
        assert_eq!(
            (c.queues, c.queue_size, c.poll_us),
            (1, 256, DEFAULT_POLL_US)
        );
        assert_eq!(c.qos_group, None);
    }

    #[test]
    fn every_bad_value_names_its_key() {
        for (spec, key) in [
            ("id=a", "socket"),
            ("socket=/s,queues=0", "queues"),
            ("socket=/s,queues=5", "queues"),
            ("socket=/s,queue-size=3", "queue-size"),
            ("socket=/s,queue-size=65536", "queue-size"),
            ("socket=/s,poll-us=1001", "poll-us"),
            ("socket=/s,poll=always", "poll"),
            ("socket=/s,poll-budget=0", "poll-budget"),
            ("socket=/s,poll-budget=101", "poll-budget"),
            ("socket=/s,mem-max=0", "mem-max"),
            ("socket=/s,mem-max=97T", "mem-max"),
            ("socket=/s,id=a/b", "id"),
        ] {
            let e = take(spec).unwrap_err().to_string();
            assert!(e.contains(key), "{spec}: {e}");
        }
    }
}
