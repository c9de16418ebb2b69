//! The busy-poll group: one thread that polls, in turn, every queue whose device asked for
//! busy polling (`poll=busy`), as DPDK's forwarding lcores and SPDK's pollers do, instead of
//! one spinning thread per queue.
//!
//! ```text
//!  worker event (kick) ─▶ worker serves ─▶ wants the group? ─▶ join(member)
//!  group thread: loop { for each member: one pass ─▶ Worked | Drained | Idle | Leave (dropped) }
//! ```
//!
//! Why: with a thread per queue, busy queues that share a core hand it to each other at every
//! empty look. Measured with two switch ports forwarding 64-byte frames to each other on one
//! core, 32% of the element's time went to the scheduler (`finish_task_switch`). One thread
//! polling every member never sleeps or switches while any of them is busy.
//!
//! A member is a closure doing one pass over its queues that never waits for work or for its
//! worker (it skips a worker whose own event thread holds it; it does take the short ring and
//! switch locks any delivery takes), and says whether it did work (`Worked`: maybe more at
//! once; `Drained`: took all there was), found none, or leaves (its
//! connection ended, its queue stopped, or its poll budget ran out and it went back to kicks;
//! its next event joins it again). A member that panics is dropped, and the others go on. The
//! group thread is started by the first join and sleeps while it has no member.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

use crate::lock::lock;

/// What one pass of a member did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Served something, and there may be more at once (a full burst).
    Worked,
    /// Served all there was (a part burst): its producer is likely still writing the next
    /// one, and a look at once would take the ring's lines from the producer's core while it
    /// writes them.
    Drained,
    /// Found nothing (or its worker was busy elsewhere): look again next round.
    Idle,
    /// Done: drop the member.
    Leave,
}

/// One member: a pass over its queues.
pub type Member = Box<dyn FnMut() -> Pass + Send>;

/// Members waiting to be picked up by the group thread.
struct Joining {
    members: Mutex<Vec<Member>>,
    any: AtomicBool,
    wake: Condvar,
}

/// The group, started by the first [`join`]; `None` if its thread could not be started.
fn group() -> Option<&'static Joining> {
    static GROUP: OnceLock<Option<&'static Joining>> = OnceLock::new();
    *GROUP.get_or_init(|| {
        let joining: &'static Joining = Box::leak(Box::new(Joining {
            members: Mutex::new(Vec::new()),
            any: AtomicBool::new(false),
            wake: Condvar::new(),
        }));
        // Started from a queue thread, it inherits that thread's worker filter.
        let inherited = crate::sandbox::worker_filtered();
        match std::thread::Builder::new()
            .name("busy-poll".to_string())
            .spawn(move || run(joining, inherited))
        {
            Ok(_) => Some(joining),
            Err(e) => {
                log::error!("cannot start the busy-poll thread ({e}): busy queues poll alone");
                None
            }
        }
    })
}

/// Adds `member` to the group; false if the group has no thread (the caller polls alone).
pub fn join(member: Member) -> bool {
    let Some(joining) = group() else {
        return false;
    };
    lock(&joining.members).push(member);
    joining.any.store(true, Ordering::Release);
    joining.wake.notify_one();
    true
}

/// CPU pauses (`spin_loop`, tens of nanoseconds each) after a round whose members took only
/// part bursts (see `run`).
const DRAINED_PAUSES: u32 = 6;

