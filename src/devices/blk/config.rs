//! The configuration of one virtio-blk device, parsed from a `--blk key=value,...` list.
//!
//! Every option is validated here, before any file or socket is touched, so a bad value is a
//! clear error that changes nothing. Defaults: one queue of 256 descriptors, the io_uring
//! engine, 512-byte logical blocks, buffered I/O, writable.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::path::PathBuf;

use crate::config::options::{OptionError, OptionList};
use crate::devices::options::{CommonError, CommonOptions, QueueLimits};
use crate::qos::config::QosConfig;

pub use crate::devices::options::MAX_QUEUE_SIZE;
/// Most queues one device offers; each gets its own worker thread and io_uring.
pub const MAX_QUEUES: u16 = 64;
/// `VIRTIO_BLK_ID_BYTES`: the serial number field is at most this long.
pub const SERIAL_MAX_BYTES: usize = 20;

/// Errors in a device specification.
#[derive(Debug, thiserror::Error)]
pub enum BlkConfigError {
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

pub use crate::storage::EngineKind;

/// Where the device's blocks live.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackingSpec {
    /// A regular file or a block device.
    File(PathBuf),
    /// Reads return zeros, writes are dropped: measures the data path alone.
    Null,
    /// An image on a Ceph cluster (`path=rbd:POOL/IMAGE[@SNAP]`, `ceph-conf=`, `ceph-id=`,
    /// `ceph-keyring=`).
    Rbd(Box<crate::storage::rbd::RbdSpec>),
}

impl BackingSpec {
    /// The `path=` as users see it.
    pub fn display(&self) -> String {
        match self {
            BackingSpec::Null => "null".to_string(),
            BackingSpec::File(p) => p.display().to_string(),
            BackingSpec::Rbd(spec) => spec.display(),
        }
    }
}

/// Where a tiered disk's cold records go.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ColdSpec {
    /// A local file (`tier-cold=/path`).
    File(PathBuf),
    /// RADOS objects (`tier-cold=rados:POOL[/NAMESPACE]/PREFIX`, with `ceph-*` options).
    Rados(Box<crate::storage::rbd::objects::ObjectsSpec>),
}

/// A tiered disk: hot extents in `hot` (the device's backing), cold ones compressed in `cold`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TierSpec {
    /// The cold tier.
    pub cold: ColdSpec,
    /// Extent size in bytes (a power of two, 64 KiB..=64 MiB).
    pub extent_size: u64,
    /// zstd level for demotions.
    pub zstd_level: i32,
    /// Automatic moves.
    pub policy: crate::storage::tier::policy::TierPolicy,
}

/// A validated virtio-blk device configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    /// Name used in logs, stats and the control plane.
    pub id: String,
    /// The vhost-user socket the daemon listens on.
    pub socket: PathBuf,
    /// The backing store.
    pub backing: BackingSpec,
    /// Size for a new sparse image (or the null device); `None` uses the existing file's size.
    pub size: Option<u64>,
    /// Refuse writes, discards and write-zeroes; offer `VIRTIO_BLK_F_RO`.
    pub readonly: bool,
    /// Open the backing with `O_DIRECT` (bypass the host page cache).
    pub direct: bool,
    /// The destination of a live migration (`incoming=on`): the image may still be held by
    /// the source device; this one takes it when its front-end starts (`storage::image_lock`).
    pub incoming: bool,
    /// Number of virtqueues offered (`VIRTIO_BLK_F_MQ`).
    pub queues: u16,
    /// Largest queue size the front-end may configure.
    pub queue_size: u16,
    /// Serial number returned by `VIRTIO_BLK_T_GET_ID`.
    pub serial: String,
    /// I/O engine.
    pub engine: EngineKind,
    /// Logical block size reported to the guest (512 or 4096).
    pub logical_block_size: u32,
    /// How the queues poll (`poll=`, `poll-us=`, `poll-budget=`).
    pub poll: crate::devices::poll::PollConfig,
    /// Most guest memory a front-end may have mapped (`mem-max=`).
    pub memory_max: u64,
    /// Rate limits (none by default).
    pub qos: QosConfig,
    /// The QoS group whose limits also apply (`qos-group=NAME`).
    pub qos_group: Option<String>,
    /// Storage tiering (`tier-hot=`, `tier-cold=`).
    pub tier: Option<TierSpec>,
}

pub use crate::devices::options::{DEFAULT_POLL_US, MAX_POLL_US};

