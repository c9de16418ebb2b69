//! Replays the fuzz seeds (and with them every crash the fuzzers found: a minimised crashing
//! input is committed to `fuzz/seeds/<target>/` as `crash-*`) through the same entry point
//! the fuzzer uses, so CI (stable toolchain, no libFuzzer) keeps every found bug fixed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;

#[test]
fn blk_request_corpus_replays_without_panicking() {
    let n = replay("blk_request", novacron::fuzz_support::blk_request);
    assert!(n >= 8, "only {n} blk fuzz inputs found: seeds missing");
}

#[test]
fn net_frame_corpus_replays_without_panicking() {
    let n = replay("net_frame", novacron::fuzz_support::net_frame);
    assert!(n >= 8, "only {n} net fuzz inputs found: seeds missing");
}

#[test]
fn ring_split_corpus_replays_without_panicking() {
    let n = replay("ring_split", novacron::fuzz_support::ring_split);
    assert!(n >= 8, "only {n} ring fuzz inputs found: seeds missing");
}

/// Replays the committed `seeds/<target>` through `run`; returns how many. (Not the local,
/// git-ignored `corpus/`: CI and a developer's machine must replay the same inputs, and a
/// fuzzer running meanwhile rewrites that directory.)
fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut replayed = 0;
    for entry in entries {
        run(&std::fs::read(entry.unwrap().path()).unwrap());
        replayed += 1;
    }
    replayed
}

#[test]
fn relay_messages_corpus_replays_without_panicking() {
    let n = replay("relay_messages", novacron::fuzz_support::relay_messages);
    assert!(n >= 8, "only {n} relay fuzz inputs found");
}

#[test]
fn control_lines_corpus_replays_without_panicking() {
    // Names in the working directory (the repository root under `cargo test`) before and
    // after: the target must create files only in its scratch directory.
    let listing = || -> std::collections::BTreeSet<std::ffi::OsString> {
        std::fs::read_dir(".")
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect()
    };
    let before = listing();
    let n = replay("control_lines", novacron::fuzz_support::control_lines);
    assert!(n >= 8, "only {n} control fuzz inputs found");
    let created: Vec<_> = listing().difference(&before).cloned().collect();
    assert!(
        created.is_empty(),
        "the control fuzz target wrote {created:?}"
    );
}

/// A cheap stand-in for the fuzzer in CI: `count` deterministic pseudo-random inputs of
/// sizes up to `max_len` through `run`.
fn noise(run: fn(&[u8]), count: usize, max_len: usize) {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for len in 0..count {
        let data: Vec<u8> = (0..len % max_len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        run(&data);
    }
}

#[test]
fn blk_request_survives_structured_noise() {
    noise(novacron::fuzz_support::blk_request, 4000, 700);
}

#[test]
fn the_ring_engine_survives_noise_with_and_without_a_walk_limit() {
    noise(novacron::fuzz_support::ring_split, 4000, 400);
    noise(novacron::fuzz_support::net_frame, 1000, 400);
}

/// Valid tier inputs (a record, a journal) as the fuzz entry point sees them: two selector
/// bytes, then the bytes.
fn tier_inputs() -> Vec<Vec<u8>> {
    use novacron::storage::tier::{journal, record};
    let text: Vec<u8> = b"cold tier record "
        .iter()
        .cycle()
        .take(20_000)
        .copied()
        .collect();
    let mut inputs = Vec::new();
    for (extent, generation) in [(0u64, 0u64), (1, 2), (3, 3)] {
        let mut input = vec![extent as u8, generation as u8];
        input.extend(record::encode(extent, generation, &text, 3).unwrap());
        inputs.push(input);
    }
    let entries = [
        journal::Entry::Geometry {
            extent_size: 1 << 20,
            extents: 8,
        },
        journal::Entry::Cold {
            extent: 1,
            location: journal::ColdLocation {
                offset: 0,
                len: 100,
                generation: 1,
            },
        },
        journal::Entry::Hot { extent: 1 },
        journal::Entry::Clean,
    ];
    let mut input = vec![0u8, 0];
    for (seq, entry) in entries.iter().enumerate() {
        input.extend(entry.encode(seq as u64));
    }
    inputs.push(input);
    inputs
}

#[test]
fn tier_records_and_journals_survive_corruption() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/tier_record");
    let mut replayed = 0;
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries {
            novacron::fuzz_support::tier_record(&std::fs::read(entry.unwrap().path()).unwrap());
            replayed += 1;
        }
    }
    assert!(replayed >= 4, "only {replayed} tier fuzz seeds found");
    // Every valid input with single-byte corruption and truncation at many points.
    for input in tier_inputs() {
        for at in (0..input.len()).step_by(7) {
            let mut bad = input.clone();
            bad[at] ^= 0xa5;
            novacron::fuzz_support::tier_record(&bad);
            novacron::fuzz_support::tier_record(&input[..at]);
        }
    }
}
