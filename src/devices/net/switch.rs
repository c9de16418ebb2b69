//! The forwarding core of the in-daemon L2 switch (issue 4): MAC learning with aging,
//! flooding, per-port anti-spoofing and access VLANs. Pure logic — it decides where a frame
//! goes; the net device workers do the copying. Single-threaded by design: the switch's owner
//! serialises calls (one lock per switch, taken per batch of frames).
//!
//! Rules, in order, for a frame entering on a port:
//! 1. shorter than an Ethernet header → dropped (`runt`);
//! 2. a multicast/broadcast source MAC → dropped (`bad-source`);
//! 3. a guest port whose configured MAC differs from the source → dropped (`spoofed`);
//!    an uplink (tap) port may carry any source;
//! 4. an 802.1Q-tagged frame on an access port → dropped (`tagged-on-access`);
//! 5. the source is learnt on (port VLAN, MAC) → port;
//! 6. broadcast/multicast, or unknown or aged-out destination → flooded to every other port of
//!    the same VLAN; a known destination → that port (never back out of the ingress port).

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::{BTreeMap, HashMap};

use smallvec::SmallVec;

/// A MAC address.
pub type Mac = [u8; 6];

/// Why a frame was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than 14 bytes.
    Runt,
    /// Source MAC is multicast or broadcast.
    BadSource,
    /// Source MAC is not the port's configured MAC.
    Spoofed,
    /// A VLAN-tagged frame on an access port.
    TaggedOnAccess,
    /// The ingress port is not attached.
    UnknownPort,
    /// The destination is the ingress port itself.
    Hairpin,
}

impl DropReason {
    /// Stable name for counters.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Runt => "runt",
            DropReason::BadSource => "bad-source",
            DropReason::Spoofed => "spoofed",
            DropReason::TaggedOnAccess => "tagged-on-access",
            DropReason::UnknownPort => "unknown-port",
            DropReason::Hairpin => "hairpin",
        }
    }
}

/// Where a frame goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    /// To one port.
    Unicast(u32),
    /// To each of these ports (possibly none); inline up to 8, so flooding a small switch
    /// (ARP, broadcast) allocates nothing per frame.
    Flood(SmallVec<[u32; 8]>),
    /// Nowhere.
    Drop(DropReason),
}

/// A port's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortConfig {
    /// The MAC a guest port must send from (ignored for uplinks).
    pub mac: Mac,
    /// Access VLAN (frames are untagged on the port); `None` is the default VLAN 0.
    pub vlan: Option<u16>,
    /// An uplink (tap) carries other hosts' MACs.
    pub uplink: bool,
}

/// MAC learning table and ports of one switch.
#[derive(Debug)]
pub struct Switch {
    ports: BTreeMap<u32, PortConfig>,
    /// (VLAN, MAC) → (port, last seen ns).
    /// Learnt (VLAN, MAC) -> (port, last seen). `ahash`: fast per frame and keyed per
    /// process, so MACs sprayed from behind an uplink cannot aim at collisions.
    table: HashMap<(u16, Mac), (u32, u64), ahash::RandomState>,
    aging_ns: u64,
    /// When aged entries were last swept out.
    swept_ns: u64,
    /// Sweeps so far (tests check a full table is not swept per frame).
    #[cfg(test)]
    sweeps: u32,
}

/// Most MACs one switch learns. Anything behind an uplink can send from any number of source
/// MACs; past this the table sweeps out aged entries, and if it is still full a new MAC is
/// not learnt (frames to it are flooded, as to any unknown MAC) rather than growing memory.
pub const MAX_LEARNT: usize = 16384;

const BROADCAST: Mac = [0xff; 6];

/// How often a full table may be swept for aged entries.
const FULL_SWEEP_NS: u64 = 1_000_000_000;

fn is_multicast(mac: &Mac) -> bool {
    mac[0] & 1 == 1
}

impl Switch {
    /// An empty switch whose learnt entries expire after `aging_ns`.
    pub fn new(aging_ns: u64) -> Self {
        Self {
            ports: BTreeMap::new(),
            table: HashMap::with_hasher(ahash::RandomState::new()),
            aging_ns,
            swept_ns: 0,
            #[cfg(test)]
            sweeps: 0,
        }
    }

    /// Attaches (or reconfigures) port `port`.
    pub fn attach(&mut self, port: u32, config: PortConfig) {
        self.ports.insert(port, config);
        self.table.retain(|_, (p, _)| *p != port);
    }

    /// Detaches a port and forgets what was learnt on it.
    pub fn detach(&mut self, port: u32) {
        self.ports.remove(&port);
        self.table.retain(|_, (p, _)| *p != port);
    }

    /// Learnt entries still alive at `now_ns`.
    pub fn learnt(&self, now_ns: u64) -> usize {
        self.table
            .values()
            .filter(|(_, seen)| now_ns.saturating_sub(*seen) < self.aging_ns)
            .count()
    }

