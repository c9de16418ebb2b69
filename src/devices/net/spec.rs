//! virtio-net wire facts: the features we offer, what the guest's choice of them means for
//! the data path, and the config space (`struct virtio_net_config` up to `mtu`, 12 bytes).
//!
//! We offer checksum and TSO offloads both ways. The control virtqueue is not ours: QEMU and
//! cloud-hypervisor implement it in the front-end and tell us about queue pairs with
//! SET_VRING_ENABLE, so `VIRTIO_NET_F_CTRL_VQ` is left to them.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use virtio_bindings::virtio_config::{VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::switch::Mac;
use crate::devices::VHOST_USER_F_PROTOCOL_FEATURES;
use crate::sys::tap::offload;

/// Length of the config space we expose: mac, status, max_virtqueue_pairs, mtu.
pub const CONFIG_LEN: usize = 12;

/// Most buffers in one chain of a NIC's rings (direct descriptors and indirect table entries;
/// DPDK's vhost takes as many, `BUF_VECTOR_MAX`; Windows' NetKVM fills a 256-entry table):
/// Linux sends at most `MAX_SKB_FRAGS` + 2 (19 by default, 47 at most), and its rx chains are
/// one buffer (mergeable) or at most 19 ("big packets"). Longer chains are broken (dropped and
/// counted). A walk of a ring is then at most a ring times this, not a ring times 1026.
pub const MAX_CHAIN_DESCRIPTORS: u32 = 256;

/// Most rx chains one frame may take (mergeable buffers): a 64 KiB frame in Linux's smallest
/// mergeable buffers (1518 bytes) takes 44. On a switch port whose chains are smaller the
/// frame is dropped (`no-rx-buffers`), and a sender never walks more than this many of its
/// chains for one frame; on a tap port the frame waits in the tap as for a full ring.
pub const MAX_FRAME_CHAINS: usize = 128;

/// The virtio feature bits offered for every net device.
pub fn device_features() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        // Every chain goes back in the order it was taken, one used entry each (tx: refused
        // frames in their place; rx: a frame's buffers, then chains not needed go back to
        // the ring). DPDK's virtio driver takes it and then frees tx buffers by position
        // (the used index only); a driver that reads the entries finds them in avail order.
        VIRTIO_F_IN_ORDER,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MQ,
        // After a live migration the guest announces itself (gratuitous ARP, IPv6 neighbour
        // advertisements: its IP addresses, not just its MAC). QEMU runs that exchange (config
        // status and the control queue's ANNOUNCE_ACK) itself and only offers it to the guest
        // if the backend does; a guest that takes it gets no SEND_RARP (QEMU sends RARP in
        // its stead only for guests that cannot announce). Like MQ, it needs the front-end's
        // control queue.
        VIRTIO_NET_F_GUEST_ANNOUNCE,
        VHOST_USER_F_PROTOCOL_FEATURES,
    ]
    .iter()
    .fold(0u64, |acc, bit| acc | 1 << bit)
}

/// The names of the features in `features` that change how the data path treats the
/// guest (`device.get` shows them).
pub fn negotiated_names(features: u64) -> Vec<&'static str> {
    [
        (VIRTIO_F_IN_ORDER, "in-order"),
        (VIRTIO_RING_F_EVENT_IDX, "event-idx"),
        (VIRTIO_RING_F_INDIRECT_DESC, "indirect-desc"),
        (VIRTIO_NET_F_MRG_RXBUF, "mergeable-rx"),
        (VIRTIO_NET_F_MQ, "multiqueue"),
        (VIRTIO_NET_F_CSUM, "csum"),
        (VIRTIO_NET_F_GUEST_CSUM, "guest-csum"),
        (VIRTIO_NET_F_HOST_TSO4, "host-tso4"),
        (VIRTIO_NET_F_HOST_TSO6, "host-tso6"),
        (VIRTIO_NET_F_GUEST_TSO4, "guest-tso4"),
        (VIRTIO_NET_F_GUEST_TSO6, "guest-tso6"),
        (VIRTIO_NET_F_HOST_ECN, "host-ecn"),
        (VIRTIO_NET_F_GUEST_ECN, "guest-ecn"),
        (VIRTIO_NET_F_GUEST_ANNOUNCE, "guest-announce"),
    ]
    .into_iter()
    .filter(|&(bit, _)| features & (1u64 << bit) != 0)
    .map(|(_, name)| name)
    .collect()
}

/// What the guest accepted, as the data path needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Negotiated {
    /// Receive frames may span several buffers (`num_buffers` in the header).
    pub mergeable_rx: bool,
    /// The guest accepts frames with partial checksums.
    pub guest_csum: bool,
    /// The guest accepts TCPv4 GSO frames.
    pub guest_tso4: bool,
    /// The guest accepts TCPv6 GSO frames.
    pub guest_tso6: bool,
    /// The guest accepts TSO frames with ECN.
    pub guest_ecn: bool,
}