impl BlkConfig {
    /// The Ceph clients this disk connects with (its `rbd:` image, its `rados:` cold tier).
    pub fn ceph_clients(&self) -> Vec<&crate::storage::rbd::CephClient> {
        let mut clients = Vec::new();
        if let BackingSpec::Rbd(spec) = &self.backing {
            clients.push(&spec.client);
        }
        if let Some(TierSpec {
            cold: ColdSpec::Rados(objects),
            ..
        }) = &self.tier
        {
            clients.push(&objects.client);
        }
        clients
    }

    /// Parses a `--blk` specification.
    pub fn parse(spec: &str) -> Result<Self, BlkConfigError> {
        Self::from_options(OptionList::parse(spec)?)
    }

    /// Builds a configuration from an option list, consuming every key.
    pub fn from_options(mut options: OptionList) -> Result<Self, BlkConfigError> {
        let poll_given = options.contains("poll");
        let common = CommonOptions::take(
            &mut options,
            QueueLimits {
                max_queues: MAX_QUEUES,
            },
        )?;
        let mut poll = common.poll_config();
        let CommonOptions {
            id,
            socket,
            queues,
            queue_size,
            qos_group,
            memory_max,
            ..
        } = common;
        let tier_hot = options.take_str("tier-hot");
        let tier_cold = options.take_str("tier-cold");
        let client = crate::storage::rbd::CephClient {
            conf: options.take_str("ceph-conf").map(PathBuf::from),
            id: options.take_str("ceph-id"),
            keyring: options.take_str("ceph-keyring").map(PathBuf::from),
        };
        if client
            .id
            .as_deref()
            .is_some_and(|id| id.is_empty() || id.len() > 64 || id.chars().any(|c| c.is_control()))
        {
            return Err(invalid("ceph-id must be 1 to 64 bytes"));
        }
        let extent = options.take_size("extent")?;
        let zstd_level = options.take::<i32>("zstd-level")?;
        let policy = crate::storage::tier::policy::TierPolicy::from_options(&mut options)?;
        let path = match (&tier_hot, options.take_str("path")) {
            (Some(_), Some(_)) => return Err(invalid("give either path= or tier-hot=, not both")),
            (Some(hot), None) => hot.clone(),
            (None, Some(path)) => path,
            (None, None) => return Err(OptionError::Missing("path").into()),
        };
        let tier = match (tier_hot, tier_cold) {
            (None, None) => {
                if extent.is_some() || zstd_level.is_some() || policy.is_active() {
                    return Err(invalid(
                        "extent=, zstd-level= and tier-* policies need tier-hot= and tier-cold=",
                    ));
                }
                None
            }
            (Some(_), Some(cold)) => {
                let extent_size = extent.unwrap_or(1 << 20);
                if !extent_size.is_power_of_two() || !(64 << 10..=64 << 20).contains(&extent_size) {
                    return Err(invalid("extent must be a power of two from 64K to 64M"));
                }
                let zstd_level = zstd_level.unwrap_or(3);
                if !(1..=19).contains(&zstd_level) {
                    return Err(invalid("zstd-level must be 1..=19"));
                }
                if cold.is_empty() {
                    return Err(invalid("tier-cold must not be empty"));
                }
                let cold = if cold.starts_with(crate::storage::rbd::objects::ObjectsSpec::PREFIX) {
                    let mut spec = crate::storage::rbd::objects::ObjectsSpec::parse(&cold)
                        .map_err(|e| invalid(e.to_string()))?;
                    spec.client = client.clone();
                    ColdSpec::Rados(Box::new(spec))
                } else {
                    ColdSpec::File(PathBuf::from(cold))
                };
                Some(TierSpec {
                    cold,
                    extent_size,
                    zstd_level,
                    policy,
                })
            }
            _ => return Err(invalid("a tiered disk needs both tier-hot= and tier-cold=")),
        };
        let backing = match path.as_str() {
            "null" => BackingSpec::Null,
            "" => return Err(invalid("path must not be empty")),
            rbd if rbd.starts_with(crate::storage::rbd::RbdSpec::PREFIX) => {
                let mut spec =
                    crate::storage::rbd::RbdSpec::parse(rbd).map_err(|e| invalid(e.to_string()))?;
                spec.client = client.clone();
                BackingSpec::Rbd(Box::new(spec))
            }
            other => BackingSpec::File(PathBuf::from(other)),
        };
        let on_ceph = matches!(backing, BackingSpec::Rbd(_))
            || matches!(
                &tier,
                Some(TierSpec {
                    cold: ColdSpec::Rados(_),
                    ..
                })
            );
        if !on_ceph && client != crate::storage::rbd::CephClient::default() {
            return Err(invalid(
                "ceph-conf=, ceph-id= and ceph-keyring= are for rbd: paths and rados: cold tiers",
            ));
        }
        if matches!(backing, BackingSpec::Rbd(_)) && !poll_given {
            // A cluster answers in hundreds of microseconds at best: polling for its
            // completions only burns CPU (measured: 39% more CPU per request at QD 32).
            poll.mode = crate::devices::poll::PollMode::Off;
        }
        let size = options.take_size("size")?;
        let snapshot = matches!(&backing, BackingSpec::Rbd(spec) if spec.snapshot.is_some());
        let readonly = options.take_bool("readonly")?.unwrap_or(false) || snapshot;
        let direct = options.take_bool("direct")?.unwrap_or(false);
        let incoming = options.take_bool("incoming")?.unwrap_or(false);
        let serial = options.take_str("serial").unwrap_or_else(|| id.clone());
        let engine = match options.take_str("engine").as_deref() {
            None | Some("uring") => EngineKind::Uring,
            Some("sync") => EngineKind::Sync,
            Some(other) => {
                return Err(invalid(format!(
                    "engine `{other}` unknown: expected uring or sync"
                )))
            }
        };
        let logical_block_size = options.take::<u32>("logical-block-size")?.unwrap_or(512);
        let qos = QosConfig::from_options(&mut options).map_err(|e| invalid(e.to_string()))?;
        options.finish()?;
        if serial.len() > SERIAL_MAX_BYTES {
            return Err(invalid(format!(
                "serial is {} bytes; at most {SERIAL_MAX_BYTES}",
                serial.len()
            )));
        }
        if logical_block_size != 512 && logical_block_size != 4096 {
            return Err(invalid("logical-block-size must be 512 or 4096"));
        }
        if let Some(size) = size {
            if size == 0 || size.checked_rem(u64::from(logical_block_size)) != Some(0) {
                return Err(invalid(format!(
                    "size must be a non-zero multiple of {logical_block_size}"
                )));
            }
        }
        if backing == BackingSpec::Null && size.is_none() {
            return Err(invalid("path=null needs size="));
        }
        if tier.is_some() && (readonly || !matches!(backing, BackingSpec::File(_))) {
            return Err(invalid("a tiered disk is a writable file disk"));
        }
        if matches!(backing, BackingSpec::Rbd(_)) && (size.is_some() || direct) {
            return Err(invalid(
                "an rbd: disk takes its size from the image (create or resize it with `rbd`), \
                 and direct= does not apply",
            ));
        }
        Ok(Self {
            id,
            socket,
            backing,
            size,
            readonly,
            direct,
            incoming,
            queues,
            queue_size,
            serial,
            engine,
            logical_block_size,
            poll,
            memory_max,
            qos,
            qos_group,
            tier,
        })
    }
}