    /// Records that `mac` was seen on `port`, within the table's bounds: aged entries are swept
    /// out every quarter of the aging time, and a full table learns nothing new.
    fn learn(&mut self, vlan: u16, mac: Mac, port: u32, now_ns: u64) {
        if now_ns.saturating_sub(self.swept_ns) >= self.aging_ns / 4 {
            self.expire(now_ns);
            self.swept_ns = now_ns;
        }
        if let Some(entry) = self.table.get_mut(&(vlan, mac)) {
            *entry = (port, now_ns);
            return;
        }
        if self.table.len() >= MAX_LEARNT {
            // Full: swept at most once a second (a spray of new sources behind an uplink must
            // not make every frame scan the whole table under the switch's lock).
            if now_ns.saturating_sub(self.swept_ns) >= FULL_SWEEP_NS {
                self.expire(now_ns);
                self.swept_ns = now_ns;
            }
            if self.table.len() >= MAX_LEARNT {
                return;
            }
        }
        self.table.insert((vlan, mac), (port, now_ns));
    }

    /// Drops entries older than the aging time.
    pub fn expire(&mut self, now_ns: u64) {
        #[cfg(test)]
        {
            self.sweeps = self.sweeps.saturating_add(1);
        }
        let aging = self.aging_ns;
        self.table
            .retain(|_, (_, seen)| now_ns.saturating_sub(*seen) < aging);
    }

