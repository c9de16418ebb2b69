//! The frame a migrated NIC announces itself with: a RARP (ethertype 0x8035) broadcast from
//! its MAC, as QEMU's `qemu_announce_self` builds it, so switches (ours and the host's bridge
//! behind a tap) learn the MAC's new location at once instead of when the guest next talks.
//! QEMU asks the backend to send it with `VHOST_USER_SEND_RARP` after a migration.

use super::switch::Mac;

/// Bytes of the announcement (the Ethernet minimum, padded with zeros).
pub const RARP_LEN: usize = 60;

/// The RARP "reverse request" QEMU sends for `mac`.
pub fn rarp(mac: Mac) -> [u8; RARP_LEN] {
    let mut frame = [0u8; RARP_LEN];
    let fields: [&[u8]; 10] = [
        &[0xff; 6],    // destination: broadcast
        &mac,          // source
        &[0x80, 0x35], // ethertype RARP
        &[0x00, 0x01], // hardware type: Ethernet
        &[0x08, 0x00], // protocol type: IPv4
        &[6, 4],       // address lengths
        &[0x00, 0x03], // operation: reverse request
        &mac,          // sender hardware address
        &[0; 4],       // sender protocol address
        &mac,          // target hardware address (target protocol address stays 0)
    ];
    let mut at = 0usize;
    for field in fields {
        if let Some(dst) = frame.get_mut(at..at.saturating_add(field.len())) {
            dst.copy_from_slice(field);
        }
        at = at.saturating_add(field.len());
    }
    frame
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn a_rarp_broadcast_from_the_mac_as_qemu_sends_it() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp(mac);
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3], "reverse request");
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[32..38], &mac);
        assert!(f[38..].iter().all(|&b| b == 0));
    }
}
