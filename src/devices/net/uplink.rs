//! A switch's uplink: a tap whose frames enter the switch like a port's, and which receives
//! what the switch floods or forwards to it. One thread per uplink reads the tap (into one
//! 64 KiB buffer, from which the frame is copied into each receiver); writes to the tap
//! happen on the sender's thread, straight from its guest memory (see `fabric`).
//!
//! The tap is opened with every offload on (frames from the host may be GSO; receivers that
//! declined GSO drop them, counted). A lost tap is handled as for a device's tap.

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::fabric::{Port, PortSink, SwitchHub};
use super::frame::FrameRef;
use super::header::{NetHeader, HEADER_LEN, MAX_GSO_FRAME};
use super::stats::{Direction, Drop, NetStats};
use super::switch::PortConfig;
use super::tap_queue::{TapQueue, TapQueueError};
use crate::lock::lock;
use crate::sys::poll::{wait_readable, Readable};
use crate::sys::tap::offload;

/// Errors starting an uplink.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The tap could not be opened.
    #[error(transparent)]
    Tap(#[from] TapQueueError),
    /// The stop event or the thread could not be created.
    #[error("cannot start the uplink thread")]
    Thread(#[source] std::io::Error),
    /// The switch refused the port.
    #[error(transparent)]
    Attach(#[from] super::fabric::AttachError),
}

/// A running uplink.
pub struct Uplink {
    hub: Arc<SwitchHub>,
    port: Arc<Port>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Uplink {
    /// Opens tap `name` and attaches it to `hub` as its uplink.
    pub fn start(hub: &Arc<SwitchHub>, name: &str) -> Result<Self, UplinkError> {
        let mut tap = TapQueue::open(name, false)?;
        tap.set_offloads(offload::CSUM | offload::TSO4 | offload::TSO6 | offload::TSO_ECN);
        let poll_fd = tap.poll_fd();
        let port = hub.attach(
            &format!("uplink:{name}"),
            PortConfig {
                mac: [0; 6],
                vlan: None,
                uplink: true,
            },
            false,
            PortSink::Uplink(Mutex::new(tap)),
            Arc::new(NetStats::default()),
            None,
        )?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(UplinkError::Thread)?);
        let thread = {
            let hub = Arc::clone(hub);
            let port = Arc::clone(&port);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name(format!("uplink-{name}"))
                .spawn(move || run(&hub, &port, poll_fd, &stop))
        };
        let thread = match thread {
            Ok(thread) => thread,
            Err(e) => {
                hub.detach(port.number);
                return Err(UplinkError::Thread(e));
            }
        };
        Ok(Self {
            hub: Arc::clone(hub),
            port,
            stop,
            thread: Some(thread),
        })
    }

    /// The uplink's port (its counters).
    pub fn port(&self) -> &Arc<Port> {
        &self.port
    }

    /// Stops the thread and detaches the port (closing the tap).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Err(e) = self.stop.write(1) {
            log::warn!("uplink: cannot signal stop: {e}");
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("uplink thread panicked");
            }
        }
        self.hub.detach(self.port.number);
    }
}

impl std::ops::Drop for Uplink {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

fn run(hub: &SwitchHub, port: &Port, poll_fd: std::os::fd::RawFd, stop: &EventFd) {
    // Frames from the outside world go into guests from here: the worker filter.
    crate::sandbox::enter_worker();
    let PortSink::Uplink(tap) = &port.sink else {
        return;
    };
    let mut buffer = vec![0u8; MAX_GSO_FRAME.saturating_add(HEADER_LEN)];
    loop {
        match wait_readable(poll_fd, stop.as_raw_fd()) {
            Ok(Readable::First) => {}
            Ok(Readable::Second) => return,
            Err(e) => {
                log::error!("{}: {e}", port.name);
                return;
            }
        }
        let _ = lock(tap).events();
        loop {
            let iov = [libc::iovec {
                iov_base: buffer.as_mut_ptr().cast(),
                iov_len: buffer.len(),
            }];
            let Some(n) = lock(tap).read_frame(&iov) else {
                break;
            };
            let Some(frame) = buffer.get(HEADER_LEN..n) else {
                port.stats.dropped(Direction::Tx, Drop::ShortHeader);
                continue;
            };
            let header = NetHeader::parse(&buffer).unwrap_or_default();
            if header.check(frame.len(), u16::MAX).is_err() {
                port.stats.dropped(Direction::Tx, Drop::BadHeader);
                continue;
            }
            port.stats.sent(frame.len() as u64);
            if let Err(reason) = hub.transmit(port, &FrameRef::Bytes { header, frame }) {
                port.stats.dropped(Direction::Tx, reason);
            }
        }
    }
}