fn invalid(message: impl Into<String>) -> BlkConfigError {
    BlkConfigError::Invalid(message.into())
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn defaults_from_a_minimal_spec() {
        let config = BlkConfig::parse("socket=/run/nc/vm1-disk0.sock,path=/img").unwrap();
        assert_eq!(config.id, "vm1-disk0");
        assert_eq!(config.serial, "vm1-disk0");
        assert_eq!(config.queues, 1);
        assert_eq!(config.queue_size, 256);
        assert_eq!(config.engine, EngineKind::Uring);
        assert_eq!(config.logical_block_size, 512);
        assert_eq!(config.backing, BackingSpec::File("/img".into()));
        assert!(!config.readonly && !config.direct);
    }

    #[test]
    fn every_option_parses() {
        let config = BlkConfig::parse(
            "socket=/s.sock,path=null,size=1G,id=d0,readonly,direct=on,queues=4,\
             queue-size=1024,serial=SN1,engine=sync,logical-block-size=4096",
        )
        .unwrap();
        assert_eq!(config.backing, BackingSpec::Null);
        assert_eq!(config.size, Some(1 << 30));
        assert_eq!(config.queues, 4);
        assert_eq!(config.queue_size, 1024);
        assert_eq!(config.engine, EngineKind::Sync);
        assert!(config.readonly && config.direct);
    }

    #[test]
    fn a_tiered_disk() {
        let config = BlkConfig::parse(
            "socket=/s.sock,tier-hot=/nvme/vm1.hot,tier-cold=/hdd/vm1.cold,size=20G,extent=4M",
        )
        .unwrap();
        assert_eq!(config.backing, BackingSpec::File("/nvme/vm1.hot".into()));
        let tier = config.tier.unwrap();
        assert_eq!(tier.cold, ColdSpec::File(PathBuf::from("/hdd/vm1.cold")));
        let config = BlkConfig::parse(
            "socket=/s.sock,tier-hot=/nvme/vm1.hot,tier-cold=rados:cold/vm1,size=20G,ceph-id=nc",
        )
        .unwrap();
        let Some(TierSpec {
            cold: ColdSpec::Rados(objects),
            ..
        }) = config.tier
        else {
            panic!("not a rados cold tier: {:?}", config.tier);
        };
        assert_eq!(
            (objects.pool.as_str(), objects.prefix.as_str()),
            ("cold", "vm1")
        );
        assert_eq!(objects.client.id.as_deref(), Some("nc"));
        assert_eq!((tier.extent_size, tier.zstd_level), (4 << 20, 3));
    }

    #[test]
    fn incoming_is_an_option_of_plain_and_tiered_disks() {
        for spec in [
            "socket=/s.sock,path=/i.img,incoming=on",
            "socket=/s.sock,tier-hot=/i.img,tier-cold=/c,incoming=on",
        ] {
            assert!(BlkConfig::parse(spec).is_ok_and(|c| c.incoming), "{spec}");
        }
    }

    #[test]
    fn an_rbd_disk() {
        let config = BlkConfig::parse(
            "socket=/s.sock,path=rbd:vms/disk0,ceph-conf=/etc/ceph/c.conf,ceph-id=novacron,\
             ceph-keyring=/etc/ceph/k",
        )
        .unwrap();
        let BackingSpec::Rbd(spec) = &config.backing else {
            panic!("not rbd: {:?}", config.backing);
        };
        assert_eq!((spec.pool.as_str(), spec.image.as_str()), ("vms", "disk0"));
        assert_eq!(spec.client.id.as_deref(), Some("novacron"));
        assert_eq!(
            spec.client.conf.as_deref(),
            Some(std::path::Path::new("/etc/ceph/c.conf"))
        );
        assert!(!config.readonly);
        assert_eq!(config.poll.mode, crate::devices::poll::PollMode::Off);
        let snap = BlkConfig::parse("socket=/s.sock,path=rbd:vms/disk0@gold").unwrap();
        assert!(snap.readonly, "a snapshot is served read-only");
    }

    #[test]
    fn bad_values_are_refused() {
        for spec in [
            "path=/img",
            "socket=/s.sock",
            "socket=/s.sock,path=/img,queues=0",
            "socket=/s.sock,path=/img,queues=65",
            "socket=/s.sock,path=/img,queue-size=100",
            "socket=/s.sock,path=/img,queue-size=65536",
            "socket=/s.sock,path=/img,serial=123456789012345678901",
            "socket=/s.sock,path=/img,engine=aio",
            "socket=/s.sock,path=/img,logical-block-size=1024",
            "socket=/s.sock,path=/img,size=1000",
            "socket=/s.sock,path=null",
            "socket=/s.sock,path=/img,id=a/b",
            "socket=/s.sock,path=/img,colour=blue",
            "socket=/s.sock,path=/img,poll-us=1001",
            "socket=/s.sock,tier-hot=/h,size=1G",
            "socket=/s.sock,tier-hot=/h,tier-cold=/c,path=/img,size=1G",
            "socket=/s.sock,tier-hot=/h,tier-cold=/c,extent=100K,size=1G",
            "socket=/s.sock,tier-hot=/h,tier-cold=/c,extent=128M,size=1G",
            "socket=/s.sock,tier-hot=/h,tier-cold=/c,zstd-level=20,size=1G",
            "socket=/s.sock,path=/img,extent=1M",
            "socket=/s.sock,path=/img,tier-idle-for=10m",
            "socket=/s.sock,path=/img,ceph-id=admin",
            "socket=/s.sock,path=rbd:vms/d,size=1G",
            "socket=/s.sock,path=rbd:vms/d,direct=on",
            "socket=/s.sock,path=rbd:vms/d,ceph-id=",
            "socket=/s.sock,path=rbd:vms",
            "socket=/s.sock,tier-hot=rbd:vms/d,tier-cold=/c",
        ] {
            assert!(BlkConfig::parse(spec).is_err(), "accepted {spec}");
        }
    }
}
