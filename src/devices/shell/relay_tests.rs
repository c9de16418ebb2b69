//! The relay against a scripted front-end and handler on socket pairs.

use super::*;
use crate::devices::shell::memory_cap::{MemoryCapError, Pool, Tables};

fn raw(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&request.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// A relay for a device without inflight tracking, between a scripted front-end (`qemu`) and
/// handler, on its own thread.
fn plain_relay() -> (
    UnixStream,
    UnixStream,
    std::thread::JoinHandle<Result<(), RelayError>>,
) {
    let (qemu, front) = UnixStream::pair().unwrap();
    let (back, handler) = UnixStream::pair().unwrap();
    let relay = std::thread::spawn(move || {
        relay(
            front,
            back,
            |_| {},
            Hooks {
                inflight: None,
                log: &DirtyLog::default(),
                announce: &|_| {},
                kicker: None,
                memory: &mut MemoryCap::new(Pool::daemon(), u64::MAX),
                mapped: &Tables::default(),
            },
        )
    });
    (qemu, handler, relay)
}

#[test]
fn early_vring_enables_are_acked_held_and_replayed_after_set_features() {
    let (mut qemu, mut handler, relay) = plain_relay();
    let enable = [0u8, 0, 0, 0, 1, 0, 0, 0];
    // Early enable with NEED_REPLY: answered by the relay, not forwarded.
    qemu.write_all(&raw(SET_VRING_ENABLE, VERSION_1 | FLAG_NEED_REPLY, &enable))
        .unwrap();
    let mut reply = [0u8; 20];
    qemu.read_exact(&mut reply).unwrap();
    assert_eq!(
        &reply[..],
        &raw(SET_VRING_ENABLE, VERSION_1 | FLAG_REPLY, &[0; 8])[..]
    );
    // A normal request passes through, then SET_FEATURES and the held enable follow it.
    qemu.write_all(&raw(1, VERSION_1, &[])).unwrap();
    qemu.write_all(&raw(SET_FEATURES, VERSION_1, &[7; 8]))
        .unwrap();
    let mut seen = vec![0u8; 12 + 20 + 20];
    handler.read_exact(&mut seen).unwrap();
    assert_eq!(&seen[..12], &raw(1, VERSION_1, &[])[..]);
    assert_eq!(&seen[12..32], &raw(SET_FEATURES, VERSION_1, &[7; 8])[..]);
    assert_eq!(&seen[32..], &raw(SET_VRING_ENABLE, VERSION_1, &enable)[..]);
    // Replies go back; later enables pass straight through.
    handler
        .write_all(&raw(1, VERSION_1 | FLAG_REPLY, &[9; 8]))
        .unwrap();
    let mut back_reply = [0u8; 20];
    qemu.read_exact(&mut back_reply).unwrap();
    assert_eq!(back_reply[12..], [9; 8]);
    qemu.write_all(&raw(SET_VRING_ENABLE, VERSION_1, &enable))
        .unwrap();
    let mut passed = [0u8; 20];
    handler.read_exact(&mut passed).unwrap();
    assert_eq!(&passed[..], &raw(SET_VRING_ENABLE, VERSION_1, &enable)[..]);
    drop(qemu);
    relay.join().unwrap().unwrap();
}

#[test]
fn a_running_rings_address_repeated_with_its_log_flag_stays_here() {
    let (mut qemu, mut handler, relay) = plain_relay();
    let mut addr = vec![0u8; 40];
    addr[8] = 0x10; // descriptor table
    let flags = VERSION_1 | FLAG_NEED_REPLY;
    qemu.write_all(&raw(SET_VRING_ADDR, VERSION_1, &addr))
        .unwrap();
    // Migration starts: the same addresses with VHOST_VRING_F_LOG, acknowledged here.
    let mut logged = addr.clone();
    logged[4] = 1;
    qemu.write_all(&raw(SET_VRING_ADDR, flags, &logged))
        .unwrap();
    let ack = read_message(&mut qemu).unwrap().unwrap();
    assert_eq!(ack.request(), SET_VRING_ADDR);
    // After the ring stops, or a reset, the same addresses are a new start: passed on.
    for message in [
        raw(GET_VRING_BASE, VERSION_1, &[0; 8]),
        raw(SET_VRING_ADDR, VERSION_1, &addr),
        raw(RESET_DEVICE, VERSION_1, &[]),
        raw(SET_VRING_ADDR, VERSION_1, &addr),
    ] {
        qemu.write_all(&message).unwrap();
    }
    let seen: Vec<u32> = (0..5)
        .map(|_| read_message(&mut handler).unwrap().unwrap().request())
        .collect();
    let want = [
        SET_VRING_ADDR,
        GET_VRING_BASE,
        SET_VRING_ADDR,
        RESET_DEVICE,
        SET_VRING_ADDR,
    ];
    assert_eq!(seen, want);
    drop(qemu);
    relay.join().unwrap().unwrap();
}

#[test]
fn send_rarp_announces_the_mac_here_and_is_acknowledged() {
    let (mut qemu, front) = UnixStream::pair().unwrap();
    let (back, mut handler) = UnixStream::pair().unwrap();
    let (heard, macs) = std::sync::mpsc::channel();
    let relay = std::thread::spawn(move || {
        let announce = move |mac| heard.send(mac).unwrap();
        relay(
            front,
            back,
            |_| {},
            Hooks {
                inflight: None,
                log: &DirtyLog::default(),
                announce: &announce,
                kicker: None,
                memory: &mut MemoryCap::new(Pool::daemon(), u64::MAX),
                mapped: &Tables::default(),
            },
        )
    });
    let mac = [0x52, 0x54, 0, 0, 2, 0x0b];
    let mut payload = mac.to_vec();
    payload.extend_from_slice(&[0, 0]);
    qemu.write_all(&raw(SEND_RARP, VERSION_1 | FLAG_NEED_REPLY, &payload))
        .unwrap();
    let ack = read_message(&mut qemu).unwrap().unwrap();
    assert_eq!(ack.request(), SEND_RARP);
    // Announced before the acknowledgement went out.
    assert_eq!(macs.try_recv().ok(), Some(mac));
    // A short payload announces nothing (and is still answered); the handler, which
    // refuses SEND_RARP, never sees either.
    qemu.write_all(&raw(SEND_RARP, VERSION_1 | FLAG_NEED_REPLY, &[1, 2]))
        .unwrap();
    assert_eq!(
        read_message(&mut qemu).unwrap().unwrap().request(),
        SEND_RARP
    );
    qemu.write_all(&raw(GET_VRING_BASE, VERSION_1, &[0; 8]))
        .unwrap();
    assert_eq!(
        read_message(&mut handler).unwrap().unwrap().request(),
        GET_VRING_BASE
    );
    drop(qemu);
    relay.join().unwrap().unwrap();
    assert!(macs.try_recv().is_err(), "a short payload was announced");
}

#[test]
fn a_front_end_cannot_grow_the_relays_state() {
    let (mut qemu, _handler, relay) = plain_relay();
    let enable = [0u8, 0, 0, 0, 1, 0, 0, 0];
    for _ in 0..=MAX_EARLY_ENABLES {
        if qemu
            .write_all(&raw(SET_VRING_ENABLE, VERSION_1, &enable))
            .is_err()
        {
            break;
        }
    }
    assert!(matches!(relay.join().unwrap(), Err(RelayError::Excess(_))));
}

/// Plays the handler's part after a memory message: reads the relay's GET_FEATURES probe and
/// answers it.
fn answer_probe(handler: &mut UnixStream) {
    let mut probe = [0u8; 12];
    handler.read_exact(&mut probe).unwrap();
    assert_eq!(&probe[..], &raw(GET_FEATURES, VERSION_1, &[])[..]);
    handler
        .write_all(&raw(GET_FEATURES, VERSION_1 | FLAG_REPLY, &[0; 8]))
        .unwrap();
}

#[test]
fn identical_memory_regions_reach_the_handler_once() {
    let (mut qemu, mut handler, relay) = plain_relay();
    let mut region = vec![0u8; 40];
    region[8] = 0x10; // guest address
    region[16] = 0x20; // size
    let flags = VERSION_1 | FLAG_NEED_REPLY;
    // Each ADD_MEM_REG carries its memory file (at least as large as the region).
    let memory = tempfile::tempfile().unwrap();
    memory.set_len(0x1000).unwrap();
    for _ in 0..2 {
        qemu.send_with_fds(
            &[raw(ADD_MEM_REG, flags, &region).as_slice()],
            &[memory.as_raw_fd()],
        )
        .unwrap();
    }
    let mut seen = vec![0u8; 52];
    handler.read_exact(&mut seen).unwrap();
    assert_eq!(&seen[..], &raw(ADD_MEM_REG, flags, &region)[..]);
    answer_probe(&mut handler);
    let mut ack = [0u8; 20];
    qemu.read_exact(&mut ack).unwrap(); // the duplicate is answered by the relay
    assert_eq!(
        &ack[..],
        &raw(ADD_MEM_REG, VERSION_1 | FLAG_REPLY, &[0; 8])[..]
    );
    qemu.write_all(&raw(REM_MEM_REG, flags, &region)).unwrap();
    qemu.read_exact(&mut ack).unwrap(); // one user left: answered by the relay
    qemu.write_all(&raw(REM_MEM_REG, flags, &region)).unwrap();
    handler.read_exact(&mut seen).unwrap();
    assert_eq!(&seen[..], &raw(REM_MEM_REG, flags, &region)[..]);
    answer_probe(&mut handler);
    qemu.write_all(&raw(24, VERSION_1, &[])).unwrap();
    let mut next = [0u8; 12];
    handler.read_exact(&mut next).unwrap();
    assert_eq!(&next[..], &raw(24, VERSION_1, &[])[..]);
    drop(qemu);
    relay.join().unwrap().unwrap();
}

#[test]
fn memory_messages_count_what_the_handler_really_maps() {
    let (qemu, front) = UnixStream::pair().unwrap();
    let (back, mut handler) = UnixStream::pair().unwrap();
    let pool: &'static Pool = Box::leak(Box::new(Pool::new(1 << 40)));
    // The tables the handler installs (the backend's `update_memory` in the daemon).
    let tables = std::sync::Arc::new(Tables::default());
    let relay = {
        let tables = std::sync::Arc::clone(&tables);
        std::thread::spawn(move || {
            let mut memory = MemoryCap::new(pool, 0x3000);
            let hooks = Hooks {
                inflight: None,
                log: &DirtyLog::default(),
                announce: &|_| {},
                kicker: None,
                memory: &mut memory,
                mapped: &tables,
            };
            relay(front, back, |_| {}, hooks)
        })
    };
    let install = |sizes: &[usize]| {
        let ranges: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| (vm_memory::GuestAddress((i as u64) << 20), size))
            .collect();
        let table = std::sync::Arc::new(crate::vring::GuestMemory::from_ranges(&ranges).unwrap());
        tables.installed(&table).unwrap();
        table
    };
    let memory = tempfile::tempfile().unwrap();
    memory.set_len(0x2000).unwrap();
    let fd = memory.as_raw_fd();
    // The relay reads the front-end's next message only once the handler is done with a
    // memory message; a message reaching the handler after one says the relay settled.
    let marker = raw(24, VERSION_1, &[]);
    let settled = |handler: &mut UnixStream, qemu: &UnixStream| {
        (&*qemu).write_all(&marker).unwrap();
        let mut next = [0u8; 12];
        handler.read_exact(&mut next).unwrap();
        assert_eq!(&next[..], &marker[..]);
    };
    let table = |sizes: &[u64]| {
        let mut table = vec![0u8; 8 + 32 * sizes.len()];
        table[0] = sizes.len() as u8;
        for (i, size) in sizes.iter().enumerate() {
            let at = 8 + i * 32;
            table[at..at + 8].copy_from_slice(&((i as u64 + 1) << 20).to_le_bytes());
            table[at + 8..at + 16].copy_from_slice(&size.to_le_bytes());
        }
        table
    };
    // Region A, 0x2000 bytes, added twice (QEMU's multi-queue NIC): passed on once.
    let mut add = vec![0u8; 40];
    add[16..24].copy_from_slice(&0x2000u64.to_le_bytes());
    for _ in 0..2 {
        qemu.send_with_fds(&[raw(ADD_MEM_REG, VERSION_1, &add).as_slice()], &[fd])
            .unwrap();
    }
    let mut seen = vec![0u8; 52];
    handler.read_exact(&mut seen).unwrap();
    let current = install(&[0x2000]);
    answer_probe(&mut handler);
    settled(&mut handler, &qemu);
    assert_eq!(pool.mapped(), 0x2000);
    // A table the handler does not install keeps the old mapping, and the count stays at
    // 0x2000. (vhost-user-backend 0.24 ends the connection on a refused table; the count
    // does not rely on that.)
    let small = table(&[0x1000]);
    qemu.send_with_fds(&[raw(SET_MEM_TABLE, VERSION_1, &small).as_slice()], &[fd])
        .unwrap();
    let mut seen = vec![0u8; 12 + small.len()];
    handler.read_exact(&mut seen).unwrap();
    answer_probe(&mut handler);
    settled(&mut handler, &qemu);
    assert_eq!(pool.mapped(), 0x2000);
    // A table the handler maps: 0x1000 + 0x1000 replace region A.
    let two = table(&[0x1000, 0x1000]);
    qemu.send_with_fds(&[raw(SET_MEM_TABLE, VERSION_1, &two).as_slice()], &[fd, fd])
        .unwrap();
    let mut seen = vec![0u8; 12 + two.len()];
    handler.read_exact(&mut seen).unwrap();
    assert_eq!(&seen[..], &raw(SET_MEM_TABLE, VERSION_1, &two)[..]);
    // Meanwhile the old and the new table are both mapped, and counted in the pool.
    assert_eq!(pool.mapped(), 0x4000);
    let current = {
        let new = install(&[0x1000, 0x1000]);
        drop(current);
        new
    };
    answer_probe(&mut handler);
    settled(&mut handler, &qemu);
    assert_eq!(pool.mapped(), 0x2000);
    // Region A again is new after the table (the handler forgot it): 0x4000 > 0x3000.
    qemu.send_with_fds(&[raw(ADD_MEM_REG, VERSION_1, &add).as_slice()], &[fd])
        .unwrap();
    assert!(matches!(
        relay.join().unwrap(),
        Err(RelayError::Memory(MemoryCapError::Connection {
            asked: 0x4000,
            limit: 0x3000
        }))
    ));
    // The handler never saw it.
    drop(qemu);
    let mut rest = Vec::new();
    handler.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    drop(current);
}

