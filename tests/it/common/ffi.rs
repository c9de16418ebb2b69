//! Building libnovacron (the C client library in `ffi/`) for the tests that need it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds libnovacron (static and shared) into `target/ffi-test` — a separate target dir: the
/// outer `cargo test` may still hold the main one — and returns that directory. Its `debug/`
/// holds `libnovacron.a` and `libnovacron.so`. Concurrent callers wait on cargo's lock.
pub fn build_libnovacron() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = root.join("target/ffi-test");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "-p", "novacron-ffi", "--target-dir"])
        .arg(&target)
        .current_dir(root)
        .status()
        .expect("run cargo");
    assert!(status.success(), "building libnovacron failed");
    target
}