impl Negotiated {
    /// Decodes the acked feature bits.
    pub fn from_features(features: u64) -> Self {
        let has = |bit: u32| features & (1u64 << bit) != 0;
        Self {
            mergeable_rx: has(VIRTIO_NET_F_MRG_RXBUF),
            guest_csum: has(VIRTIO_NET_F_GUEST_CSUM),
            guest_tso4: has(VIRTIO_NET_F_GUEST_TSO4),
            guest_tso6: has(VIRTIO_NET_F_GUEST_TSO6),
            guest_ecn: has(VIRTIO_NET_F_GUEST_ECN),
        }
    }

    /// The `TUN_F_*` flags a tap may use towards this guest.
    pub fn tap_offloads(&self) -> u32 {
        let mut flags = 0;
        if self.guest_csum {
            flags |= offload::CSUM;
            // TSO needs checksum offload (the kernel refuses TSO without it).
            if self.guest_tso4 {
                flags |= offload::TSO4;
            }
            if self.guest_tso6 {
                flags |= offload::TSO6;
            }
            if self.guest_ecn && (self.guest_tso4 || self.guest_tso6) {
                flags |= offload::TSO_ECN;
            }
        }
        flags
    }

    /// Whether a GSO frame of `gso_type` (from the header, ECN bit included) may be given to
    /// this guest as it is.
    pub fn accepts_gso(&self, gso_type: u8) -> bool {
        use super::header::{GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6};
        let ecn_ok = gso_type & GSO_ECN == 0 || self.guest_ecn;
        ecn_ok
            && match gso_type & !GSO_ECN {
                GSO_NONE => true,
                GSO_TCPV4 => self.guest_tso4,
                GSO_TCPV6 => self.guest_tso6,
                _ => false,
            }
    }
}

/// What the config space describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigSpace {
    /// The guest's MAC.
    pub mac: Mac,
    /// Link up.
    pub link_up: bool,
    /// Queue pairs offered.
    pub max_queue_pairs: u16,
    /// MTU.
    pub mtu: u16,
}

impl ConfigSpace {
    /// Serializes the config space, little-endian, `CONFIG_LEN` bytes.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let status: u16 = if self.link_up {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        let [s0, s1] = status.to_le_bytes();
        let [q0, q1] = self.max_queue_pairs.to_le_bytes();
        let [m0, m1] = self.mtu.to_le_bytes();
        let [a, b, c, d, e, f] = self.mac;
        [a, b, c, d, e, f, s0, s1, q0, q1, m0, m1]
    }

    /// The bytes a GET_CONFIG for `offset..offset+size` returns.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        crate::devices::shell::read_config_window(&self.to_bytes(), offset, size)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;
    use crate::devices::net::header::{GSO_ECN, GSO_TCPV4, GSO_TCPV6, GSO_UDP};

    #[test]
    fn config_layout_matches_virtio_net_config() {
        let space = ConfigSpace {
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            link_up: true,
            max_queue_pairs: 2,
            mtu: 1500,
        };
        assert_eq!(
            space.to_bytes(),
            [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 2, 0, 0xdc, 0x05]
        );
        assert_eq!(space.read(6, 2), vec![1, 0]);
        assert_eq!(space.read(10, 4), vec![0xdc, 0x05, 0, 0]);
        let down = ConfigSpace {
            link_up: false,
            ..space
        };
        assert_eq!(down.read(6, 2), vec![0, 0]);
    }

    #[test]
    fn in_order_is_offered_and_named_when_taken() {
        assert_ne!(device_features() & 1 << VIRTIO_F_IN_ORDER, 0);
        let taken = 1 << VIRTIO_F_IN_ORDER | 1 << VIRTIO_NET_F_MRG_RXBUF | 1 << VIRTIO_F_VERSION_1;
        assert_eq!(negotiated_names(taken), ["in-order", "mergeable-rx"]);
        assert!(negotiated_names(0).is_empty());
    }

    #[test]
    fn offloads_follow_what_the_guest_accepted() {
        let all = Negotiated::from_features(device_features());
        assert!(all.mergeable_rx && all.guest_csum);
        assert_eq!(
            all.tap_offloads(),
            offload::CSUM | offload::TSO4 | offload::TSO6 | offload::TSO_ECN
        );
        assert!(all.accepts_gso(GSO_TCPV4 | GSO_ECN) && all.accepts_gso(GSO_TCPV6));
        assert!(!all.accepts_gso(GSO_UDP), "UFO is never offered");

        let plain = Negotiated::default();
        assert_eq!(plain.tap_offloads(), 0);
        assert!(!plain.accepts_gso(GSO_TCPV4));
        // TSO without checksum offload is not a combination the tap accepts.
        let odd = Negotiated {
            guest_tso4: true,
            ..Negotiated::default()
        };
        assert_eq!(odd.tap_offloads(), 0);
    }
}
