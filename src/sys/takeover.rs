//! The start-up window for busy resources. During a live upgrade (`--takeover`, a minute) the
//! previous daemon process drains and exits while the new one starts: the images it locked,
//! the taps and the metrics port it holds are busy until then. After a crash (any start, 3 s)
//! the kernel may still be releasing the dead process's image locks (its io_uring is torn
//! down asynchronously). Inside the window the new process retries those instead of failing
//! the device; outside it (devices added at run time) nothing waits: a busy image or tap is an
//! error, as always.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::lock::lock;

/// Until when busy resources are retried (`None`: not at all).
static UNTIL: Mutex<Option<Instant>> = Mutex::new(None);

/// How often a busy resource is tried again.
const RETRY: Duration = Duration::from_millis(20);

/// Opens (`Some(how long)`) or closes (`None`) the window.
pub fn set_window(window: Option<Duration>) {
    *lock(&UNTIL) = window.and_then(|w| Instant::now().checked_add(w));
}

/// Runs `attempt` until it succeeds, fails with an error `busy` does not recognise, or the
/// window closes.
pub fn retry_while_busy<T, E>(
    mut attempt: impl FnMut() -> Result<T, E>,
    busy: impl Fn(&E) -> bool,
) -> Result<T, E> {
    loop {
        match attempt() {
            Err(e) if busy(&e) && lock(&UNTIL).is_some_and(|until| Instant::now() < until) => {
                // No event tells us when another process closes its fd: poll, briefly.
                std::thread::sleep(RETRY);
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_resources_are_retried_only_inside_the_window() {
        let mut tries = 0;
        let busy = |e: &i32| *e == libc::EBUSY;
        set_window(None);
        let r: Result<(), i32> = retry_while_busy(
            || {
                tries += 1;
                Err(libc::EBUSY)
            },
            busy,
        );
        assert_eq!((r, tries), (Err(libc::EBUSY), 1));
        set_window(Some(Duration::from_secs(10)));
        let mut tries = 0;
        let r = retry_while_busy(
            || {
                tries += 1;
                if tries < 3 {
                    Err(libc::EBUSY)
                } else {
                    Ok(tries)
                }
            },
            busy,
        );
        assert_eq!(r, Ok(3));
        // Other errors are not retried.
        let r: Result<(), i32> = retry_while_busy(|| Err(libc::ENOENT), busy);
        assert_eq!(r, Err(libc::ENOENT));
        set_window(None);
    }
}