#[test]
fn inflight_messages_are_answered_by_the_relay() {
    let (mut qemu, front) = UnixStream::pair().unwrap();
    let (back, mut handler) = UnixStream::pair().unwrap();
    let slot = std::sync::Arc::new(InflightSlot::new(2, 256));
    let relay = {
        let slot = std::sync::Arc::clone(&slot);
        std::thread::spawn(move || {
            relay(
                front,
                back,
                |_| {},
                Hooks {
                    inflight: Some(&slot),
                    log: &DirtyLog::default(),
                    announce: &|_| {},
                    kicker: crate::sys::kick::Kicker::new().ok(),
                    memory: &mut MemoryCap::new(Pool::daemon(), u64::MAX),
                    mapped: &Tables::default(),
                },
            )
        })
    };
    let mut asked = vec![0u8; 24];
    asked[16] = 2; // queues
    asked[18..20].copy_from_slice(&128u16.to_le_bytes());
    qemu.write_all(&raw(GET_INFLIGHT_FD, VERSION_1, &asked))
        .unwrap();
    let reply = read_message(&mut qemu).unwrap().unwrap();
    assert_eq!(reply.request(), GET_INFLIGHT_FD);
    assert_eq!(reply.flags(), VERSION_1 | FLAG_REPLY);
    assert_eq!(reply.payload.len(), 24);
    assert_eq!(reply.files.len(), 1, "the region's fd");
    let size = u64::from_le_bytes(reply.payload[..8].try_into().unwrap());
    assert_eq!(reply.files[0].metadata().unwrap().len(), size);
    // The front-end hands it back (as after our restart): acknowledged here.
    qemu.send_with_fds(
        &[raw(SET_INFLIGHT_FD, VERSION_1 | FLAG_NEED_REPLY, &reply.payload).as_slice()],
        &[reply.files[0].as_raw_fd()],
    )
    .unwrap();
    let ack = read_message(&mut qemu).unwrap().unwrap();
    assert_eq!(
        (ack.request(), ack.payload.as_slice()),
        (SET_INFLIGHT_FD, &[0u8; 8][..])
    );
    assert!(slot.current().is_some());
    // Neither reached the handler: the next thing it sees is the next message.
    qemu.write_all(&raw(1, VERSION_1, &[])).unwrap();
    assert_eq!(read_message(&mut handler).unwrap().unwrap().request(), 1);
    // Queue 0's kick fd gets a kick of our own (requests left in flight are resubmitted),
    // and another when it is enabled. Queue 1's is blocking and full (a hostile front-end
    // cleared O_NONBLOCK and filled the counter): its kick is given up, and the relay goes on.
    use crate::sys::kick::testing::{count, eventfd, fill};
    let (good, full) = (eventfd(0), eventfd(0));
    fill(&full);
    qemu.write_all(&raw(SET_FEATURES, VERSION_1, &[0; 8]))
        .unwrap();
    for (queue, fd) in [(0u8, &good), (1, &full)] {
        qemu.send_with_fds(
            &[raw(SET_VRING_KICK, VERSION_1, &[queue, 0, 0, 0, 0, 0, 0, 0]).as_slice()],
            &[fd.as_raw_fd()],
        )
        .unwrap();
    }
    handler
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut passed: Vec<u32> = (0..3)
        .map(|_| read_message(&mut handler).unwrap().unwrap().request())
        .collect();
    // The relay made queue 1's fd non-blocking when it passed it on; the front-end clears
    // that again (the open file is shared), so a plain write of the next kick would block.
    // SAFETY: F_SETFL on an fd we own.
    let cleared = unsafe { libc::fcntl(full.as_raw_fd(), libc::F_SETFL, 0) };
    assert_eq!(cleared, 0);
    for queue in [0u8, 1] {
        qemu.write_all(&raw(
            SET_VRING_ENABLE,
            VERSION_1,
            &[queue, 0, 0, 0, 1, 0, 0, 0],
        ))
        .unwrap();
    }
    qemu.write_all(&raw(1, VERSION_1, &[])).unwrap();
    passed.extend((0..3).map(|_| read_message(&mut handler).unwrap().unwrap().request()));
    assert_eq!(
        passed,
        [
            SET_FEATURES,
            SET_VRING_KICK,
            SET_VRING_KICK,
            SET_VRING_ENABLE,
            SET_VRING_ENABLE,
            1
        ],
        "a kick fd that cannot take a kick holds nothing up"
    );
    assert_eq!(count(&good), 2, "one kick at SET_VRING_KICK, one at enable");
    assert_eq!(count(&full), u64::MAX - 1, "no kick landed in the full one");
    // A region for more queues than the device has ends the connection.
    asked[16] = 3;
    qemu.write_all(&raw(GET_INFLIGHT_FD, VERSION_1, &asked))
        .unwrap();
    assert!(matches!(
        relay.join().unwrap(),
        Err(RelayError::Inflight(_))
    ));
}

