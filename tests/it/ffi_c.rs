//! The C client library from C: builds `libnovacron.a` (ffi/), compiles ffi/tests/client.c with
//! `cc` against the checked-in header, and runs it against a real daemon.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;
use std::process::Command;

use crate::common::daemon::Daemon;

#[test]
fn c_program_uses_libnovacron_against_the_daemon() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = crate::common::ffi::build_libnovacron();
    let program = target.join("client");
    let status = Command::new("cc")
        .arg(root.join("ffi/tests/client.c"))
        .arg("-I")
        .arg(root.join("ffi/include"))
        .arg(target.join("debug/libnovacron.a"))
        .args(["-lpthread", "-ldl", "-lm", "-Wall", "-Werror", "-o"])
        .arg(&program)
        .status()
        .expect("a C compiler (cc) is required");
    assert!(status.success(), "compiling the C client failed");

    let daemon = Daemon::start(&[]);
    let out = Command::new(&program)
        .arg(daemon.path("control.sock"))
        .arg(daemon.dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("C CLIENT OK"),
        "C client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
