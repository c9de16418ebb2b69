//! The configuration of one virtio-net device, parsed from a `--net key=value,...` list.
//!
//! Keys: `socket` (required), exactly one of `tap=NAME` or `switch=NAME`, `mac` (default: a
//! locally administered address derived from the id), `id`, `queues` (queue pairs, 1..=16),
//! `queue-size` (power of two, default 256), `mtu` (68..=65535, default 1500), `vlan` (access
//! VLAN 1..=4094 on a switch port), `poll-us` (0..=1000, default 32: how long a tx worker
//! polls after its ring runs dry). Everything is checked before any socket or tap is touched.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::path::PathBuf;

use crate::config::id;
use crate::config::options::{OptionError, OptionList};
use crate::devices::net::switch::Mac;
use crate::devices::options::{CommonError, CommonOptions, QueueLimits};
use crate::qos::config::{Family, QosConfig};

/// Most queue pairs one device offers; each pair gets its own worker thread.
pub const MAX_QUEUE_PAIRS: u16 = 16;
pub use crate::devices::options::MAX_QUEUE_SIZE;
/// Smallest MTU (IPv4's minimum).
pub const MIN_MTU: u16 = 68;

/// Errors in a net device specification.
#[derive(Debug, thiserror::Error)]
pub enum NetConfigError {
    /// The `key=value` list itself was wrong.
    #[error(transparent)]
    Options(#[from] OptionError),
    /// A common option (socket, id, queues, ...) was wrong.
    #[error(transparent)]
    Common(#[from] CommonError),
    /// A value parsed but is out of range or inconsistent with another.
    #[error("{0}")]
    Invalid(String),
}

/// Where the device's frames go.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetBackendSpec {
    /// A host tap device, opened by name (created if missing).
    Tap(String),
    /// A port of the named in-daemon L2 switch (created on demand).
    Switch(String),
}

/// A validated virtio-net device configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Name used in logs, stats and the control plane.
    pub id: String,
    /// The vhost-user socket the daemon listens on.
    pub socket: PathBuf,
    /// Tap or switch.
    pub backend: NetBackendSpec,
    /// The guest's MAC: in the config space, and the only source a switch port accepts.
    pub mac: Mac,
    /// Queue pairs offered (`VIRTIO_NET_F_MQ`).
    pub queue_pairs: u16,
    /// Largest queue size the front-end may configure.
    pub queue_size: u16,
    /// MTU offered to the guest (`VIRTIO_NET_F_MTU`); frames above it are dropped.
    pub mtu: u16,
    /// Access VLAN of a switch port.
    pub vlan: Option<u16>,
    /// The destination of a live migration (`incoming=on`): a switch port may share its MAC
    /// with the source's port while both exist (`fabric::SwitchHub::attach`).
    pub incoming: bool,
    /// Rate limits (`tx-pps`, `tx-bps`, `rx-pps`, `rx-bps`, with bursts).
    pub qos: QosConfig,
    /// The QoS group whose limits also apply (`qos-group=NAME`).
    pub qos_group: Option<String>,
    /// How the queues poll (`poll=`, `poll-us=`, `poll-budget=`).
    pub poll: crate::devices::poll::PollConfig,
    /// Most guest memory a front-end may have mapped (`mem-max=`).
    pub memory_max: u64,
}

impl NetConfig {
    /// Parses a `--net` specification.
    pub fn parse(spec: &str) -> Result<Self, NetConfigError> {
        Self::from_options(OptionList::parse(spec)?)
    }

    /// Builds a configuration from an option list, consuming every key.
    pub fn from_options(mut options: OptionList) -> Result<Self, NetConfigError> {
        let common = CommonOptions::take(
            &mut options,
            QueueLimits {
                max_queues: MAX_QUEUE_PAIRS,
            },
        )?;
        let poll = common.poll_config();
        let CommonOptions {
            id,
            socket,
            queues: queue_pairs,
            queue_size,
            qos_group,
            memory_max,
            ..
        } = common;
        let backend = match (options.take_str("tap"), options.take_str("switch")) {
            (Some(tap), None) => {
                if tap.is_empty() || tap.len() >= libc::IFNAMSIZ || tap.contains('/') {
                    return Err(invalid(format!(
                        "tap name `{tap}` must be 1..{} bytes without `/`",
                        libc::IFNAMSIZ
                    )));
                }
                NetBackendSpec::Tap(tap)
            }
            (None, Some(switch)) => {
                id::validate(&switch).map_err(NetConfigError::Invalid)?;
                NetBackendSpec::Switch(switch)
            }
            _ => return Err(invalid("give exactly one of tap=NAME or switch=NAME")),
        };
        let mac = match options.take_str("mac") {
            Some(text) => parse_mac(&text)?,
            None => derived_mac(&id),
        };
        let mtu = options.take::<u16>("mtu")?.unwrap_or(1500);
        let vlan = options.take::<u16>("vlan")?;
        let incoming = options.take_bool("incoming")?.unwrap_or(false);
        let qos = QosConfig::from_options_for(&mut options, Family::Net)
            .map_err(|e| invalid(e.to_string()))?;
        options.finish()?;
        if mtu < MIN_MTU {
            return Err(invalid(format!("mtu must be {MIN_MTU}..=65535")));
        }
        if let Some(vlan) = vlan {
            if !(1..=4094).contains(&vlan) {
                return Err(invalid("vlan must be 1..=4094"));
            }
            if !matches!(backend, NetBackendSpec::Switch(_)) {
                return Err(invalid("vlan= applies to switch ports only"));
            }
        }
        Ok(Self {
            id,
            socket,
            backend,
            mac,
            queue_pairs,
            queue_size,
            mtu,
            vlan,
            incoming,
            qos,
            qos_group,
            poll,
            memory_max,
        })
    }
}

