//! The front-end's backend-request channel (`SET_BACKEND_REQ_FD`), kept by a device for the
//! messages it starts itself: today the config-change notification (a NIC's link going up or
//! down, a disk's new capacity), after which the front-end re-reads the config space and
//! tells the guest.
//!
//! The channel is non-blocking: a front-end that never reads it fills its socket buffer and
//! loses notifications (logged), but never blocks the device's thread.

use std::os::unix::net::UnixStream;
use std::sync::Mutex;

/// A device's backend-request channel, when the current front-end gave one.
#[derive(Debug, Default)]
pub struct BackendChannel(Mutex<Option<UnixStream>>);

impl BackendChannel {
    /// Keeps (or with `None` drops) the front-end's channel.
    pub fn set(&self, id: &str, channel: Option<UnixStream>) {
        if let Some(channel) = &channel {
            if let Err(e) = channel.set_nonblocking(true) {
                log::warn!("{id}: backend channel: {e}");
            }
        }
        *self.lock() = channel;
    }

    /// Sends `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` if there is a channel; returns whether it
    /// was sent.
    pub fn config_changed(&self, id: &str) -> bool {
        let mut channel = self.lock();
        let Some(channel) = channel.as_mut() else {
            return false;
        };
        match super::relay::send_config_change(channel) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("{id}: cannot notify the config change: {e}");
                false
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<UnixStream>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