    /// Decides where `frame`, entering on `ingress`, goes; learns its source.
    pub fn forward(&mut self, ingress: u32, frame: &[u8], now_ns: u64) -> Forward {
        let Some(config) = self.ports.get(&ingress).copied() else {
            return Forward::Drop(DropReason::UnknownPort);
        };
        let Some((dst, rest)) = frame.split_first_chunk::<6>() else {
            return Forward::Drop(DropReason::Runt);
        };
        let Some((src, rest)) = rest.split_first_chunk::<6>() else {
            return Forward::Drop(DropReason::Runt);
        };
        let Some((ethertype, _)) = rest.split_first_chunk::<2>() else {
            return Forward::Drop(DropReason::Runt);
        };
        let (dst, src) = (*dst, *src);
        if is_multicast(&src) {
            return Forward::Drop(DropReason::BadSource);
        }
        if !config.uplink && src != config.mac {
            return Forward::Drop(DropReason::Spoofed);
        }
        // 802.1Q, 802.1ad and the older 0x9100 QinQ tag: none enters a VLAN-less port's
        // traffic (a tag a network behind an uplink could act on).
        if matches!(*ethertype, [0x81, 0x00] | [0x88, 0xa8] | [0x91, 0x00]) {
            return Forward::Drop(DropReason::TaggedOnAccess);
        }
        let vlan = config.vlan.unwrap_or(0);
        self.learn(vlan, src, ingress, now_ns);
        if dst != BROADCAST && !is_multicast(&dst) {
            if let Some(&(port, seen)) = self.table.get(&(vlan, dst)) {
                if now_ns.saturating_sub(seen) < self.aging_ns && self.ports.contains_key(&port) {
                    return if port == ingress {
                        Forward::Drop(DropReason::Hairpin)
                    } else {
                        Forward::Unicast(port)
                    };
                }
            }
        }
        Forward::Flood(
            self.ports
                .iter()
                .filter(|(p, c)| **p != ingress && c.vlan.unwrap_or(0) == vlan)
                .map(|(p, _)| *p)
                .collect(),
        )
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)] // tests may panic
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn mac(n: u8) -> Mac {
        [0x52, 0x54, 0, 0, 0, n]
    }

    fn frame(dst: Mac, src: Mac) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[0u8; 46]);
        f
    }

    fn port(n: u8, vlan: Option<u16>) -> PortConfig {
        PortConfig {
            mac: mac(n),
            vlan,
            uplink: false,
        }
    }

    fn three_ports() -> Switch {
        let mut s = Switch::new(300 * SEC);
        for p in 1..=3u8 {
            s.attach(u32::from(p), port(p, None));
        }
        s
    }

    #[test]
    fn a_mac_spray_behind_an_uplink_is_bounded_and_aged_out() {
        let mut s = Switch::new(300 * SEC);
        s.attach(1, port(1, None));
        s.attach(
            9,
            PortConfig {
                mac: [0; 6],
                vlan: None,
                uplink: true,
            },
        );
        let sprayed = |i: usize| -> Mac {
            let b = (i as u32).to_be_bytes();
            [0x02, 0x99, b[0], b[1], b[2], b[3]]
        };
        for i in 0..MAX_LEARNT + 1000 {
            s.forward(9, &frame(BROADCAST, sprayed(i)), 1 + i as u64);
        }
        assert!(
            s.sweeps <= 1,
            "a full table is not swept for each new source: {} sweeps",
            s.sweeps
        );
        assert_eq!(
            s.table.len(),
            MAX_LEARNT,
            "the table stops growing when full"
        );
        // A full table still forwards: unknown destinations flood.
        assert_eq!(
            s.forward(1, &frame(sprayed(MAX_LEARNT + 500), mac(1)), 2),
            Forward::Flood(smallvec::smallvec![9])
        );
        // Entries age out as traffic flows on, without anyone calling `expire`.
        s.forward(1, &frame(BROADCAST, mac(1)), 400 * SEC);
        assert_eq!(s.learnt(400 * SEC), 1, "only the fresh MAC is alive");
        assert_eq!(s.table.len(), 1, "aged entries were swept out");
    }

    #[test]
    fn unknown_and_broadcast_flood_then_learnt_unicast() {
        let mut s = three_ports();
        assert_eq!(
            s.forward(1, &frame(mac(2), mac(1)), 0),
            Forward::Flood(smallvec::smallvec![2, 3])
        );
        assert_eq!(
            s.forward(2, &frame(BROADCAST, mac(2)), 0),
            Forward::Flood(smallvec::smallvec![1, 3])
        );
        // Both sources are learnt now.
        assert_eq!(s.forward(1, &frame(mac(2), mac(1)), 1), Forward::Unicast(2));
        assert_eq!(s.forward(2, &frame(mac(1), mac(2)), 1), Forward::Unicast(1));
        let multicast = [0x01, 0x00, 0x5e, 0, 0, 1];
        assert_eq!(
            s.forward(1, &frame(multicast, mac(1)), 1),
            Forward::Flood(smallvec::smallvec![2, 3])
        );
    }

    #[test]
    fn entries_age_out() {
        let mut s = three_ports();
        s.forward(2, &frame(BROADCAST, mac(2)), 0);
        assert_eq!(
            s.forward(1, &frame(mac(2), mac(1)), 299 * SEC),
            Forward::Unicast(2)
        );
        assert_eq!(s.learnt(299 * SEC), 2);
        // Port 2 fell silent for the aging time: back to flooding.
        assert_eq!(
            s.forward(1, &frame(mac(2), mac(1)), 301 * SEC),
            Forward::Flood(smallvec::smallvec![2, 3])
        );
        s.expire(301 * SEC);
        assert_eq!(s.learnt(301 * SEC), 1, "only port 1's fresh entry is left");
    }

    #[test]
    fn spoofed_runt_bad_source_and_tagged_frames_are_dropped() {
        let mut s = three_ports();
        assert_eq!(
            s.forward(1, &frame(mac(2), mac(9)), 0),
            Forward::Drop(DropReason::Spoofed)
        );
        assert_eq!(s.forward(1, &[0u8; 13], 0), Forward::Drop(DropReason::Runt));
        assert_eq!(
            s.forward(1, &frame(mac(2), BROADCAST), 0),
            Forward::Drop(DropReason::BadSource)
        );
        for tpid in [[0x81, 0x00], [0x88, 0xa8], [0x91, 0x00]] {
            let mut tagged = frame(mac(2), mac(1));
            tagged[12..14].copy_from_slice(&tpid);
            assert_eq!(
                s.forward(1, &tagged, 0),
                Forward::Drop(DropReason::TaggedOnAccess),
                "{tpid:02x?}"
            );
        }
        assert_eq!(
            s.forward(7, &frame(mac(2), mac(1)), 0),
            Forward::Drop(DropReason::UnknownPort)
        );
        // A spoofed frame teaches the switch nothing.
        assert_eq!(s.learnt(0), 0);
    }

    #[test]
    fn uplinks_carry_any_source_and_hairpins_are_dropped() {
        let mut s = three_ports();
        s.attach(
            9,
            PortConfig {
                mac: [0; 6],
                vlan: None,
                uplink: true,
            },
        );
        let outside = [0x02, 0xaa, 0, 0, 0, 1];
        assert_eq!(
            s.forward(9, &frame(mac(1), outside), 0),
            Forward::Flood(smallvec::smallvec![1, 2, 3])
        );
        assert_eq!(
            s.forward(1, &frame(outside, mac(1)), 0),
            Forward::Unicast(9)
        );
        // The uplink sending to a MAC learnt on itself: not back out.
        let outside2 = [0x02, 0xaa, 0, 0, 0, 2];
        s.forward(9, &frame(BROADCAST, outside2), 0);
        assert_eq!(
            s.forward(9, &frame(outside2, outside), 0),
            Forward::Drop(DropReason::Hairpin)
        );
    }

    #[test]
    fn vlans_are_separate_broadcast_domains() {
        let mut s = Switch::new(300 * SEC);
        s.attach(1, port(1, Some(10)));
        s.attach(2, port(2, Some(10)));
        s.attach(3, port(3, Some(20)));
        assert_eq!(
            s.forward(1, &frame(BROADCAST, mac(1)), 0),
            Forward::Flood(smallvec::smallvec![2])
        );
        // Port 3 (VLAN 20) cannot reach port 1 even by unicast to a learnt MAC.
        assert_eq!(
            s.forward(3, &frame(mac(1), mac(3)), 0),
            Forward::Flood(smallvec::smallvec![])
        );
    }

    #[test]
    fn detaching_a_port_forgets_its_macs() {
        let mut s = three_ports();
        s.forward(2, &frame(BROADCAST, mac(2)), 0);
        s.detach(2);
        assert_eq!(
            s.forward(1, &frame(mac(2), mac(1)), 1),
            Forward::Flood(smallvec::smallvec![3])
        );
    }
}