fn invalid(message: impl Into<String>) -> NetConfigError {
    NetConfigError::Invalid(message.into())
}

/// Parses `52:54:00:12:34:56`; refuses multicast addresses (a NIC cannot own one).
pub fn parse_mac(text: &str) -> Result<Mac, NetConfigError> {
    let bad = || {
        invalid(format!(
            "mac `{text}` is not six hex bytes like 52:54:00:12:34:56"
        ))
    };
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 == 1 {
        return Err(invalid(format!("mac `{text}` is a multicast address")));
    }
    Ok(mac)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A stable, locally administered unicast MAC from the id (FNV-1a of the id).
fn derived_mac(id: &str) -> Mac {
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let b = hash.to_le_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn a_tap_device_with_defaults() {
        let config = NetConfig::parse("socket=/run/nc/vm1-nic0.sock,tap=vm1nic0").unwrap();
        assert_eq!(config.id, "vm1-nic0");
        assert_eq!(config.backend, NetBackendSpec::Tap("vm1nic0".into()));
        assert_eq!(
            (config.queue_pairs, config.queue_size, config.mtu),
            (1, 256, 1500)
        );
        assert_eq!(config.mac[0], 0x02, "locally administered, unicast");
        assert_eq!(
            config.mac,
            NetConfig::parse("socket=/x/vm1-nic0.sock,tap=t")
                .unwrap()
                .mac
        );
    }

    #[test]
    fn a_switch_port_with_every_option() {
        let config = NetConfig::parse(
            "socket=/s.sock,switch=tenant7,mac=52:54:00:12:34:57,id=n1,queues=2,\
             queue-size=1024,mtu=9000,vlan=12",
        )
        .unwrap();
        assert_eq!(config.backend, NetBackendSpec::Switch("tenant7".into()));
        assert_eq!(config.mac, [0x52, 0x54, 0, 0x12, 0x34, 0x57]);
        assert_eq!(format_mac(&config.mac), "52:54:00:12:34:57");
        assert_eq!(
            (config.queue_pairs, config.mtu, config.vlan),
            (2, 9000, Some(12))
        );
    }

    #[test]
    fn bad_values_are_refused() {
        for spec in [
            "tap=t0",
            "socket=/s.sock",
            "socket=/s.sock,tap=t0,switch=s0",
            "socket=/s.sock,tap=",
            "socket=/s.sock,tap=a-name-too-long-for-linux",
            "socket=/s.sock,switch=a/b",
            "socket=/s.sock,tap=t0,mac=01:00:5e:00:00:01",
            "socket=/s.sock,tap=t0,mac=52:54:00:12:34",
            "socket=/s.sock,tap=t0,mac=52:54:00:12:34:56:78",
            "socket=/s.sock,tap=t0,mac=52:54:00:12:34:zz",
            "socket=/s.sock,tap=t0,queues=0",
            "socket=/s.sock,tap=t0,queues=17",
            "socket=/s.sock,tap=t0,queue-size=100",
            "socket=/s.sock,tap=t0,mtu=67",
            "socket=/s.sock,tap=t0,vlan=5",
            "socket=/s.sock,switch=s0,vlan=4095",
            "socket=/s.sock,tap=t0,colour=blue",
            "socket=/s.sock,tap=t0,poll-us=1001",
            "socket=/s.sock,tap=t0,iops=100",
            "socket=/s.sock,tap=t0,tx-pps=0",
            "socket=/s.sock,tap=t0,rx-bps-burst=10M",
        ] {
            assert!(NetConfig::parse(spec).is_err(), "accepted {spec}");
        }
    }
}
