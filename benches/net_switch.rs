//! The switch path through the real vhost-user protocol: the daemon binary, two switch ports
//! driven by our test front-end (memfd guest memory, split rings). Each iteration posts a
//! batch of rx buffers on port B, sends a batch of frames from port A, and waits until B has
//! them all. Cases: 64-byte frames, 1500-byte frames, and 64 KiB TSO frames (a GSO header,
//! delivered into 4 KiB mergeable buffers). One copy per frame, guest memory to guest memory.
//!
//! Criterion reports frames per second; after each case the bench prints what the daemon moved
//! per CPU-second of its own (its `/proc` CPU time over the case), the per-core rate. Pin with
//! `taskset` for stable numbers.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // a benchmark: fail loudly; criterion macros are undocumented

#[allow(dead_code)] // the integration tests' harness; a bench uses a few of its helpers
#[path = "../tests/it/common/mod.rs"]
mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::net::{ethernet, NetClient, HDR};

const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0a];
const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0b];
const BATCH: usize = 32;
const RX_BUFFER: u32 = 4096;

struct Case {
    name: &'static str,
    header: [u8; HDR],
    frame_len: usize,
    /// Frames per batch (a 64 KiB frame takes 16 rx buffers; the ring holds 256).
    batch: usize,
}

fn tso_header() -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[0] = 1; // NEEDS_CSUM
    h[1] = 1; // TCPv4
    h[2..4].copy_from_slice(&54u16.to_le_bytes());
    h[4..6].copy_from_slice(&1448u16.to_le_bytes());
    h[6..8].copy_from_slice(&34u16.to_le_bytes());
    h[8..10].copy_from_slice(&16u16.to_le_bytes());
    h
}

fn bench(criterion: &mut Criterion) {
    let daemon = Daemon::start(&[
        "--log-level",
        "warn",
        "--net",
        "socket={dir}/a.sock,switch=bench,mac=52:54:00:00:00:0a",
        "--net",
        "socket={dir}/b.sock,switch=bench,mac=52:54:00:00:00:0b",
    ]);
    let mut a = NetClient::connect(&daemon.path("a.sock"), 1, 0);
    let mut b = NetClient::connect(&daemon.path("b.sock"), 1, 0);
    // Teach the switch where B is, so frames are unicast.
    a.post_rx(0, 1, 2048);
    b.send(0, &ethernet(A, B, 0x0800, &[0u8; 46]));
    a.recv(0);

    let mut group = criterion.benchmark_group("net-switch");
    group.measurement_time(Duration::from_secs(5));
    for case in [
        Case {
            name: "64B",
            header: [0; HDR],
            frame_len: 64,
            batch: BATCH,
        },
        Case {
            name: "1500B",
            header: [0; HDR],
            frame_len: 1514,
            batch: BATCH,
        },
        Case {
            name: "64KiB-tso",
            header: tso_header(),
            frame_len: 65_000,
            batch: 8,
        },
    ] {
        let mut body = vec![0u8; case.frame_len - 14];
        if case.frame_len > 1514 {
            body[0] = 0x45;
            body[9] = 6;
            body[32] = 0x50;
        }
        let frame = ethernet(B, A, 0x0800, &body);
        // Tx chains: header + frame in one buffer each, written once.
        let tx: Vec<u64> = (0..case.batch)
            .map(|_| {
                let at = a.vq.alloc((HDR + frame.len()) as u64);
                let mut bytes = case.header.to_vec();
                bytes.extend_from_slice(&frame);
                a.vq.poke(at, &bytes);
                at
            })
            .collect();
        let per_frame = (HDR + frame.len()).div_ceil(RX_BUFFER as usize);
        let rx: Vec<u64> = (0..case.batch * per_frame)
            .map(|_| b.vq.alloc(u64::from(RX_BUFFER)))
            .collect();
        let tx_len = (HDR + frame.len()) as u32;
        group.throughput(Throughput::Elements(case.batch as u64));
        // The daemon's own CPU time over every batch of the case (warm-up included): what it
        // moves per CPU-second, whatever the test front-end's kicks and waits cost.
        let cpu_before = daemon.cpu_time();
        let mut frames = 0u64;
        group.bench_function(case.name, |bencher| {
            bencher.iter_custom(|iters| {
                frames += iters * case.batch as u64;
                let start = Instant::now();
                for _ in 0..iters {
                    for &at in &rx {
                        b.vq.post(0, &[(at, RX_BUFFER, true)]);
                    }
                    for &at in &tx {
                        a.vq.post(1, &[(at, tx_len, false)]);
                    }
                    a.vq.wait(1, tx.len());
                    b.vq.wait(0, rx.len());
                }
                start.elapsed()
            })
        });
        let cpu = (daemon.cpu_time() - cpu_before).as_secs_f64();
        if cpu > 0.0 {
            let per_cpu_s = frames as f64 / cpu;
            let gbit = per_cpu_s * frame.len() as f64 * 8.0 / 1e9;
            eprintln!(
                "net-switch/{}: daemon {per_cpu_s:.0} frames per CPU-second ({gbit:.1} Gbit/s of frame bytes per core; {frames} frames in {cpu:.2} CPU-s)",
                case.name
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
