//! `blkload`: a vhost-user-blk load generator built on libblkio (the `blkio` crate), used by
//! `scripts/compare-qsd.sh` to drive novacrond and qemu-storage-daemon with the very same
//! client. Keeps `--qd` requests in flight on each of `--queues` queues (default 1; one thread
//! per queue) for `--seconds`, random offsets, and prints one JSON line: IOPS (all queues)
//! and latency percentiles. `--poll on` makes the client
//! busy-poll completions (no interrupts), so the backend's own cost decides the result.
//!
//! `--alternate SOCKET_B` compares two devices (one queue each) under the same conditions:
//! the load moves between `--socket` (A) and B every `--slice-ms` (default 50), and each B
//! slice is compared with the mean of the A slices before and after it, so the speed of a
//! VM that shifts for seconds at a time cancels out. Prints the median and quartiles of
//! those B/A ratios. One position may favour its device by a few percent in a run (it
//! varies between runs): compare two configurations both ways round (`feature-cost.sh`).
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
    /// Queues, each driven by its own thread with `qd` requests in flight.
    queues: usize,
    /// A second device to alternate with (`--alternate`).
    alternate: Option<String>,
    /// Length of one alternation slice.
    slice: Duration,
}

fn parse_args() -> Args {
    let mut args = Args {
        socket: String::new(),
        write: false,
        bs: 4096,
        qd: 1,
        seconds: 5.0,
        poll: false,
        queues: 1,
        alternate: None,
        slice: Duration::from_millis(50),
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
            "--queues" => args.queues = value.parse().unwrap(),
            "--alternate" => args.alternate = Some(value),
            "--slice-ms" => args.slice = Duration::from_millis(value.parse().unwrap()),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(!args.socket.is_empty(), "--socket is required");
    args
}

/// What one queue's thread measured.
struct Measured {
    latencies: Vec<u32>,
    counted: u64,
    measured: Duration,
}

fn main() {
    let args = parse_args();
    if let Some(b) = args.alternate.clone() {
        alternate(&args, &b);
        return;
    }
    let Device {
        blkio,
        queues: qs,
        base,
        capacity,
    } = open(&args, &args.socket, args.queues);
    let per_queue = args.qd * args.bs;
    let args = &args;
    let results: Vec<Measured> = std::thread::scope(|scope| {
        let threads: Vec<_> = qs
            .into_iter()
            .enumerate()
            .map(|(i, q)| {
                // Each queue's buffers: its own qd*bs slice of the region.
                let buffers = base + i * per_queue;
                scope.spawn(move || drive(args, q, buffers, capacity, i as u64))
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let counted: u64 = results.iter().map(|m| m.counted).sum();
    let iops: f64 = results
        .iter()
        .map(|m| m.counted as f64 / m.measured.as_secs_f64().max(1e-9))
        .sum();
    let mut latencies: Vec<u32> = results.into_iter().flat_map(|m| m.latencies).collect();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |&ns| f64::from(ns) / 1000.0)
    };
    println!(
        "{{\"iops\":{:.0},\"p50_us\":{:.1},\"p99_us\":{:.1},\"requests\":{}}}",
        iops,
        pct(0.50),
        pct(0.99),
        counted
    );
    drop(blkio);
}

/// Keeps `qd` requests in flight on `q` (buffers at address `buffers`) for the run.
fn drive(args: &Args, mut q: blkio::Blkioq, buffers: usize, capacity: u64, seed: u64) -> Measured {
    let q = &mut q;
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15 ^ (seed.wrapping_mul(0x2545_F491_4F6C_DD1D));

    let mut started_at = vec![Instant::now(); args.qd];
    let mut latencies: Vec<u32> = Vec::with_capacity(1 << 22);
    let warmup = Duration::from_millis(500);
    let run = Duration::from_secs_f64(args.seconds);
    let begin = Instant::now();
    for (slot, started) in started_at.iter_mut().enumerate() {
        *started = Instant::now();
        submit(args, q, buffers, capacity, slot, &mut rng);
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
                submit(args, q, buffers, capacity, slot, &mut rng);
            }
        }
        if elapsed >= warmup + run {
            break;
        }
    }
    Measured {
        latencies,
        counted,
        measured: measure_start.map_or(Duration::ZERO, |s| s.elapsed()),
    }
}

/// A started device: `queues` queues (poll queues with `--poll on`) and a region of
/// `queues * qd * bs` bytes of buffers at `base`, filled with 0xA5.
struct Device {
    blkio: Blkio,
    queues: Vec<blkio::Blkioq>,
    base: usize,
    capacity: u64,
}

fn open(args: &Args, socket: &str, queues: usize) -> Device {
    let mut blkio = Blkio::new("virtio-blk-vhost-user").unwrap();
    blkio.set_str("path", socket).unwrap();
    blkio.connect().unwrap();
    let capacity = blkio.get_u64("capacity").unwrap();
    let count = i32::try_from(queues).unwrap();
    if args.poll {
        blkio.set_i32("num-queues", 0).unwrap();
        blkio.set_i32("num-poll-queues", count).unwrap();
    } else {
        blkio.set_i32("num-queues", count).unwrap();
    }
    let mut started = blkio.start().unwrap();
    let len = queues * args.qd * args.bs;
    let region = blkio.alloc_mem_region(len).unwrap();
    blkio.map_mem_region(&region).unwrap();
    // SAFETY: the region is `len` bytes, mapped, and only used as I/O buffers here.
    unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0xA5, len) };
    let queues = if args.poll {
        std::mem::take(&mut started.poll_queues)
    } else {
        std::mem::take(&mut started.queues)
    };
    Device {
        blkio,
        queues,
        base: region.addr,
        capacity,
    }
}

