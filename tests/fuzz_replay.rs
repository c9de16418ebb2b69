//! Replays the fuzz seeds and any saved crash regressions through the same entry point the
//! fuzzer uses, so CI (stable toolchain, no libFuzzer) keeps every found bug fixed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;

#[test]
fn blk_request_corpus_replays_without_panicking() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for dir in [
        "seeds/blk_request",
        "regressions/blk_request",
        "corpus/blk_request",
    ] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            novacron::fuzz_support::blk_request(&data);
            replayed += 1;
        }
    }
    assert!(
        replayed >= 8,
        "only {replayed} fuzz inputs found: seeds missing"
    );
}

#[test]
fn net_frame_corpus_replays_without_panicking() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for dir in ["seeds/net_frame", "regressions/net_frame"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            novacron::fuzz_support::net_frame(&data);
            replayed += 1;
        }
    }
    assert!(replayed >= 8, "only {replayed} net fuzz inputs found");
}

#[test]
fn blk_request_survives_structured_noise() {
    // A cheap stand-in for the fuzzer in CI: deterministic pseudo-random inputs of many sizes.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for len in 0..4000usize {
        let data: Vec<u8> = (0..len % 700)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        novacron::fuzz_support::blk_request(&data);
    }
}