#[test]
fn descriptors_pass_through_and_oversized_messages_end_the_relay() {
    let (qemu, mut handler, relay) = plain_relay();
    let file = tempfile::tempfile().unwrap();
    // A request the relay does not look into passes with its fd.
    qemu.send_with_fds(
        &[raw(24, VERSION_1, &[1, 2]).as_slice()],
        &[file.as_raw_fd()],
    )
    .unwrap();
    let got = read_message(&mut handler).unwrap().unwrap();
    assert_eq!(
        (got.request(), got.payload.as_slice(), got.files.len()),
        (24, &[1u8, 2][..], 1)
    );
    let mut qemu = qemu;
    qemu.write_all(&raw(6, VERSION_1, &[])[..8]).unwrap();
    qemu.write_all(&(0x2000u32).to_le_bytes()).unwrap();
    assert!(matches!(
        relay.join().unwrap(),
        Err(RelayError::Malformed(0x2000))
    ));
}

#[test]
fn a_get_features_the_handler_would_not_answer_ends_the_relay() {
    // The relay tells its probe's reply apart by counting the front-end's GET_FEATURES: one
    // the handler would refuse (and so never answer) must not be counted.
    for (flags, payload) in [
        (VERSION_1, &[0u8; 8][..]),
        (VERSION_1 | FLAG_REPLY, &[][..]),
    ] {
        let (mut qemu, _handler, relay) = plain_relay();
        qemu.write_all(&raw(GET_FEATURES, flags, payload)).unwrap();
        assert!(matches!(
            relay.join().unwrap(),
            Err(RelayError::UnanswerableGetFeatures)
        ));
    }
}

