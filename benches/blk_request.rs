//! Request path through the real vhost-user protocol: the daemon binary, our test front-end
//! (memfd guest memory, split ring), 4 KiB requests. Cases:
//!
//! - `null/read/qd1`, `null/write/qd1`: one request at a time (latency-bound round trip);
//! - `null/read/qd32`: 32 requests posted, then 32 completions awaited (throughput);
//! - `file/read/qd1`, `file/read/qd32`, `file/write/qd32`: a 64 MiB page-cached image file.
//!
//! Criterion reports elements (requests) per second. Pin with `taskset` for stable numbers.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // a benchmark: fail loudly; criterion macros are undocumented

#[allow(dead_code)] // the integration tests' harness; a bench uses a few of its helpers
#[path = "../tests/it/common/mod.rs"]
mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::{Duration, Instant};

use common::blk::{BlkClient, T_IN, T_OUT};
use common::daemon::Daemon;

const BLOCK: u32 = 4096;

struct Slot {
    header: u64,
    data: u64,
    status: u64,
}

/// Pre-allocates `qd` request slots so the measured loop only posts and waits.
fn slots(c: &mut BlkClient, qd: usize, request_type: u32) -> Vec<Slot> {
    (0..qd)
        .map(|i| Slot {
            header: c.header(request_type, (i as u64) * 8),
            data: c.alloc(u64::from(BLOCK)),
            status: c.alloc(1),
        })
        .collect()
}

fn run_batches(c: &mut BlkClient, slots: &[Slot], write: bool, iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        for s in slots {
            c.post(
                0,
                &[
                    (s.header, 16, false),
                    (s.data, BLOCK, !write),
                    (s.status, 1, true),
                ],
            );
        }
        c.wait(0, slots.len());
    }
    start.elapsed()
}

fn bench(criterion: &mut Criterion) {
    let daemon = Daemon::start(&[
        "--log-level",
        "warn",
        "--blk",
        "socket={dir}/null.sock,path=null,size=8G",
        "--blk",
        "socket={dir}/file.sock,path={dir}/file.img,size=64M",
    ]);
    let mut null = BlkClient::connect(&daemon.path("null.sock"));
    let mut file = BlkClient::connect(&daemon.path("file.sock"));
    // Fill the file so reads come from the page cache rather than holes.
    for i in 0..(64 << 20) / (1 << 20) {
        file.write(0, i * 2048, &vec![0xA5; 1 << 20]);
    }

    let mut group = criterion.benchmark_group("blk");
    group.measurement_time(Duration::from_secs(5));
    for (name, write, qd) in [
        ("null/read/qd1", false, 1usize),
        ("null/write/qd1", true, 1),
        ("null/read/qd32", false, 32),
    ] {
        let request_type = if write { T_OUT } else { T_IN };
        let slots = slots(&mut null, qd, request_type);
        group.throughput(Throughput::Elements(qd as u64));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| run_batches(&mut null, &slots, write, iters))
        });
    }
    for (name, write, qd) in [
        ("file/read/qd1", false, 1usize),
        ("file/read/qd32", false, 32),
        ("file/write/qd32", true, 32),
    ] {
        let request_type = if write { T_OUT } else { T_IN };
        let slots = slots(&mut file, qd, request_type);
        group.throughput(Throughput::Elements(qd as u64));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| run_batches(&mut file, &slots, write, iters))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