/// Submits one request of slot `slot` (its buffer at `base + slot * bs`) at a random
/// offset drawn from `rng`.
fn submit(
    args: &Args,
    q: &mut blkio::Blkioq,
    base: usize,
    capacity: u64,
    slot: usize,
    rng: &mut u64,
) {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    let offset = (*rng % (capacity / args.bs as u64)) * args.bs as u64;
    // SAFETY: slot < qd, so the buffer lies in this queue's slice of the region; one request
    // per slot at a time.
    let buf = unsafe { (base as *mut u8).add(slot * args.bs) };
    if args.write {
        q.write(offset, buf, args.bs, slot, ReqFlags::empty());
    } else {
        q.read(offset, buf, args.bs, slot, ReqFlags::empty());
    }
}

/// Keeps `qd` requests in flight on `device`'s queue for `slice`, then lets the last ones
/// complete; returns requests per second over the whole slice.
fn run_slice(args: &Args, device: &mut Device, rng: &mut u64, slice: Duration) -> f64 {
    let (base, capacity) = (device.base, device.capacity);
    let q = device.queues.first_mut().unwrap();
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..args.qd).map(|_| MaybeUninit::uninit()).collect();
    let begin = Instant::now();
    for slot in 0..args.qd {
        submit(args, q, base, capacity, slot, rng);
    }
    let (mut done, mut in_flight) = (0u64, args.qd);
    while in_flight > 0 {
        let n = q.do_io(&mut completions, 1, None, None).unwrap();
        let more = begin.elapsed() < slice;
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n entries.
            let c = unsafe { c.assume_init_ref() };
            assert_eq!(c.ret, 0, "I/O error");
            done += 1;
            if more {
                submit(args, q, base, capacity, c.user_data, rng);
            } else {
                in_flight -= 1;
            }
        }
    }
    done as f64 / begin.elapsed().as_secs_f64()
}

/// `--alternate`: A, B, A, B, ..., A slices; each B against the mean of its neighbours.
fn alternate(args: &Args, b_socket: &str) {
    assert_eq!(args.queues, 1, "--alternate drives one queue per device");
    let mut a = open(args, &args.socket, 1);
    let mut b = open(args, b_socket, 1);
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    // Warm both up.
    run_slice(args, &mut a, &mut rng, Duration::from_millis(300));
    run_slice(args, &mut b, &mut rng, Duration::from_millis(300));
    let pairs = ((args.seconds / 2.0) / args.slice.as_secs_f64()).max(1.0) as usize;
    let mut a_rates = vec![run_slice(args, &mut a, &mut rng, args.slice)];
    let mut b_rates = Vec::with_capacity(pairs);
    for _ in 0..pairs {
        b_rates.push(run_slice(args, &mut b, &mut rng, args.slice));
        a_rates.push(run_slice(args, &mut a, &mut rng, args.slice));
    }
    let mut ratios: Vec<f64> = b_rates
        .iter()
        .enumerate()
        .map(|(i, b)| b / ((a_rates[i] + a_rates[i + 1]) / 2.0))
        .collect();
    ratios.sort_by(f64::total_cmp);
    let q = |v: &[f64], p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    let mut a_sorted = a_rates.clone();
    a_sorted.sort_by(f64::total_cmp);
    let mut b_sorted = b_rates.clone();
    b_sorted.sort_by(f64::total_cmp);
    println!(
        "{{\"pairs\":{},\"ratio_p25\":{:.4},\"ratio_median\":{:.4},\"ratio_p75\":{:.4},\"a_iops\":{:.0},\"b_iops\":{:.0}}}",
        ratios.len(),
        q(&ratios, 0.25),
        q(&ratios, 0.5),
        q(&ratios, 0.75),
        q(&a_sorted, 0.5),
        q(&b_sorted, 0.5)
    );
}
