//! The device kinds this daemon serves, as one typed configuration: options are parsed once,
//! into the kind's own config, and unknown kinds are refused. Adding a device kind adds one
//! variant here (and one in the registry's running-device enum).

use std::path::Path;

use crate::config::options::OptionList;
use crate::qos::config::QosConfig;

use super::blk::config::{BlkConfig, BlkConfigError};
use super::net::config::{NetConfig, NetConfigError};

/// Errors turning a kind and its options into a configuration.
#[derive(Debug, thiserror::Error)]
pub enum KindError {
    /// The kind is not one this daemon serves.
    #[error("unknown device type `{0}` (known: {known})", known = DeviceConfig::KINDS.join(", "))]
    Unknown(String),
    /// A block device's options were wrong.
    #[error(transparent)]
    Blk(#[from] BlkConfigError),
    /// A net device's options were wrong.
    #[error(transparent)]
    Net(#[from] NetConfigError),
}

/// A device's configuration, by kind.
#[derive(Debug, Clone)]
pub enum DeviceConfig {
    /// virtio-blk.
    Blk(BlkConfig),
    /// virtio-net.
    Net(NetConfig),
}

impl DeviceConfig {
    /// The kind names, as `device.add`'s `type` and the state file spell them.
    pub const KINDS: [&'static str; 2] = ["blk", "net"];

    /// Parses `options` for a device of `kind`, consuming every key.
    pub fn parse(kind: &str, options: OptionList) -> Result<Self, KindError> {
        match kind {
            "blk" => Ok(Self::Blk(BlkConfig::from_options(options)?)),
            "net" => Ok(Self::Net(NetConfig::from_options(options)?)),
            other => Err(KindError::Unknown(other.to_string())),
        }
    }

    /// The kind's name.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Blk(_) => "blk",
            Self::Net(_) => "net",
        }
    }

    /// The device id.
    pub fn id(&self) -> &str {
        match self {
            Self::Blk(c) => &c.id,
            Self::Net(c) => &c.id,
        }
    }

    /// The vhost-user socket.
    pub fn socket(&self) -> &Path {
        match self {
            Self::Blk(c) => &c.socket,
            Self::Net(c) => &c.socket,
        }
    }

    /// The device's own rate limits.
    pub fn qos(&self) -> &QosConfig {
        match self {
            Self::Blk(c) => &c.qos,
            Self::Net(c) => &c.qos,
        }
    }

    /// The QoS group it joins.
    pub fn qos_group(&self) -> Option<&str> {
        match self {
            Self::Blk(c) => c.qos_group.as_deref(),
            Self::Net(c) => c.qos_group.as_deref(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_once_and_unknown_kinds_are_refused() {
        let blk = DeviceConfig::parse(
            "blk",
            OptionList::parse("socket=/s/d0.sock,path=null,size=1M").unwrap(),
        )
        .unwrap();
        assert_eq!((blk.kind(), blk.id()), ("blk", "d0"));
        let net = DeviceConfig::parse(
            "net",
            OptionList::parse("socket=/s/n0.sock,switch=s").unwrap(),
        )
        .unwrap();
        assert_eq!((net.kind(), net.id()), ("net", "n0"));
        let e = DeviceConfig::parse("scsi", OptionList::parse("socket=/s").unwrap()).unwrap_err();
        assert!(matches!(e, KindError::Unknown(k) if k == "scsi"));
    }
}