#[test]
fn the_front_ends_own_get_features_reply_passes_and_the_probes_does_not() {
    let (mut qemu, mut handler, relay) = plain_relay();
    // GET_FEATURES, then a memory message at once, without waiting for the reply.
    qemu.write_all(&raw(GET_FEATURES, VERSION_1, &[])).unwrap();
    let mut table = vec![0u8; 8];
    table[0] = 0; // no regions
    qemu.write_all(&raw(SET_MEM_TABLE, VERSION_1, &table))
        .unwrap();
    let mut seen = vec![0u8; 12 + 20 + 12];
    handler.read_exact(&mut seen).unwrap();
    assert_eq!(&seen[..12], &raw(GET_FEATURES, VERSION_1, &[])[..]);
    assert_eq!(&seen[12..32], &raw(SET_MEM_TABLE, VERSION_1, &table)[..]);
    assert_eq!(
        &seen[32..],
        &raw(GET_FEATURES, VERSION_1, &[])[..],
        "the probe"
    );
    // The handler answers in order: the front-end's request first, then the probe.
    handler
        .write_all(&raw(GET_FEATURES, VERSION_1 | FLAG_REPLY, &[0xaa; 8]))
        .unwrap();
    handler
        .write_all(&raw(GET_FEATURES, VERSION_1 | FLAG_REPLY, &[0xbb; 8]))
        .unwrap();
    let mut reply = [0u8; 20];
    qemu.read_exact(&mut reply).unwrap();
    assert_eq!(
        &reply[..],
        &raw(GET_FEATURES, VERSION_1 | FLAG_REPLY, &[0xaa; 8])[..]
    );
    // Nothing else comes back (the probe's reply was kept), and the relay reads on.
    qemu.write_all(&raw(24, VERSION_1, &[])).unwrap();
    let mut next = [0u8; 12];
    handler.read_exact(&mut next).unwrap();
    assert_eq!(&next[..], &raw(24, VERSION_1, &[])[..]);
    qemu.set_nonblocking(true).unwrap();
    assert!(
        qemu.read(&mut reply).is_err(),
        "the probe's reply reached the front-end"
    );
    drop(qemu);
    relay.join().unwrap().unwrap();
}
