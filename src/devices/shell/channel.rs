//! The front-end's backend-request channel (`SET_BACKEND_REQ_FD`), kept by a device for the
//! messages it starts itself: today the config-change notification (a NIC's link going up or
//! down, a disk's new capacity), after which the front-end re-reads the config space and
//! tells the guest.
//!
//! Sending never blocks: each message goes in one `send(MSG_DONTWAIT)`, whatever the open
//! file's flags (the front-end shares the open file and may clear `O_NONBLOCK`). A front-end
//! that never reads it fills its socket buffer and loses notifications (logged); one whose
//! socket took part of a message loses the channel (its framing is gone).

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
        use super::relay::Sent;
        let mut guard = self.lock();
        let Some(channel) = guard.as_ref() else {
            return false;
        };
        match super::relay::send_config_change(channel) {
            Sent::Whole => true,
            Sent::Nothing(e) => {
                log::warn!("{id}: cannot notify the config change: {e}");
                false
            }
            Sent::Broken(e) => {
                log::warn!("{id}: backend channel dropped, cannot notify the config change: {e}");
                *guard = None;
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;
    use crate::sys::kick::testing::within_10s;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;

    #[test]
    fn a_full_channel_made_blocking_by_the_front_end_never_blocks_the_sender() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let channel = Arc::new(BackendChannel::default());
        channel.set("t", Some(ours.try_clone().unwrap()));
        // The front-end shares the open file: it fills the buffer, then clears O_NONBLOCK.
        let mut sent = 0usize;
        ours.set_nonblocking(true).unwrap();
        while let Ok(n) = std::io::Write::write(&mut &ours, &[0u8; 4096]) {
            sent += n;
        }
        ours.set_nonblocking(false).unwrap();
        // SAFETY: F_GETFL on an open fd.
        let flags = unsafe { libc::fcntl(ours.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(
            flags & libc::O_NONBLOCK,
            0,
            "the front-end made it blocking"
        );
        assert!(sent > 0);
        let sender = Arc::clone(&channel);
        assert!(
            !within_10s(move || sender.config_changed("t")),
            "nothing could be sent"
        );
        // Still framed (nothing went): kept, and a drained channel carries the next one.
        theirs.set_nonblocking(true).unwrap();
        let mut drain = vec![0u8; sent];
        (&theirs).read_exact(&mut drain).unwrap();
        assert!(channel.config_changed("t"));
        let mut header = [0u8; 12];
        (&theirs).read_exact(&mut header).unwrap();
        assert_eq!(header[0], 2, "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG");
    }

    #[test]
    fn a_closed_channel_is_dropped() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let channel = BackendChannel::default();
        channel.set("t", Some(ours));
        drop(theirs);
        // EPIPE, and no SIGPIPE kills the test process.
        assert!(!channel.config_changed("t"));
        assert!(channel.lock().is_none(), "a broken channel is forgotten");
    }
}