fn run(joining: &'static Joining, inherited: bool) {
    // It serves guest queues: the worker filter, as on every queue thread.
    if inherited {
        crate::sandbox::inherit_worker();
    } else {
        crate::sandbox::enter_worker();
    }
    let mut members: Vec<Member> = Vec::new();
    // The most members polled at once so far (logged when it grows).
    let mut most = 0usize;
    loop {
        if members.is_empty() || joining.any.load(Ordering::Acquire) {
            let mut waiting = lock(&joining.members);
            while members.is_empty() && waiting.is_empty() {
                waiting = match joining.wake.wait(waiting) {
                    Ok(guard) => guard,
                    Err(poisoned) => poisoned.into_inner(),
                };
            }
            joining.any.store(false, Ordering::Release);
            let joined = waiting.len();
            members.append(&mut waiting);
            drop(waiting);
            if members.len() > most {
                // Only at a new high of members: queues leave and rejoin at a tenant's will
                // (a QoS hold, a ring error, a spent budget), and that must not flood the log.
                most = members.len();
                log::info!("busy-poll: {joined} queue(s) joined the group ({most} polled)");
            }
        }
        // Whether a member may have more at once: if none has, the round ends with a pause,
        // which spaces the next looks: a look steals the ring's lines from a producer still
        // writing them, and a longer wait after part bursts lets the next batch fill. Paired
        // runs, 64-byte frames: DRAINED_PAUSES 1 -> 6 took a producer-bound drain from 27.4 to
        // 29.2 Mpps (DPDK 28.4-29.3) and a latency-bound forwarding loop from 12.06 to 11.79
        // (12 pauses: about the same; an idle round's pause longer: drain slower).
        let mut more = false;
        let mut drained = false;
        members.retain_mut(|member| {
            // One tenant's bug must not end every tenant's polling: a member that panics
            // leaves (its worker's lock is poisoned, so its queue is served no more).
            let pass = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut *member));
            match pass {
                Ok(Pass::Worked) => {
                    more = true;
                    true
                }
                Ok(Pass::Drained) => {
                    drained = true;
                    true
                }
                Ok(Pass::Idle) => true,
                Ok(Pass::Leave) => false,
                Err(_) => {
                    log::error!("busy-poll: a member panicked; it leaves the group");
                    false
                }
            }
        });
        if !more {
            let pauses = if drained { DRAINED_PAUSES } else { 1 };
            for _ in 0..pauses {
                std::hint::spin_loop();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn members_take_turns_until_they_leave() {
        // Two members: one works five passes then leaves, the other idles until the first
        // has left, then leaves too; each reports its passes.
        let (done_tx, done_rx) = mpsc::channel();
        let first_left = std::sync::Arc::new(AtomicBool::new(false));
        let (left, tx) = (std::sync::Arc::clone(&first_left), done_tx.clone());
        let mut passes = 0u32;
        assert!(join(Box::new(move || {
            passes += 1;
            if passes == 5 {
                left.store(true, Ordering::Release);
                tx.send(("worker", passes)).unwrap();
                return Pass::Leave;
            }
            Pass::Worked
        })));
        let mut idle = 0u32;
        assert!(join(Box::new(move || {
            idle += 1;
            if first_left.load(Ordering::Acquire) {
                done_tx.send(("idler", idle)).unwrap();
                return Pass::Leave;
            }
            Pass::Idle
        })));
        let mut got: Vec<_> = (0..2)
            .map(|_| {
                done_rx
                    .recv_timeout(std::time::Duration::from_secs(10))
                    .unwrap()
            })
            .collect();
        got.sort();
        assert_eq!(
            got[1],
            ("worker", 5),
            "the worker had exactly its passes: {got:?}"
        );
        assert_eq!(got[0].0, "idler");
        assert!(got[0].1 >= 1, "{got:?}");
        // Both left: nothing reports again.
        assert!(done_rx
            .recv_timeout(std::time::Duration::from_millis(50))
            .is_err());
    }

    #[test]
    fn a_member_that_panics_leaves_and_the_others_go_on() {
        assert!(join(Box::new(|| panic!("a tenant's bug"))));
        let (done_tx, done_rx) = mpsc::channel();
        let mut passes = 0u32;
        assert!(join(Box::new(move || {
            passes += 1;
            if passes == 3 {
                done_tx.send(passes).unwrap();
                return Pass::Leave;
            }
            Pass::Worked
        })));
        assert_eq!(
            done_rx.recv_timeout(std::time::Duration::from_secs(10)),
            Ok(3)
        );
    }
}
