//! `blkload`: a vhost-user-blk load generator built on libblkio (the `blkio` crate), used by
//! `scripts/compare-qsd.sh` to drive novacrond and qemu-storage-daemon with the very same
//! client. Keeps `--qd` requests in flight on one queue for `--seconds`, random offsets,
//! and prints one JSON line: IOPS and latency percentiles. `--poll on` makes the client
//! busy-poll completions (no interrupts), so the backend's own cost decides the result.
//!
//! `cargo run --release --example blkload -- --socket S --rw randread --bs 4096 --qd 32 --seconds 5`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark tool: fail loudly

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};

struct Args {
    socket: String,
    write: bool,
    bs: usize,
    qd: usize,
    seconds: f64,
    /// Busy-poll the used ring instead of sleeping on interrupts (libblkio poll queue).
    poll: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        socket: String::new(),
        write: false,
        bs: 4096,
        qd: 1,
        seconds: 5.0,
        poll: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().expect("flag needs a value");
        match flag.as_str() {
            "--socket" => args.socket = value,
            "--rw" => args.write = value == "randwrite",
            "--bs" => args.bs = value.parse().unwrap(),
            "--qd" => args.qd = value.parse().unwrap(),
            "--seconds" => args.seconds = value.parse().unwrap(),
            "--poll" => args.poll = value == "on",
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(!args.socket.is_empty(), "--socket is required");
    args
}

fn main() {
    let args = parse_args();
    let mut blkio = Blkio::new("virtio-blk-vhost-user").unwrap();
    blkio.set_str("path", &args.socket).unwrap();
    blkio.connect().unwrap();
    let capacity = blkio.get_u64("capacity").unwrap();
    if args.poll {
        blkio.set_i32("num-queues", 0).unwrap();
        blkio.set_i32("num-poll-queues", 1).unwrap();
    } else {
        blkio.set_i32("num-queues", 1).unwrap();
    }
    let mut started = blkio.start().unwrap();
    let region = blkio.alloc_mem_region(args.qd * args.bs).unwrap();
    blkio.map_mem_region(&region).unwrap();
    let base = region.addr as *mut u8;
    // SAFETY: the region is qd*bs bytes, mapped, and only used as I/O buffers here.
    unsafe { std::ptr::write_bytes(base, 0xA5, args.qd * args.bs) };
    let q = if args.poll {
        &mut started.poll_queues[0]
    } else {
        &mut started.queues[0]
    };

    let blocks = capacity / args.bs as u64;
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next_offset = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % blocks) * args.bs as u64
    };
    let submit = |q: &mut blkio::Blkioq, slot: usize, offset: u64| {
        // SAFETY: slot < qd, so the buffer lies in the region; one request per slot at a time.
        let buf = unsafe { base.add(slot * args.bs) };
        if args.write {
            q.write(offset, buf, args.bs, slot, ReqFlags::empty());
        } else {
            q.read(offset, buf, args.bs, slot, ReqFlags::empty());
        }
    };

    let mut started_at = vec![Instant::now(); args.qd];
    let mut latencies: Vec<u32> = Vec::with_capacity(1 << 22);
    let warmup = Duration::from_millis(500);
    let run = Duration::from_secs_f64(args.seconds);
    let begin = Instant::now();
    for (slot, started) in started_at.iter_mut().enumerate() {
        *started = Instant::now();
        submit(q, slot, next_offset());
    }
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..args.qd).map(|_| MaybeUninit::uninit()).collect();
    let mut counted = 0u64;
    let mut measure_start = None;
    loop {
        let n = q.do_io(&mut completions, 1, None, None).unwrap();
        let now = Instant::now();
        let elapsed = now - begin;
        if elapsed >= warmup && measure_start.is_none() {
            measure_start = Some(now);
        }
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n entries.
            let c = unsafe { c.assume_init_ref() };
            assert_eq!(c.ret, 0, "I/O error");
            let slot = c.user_data;
            if measure_start.is_some() {
                latencies
                    .push(u32::try_from((now - started_at[slot]).as_nanos()).unwrap_or(u32::MAX));
                counted += 1;
            }
            if elapsed < warmup + run {
                started_at[slot] = Instant::now();
                submit(q, slot, next_offset());
            }
        }
        if elapsed >= warmup + run {
            break;
        }
    }
    let measured = measure_start.map_or(Duration::ZERO, |s| s.elapsed());
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |&ns| f64::from(ns) / 1000.0)
    };
    println!(
        "{{\"iops\":{:.0},\"p50_us\":{:.1},\"p99_us\":{:.1},\"requests\":{}}}",
        counted as f64 / measured.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        counted
    );
}
