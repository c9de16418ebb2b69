//! A guest whose QEMU runs in the background and is driven over QMP: live migration from one
//! QEMU process to another. These guests run the migration QEMU
//! ([`super::guest::migration_qemu`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::guest::{guest_command, migration_qemu, GuestRun};

/// A QEMU process with a QMP socket, its console and its guest RAM in files.
pub struct Qemu {
    child: Child,
    qmp: PathBuf,
    console: PathBuf,
    memory: PathBuf,
    started: Instant,
}

impl Qemu {
    /// Starts a guest running test `name` (`params` on its kernel command line) with
    /// `devices`, QMP, console and guest RAM files named `tag` in `dir`; `incoming` makes it
    /// the destination of a migration arriving on that unix socket, paused on arrival until
    /// [`migrate`] has compared the two guests' memory.
    pub fn spawn(
        name: &str,
        params: &str,
        devices: &[String],
        dir: &Path,
        tag: &str,
        incoming: Option<&Path>,
    ) -> Qemu {
        let qmp = dir.join(format!("{tag}.qmp"));
        let console = dir.join(format!("{tag}.console"));
        let memory = dir.join(format!("{tag}.ram"));
        let mut cmd = guest_command(migration_qemu(), name, params, Some(&memory));
        cmd.args(["-serial", &format!("file:{}", console.display())])
            .args([
                "-qmp",
                &format!("unix:{},server=on,wait=off", qmp.display()),
            ])
            .args(devices)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(uri) = incoming {
            cmd.args(["-incoming", &format!("unix:{}", uri.display()), "-S"]);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()));
        let qemu = Qemu {
            child,
            qmp,
            console,
            memory,
            started: Instant::now(),
        };
        if incoming.is_some() {
            // QMP answers from the main loop, which runs once the incoming socket listens.
            qemu.qmp("query-status", json!({}));
        }
        qemu
    }

    /// Runs QMP command `command` with `arguments`; returns its `return` value (panics on
    /// an error reply).
    pub fn qmp(&self, command: &str, arguments: Value) -> Value {
        qmp(&self.qmp, command, arguments)
    }

    /// Ends a QEMU whose guest moved away (its process is paused after a migration).
    pub fn quit(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.console()
    }

    /// What the guest printed so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Polls the console until `done(console)` holds (returns that console); panics with the
    /// console when QEMU exits first or `within` passes. `what` names the wait.
    pub fn wait_console(
        &mut self,
        what: &str,
        within: Duration,
        mut done: impl FnMut(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + within;
        loop {
            let console = self.console();
            if done(&console) {
                return console;
            }
            assert!(!self.exited(), "{what}: the guest stopped:\n{console}");
            assert!(Instant::now() < deadline, "{what}: timed out:\n{console}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether QEMU has exited.
    pub fn exited(&mut self) -> bool {
        self.exit_status().is_some()
    }

    /// QEMU's exit status, once it has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the guest to power off (its test ended) and returns its console.
    pub fn wait(mut self, timeout: Duration) -> GuestRun {
        let deadline = Instant::now() + timeout;
        while !self.exited() {
            assert!(
                Instant::now() < deadline,
                "the guest did not finish; console:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let console = self.console();
        eprintln!(
            "--- guest console ({}) ---\n{console}\n--- end ---",
            self.qmp.display()
        );
        GuestRun {
            console,
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One QMP command on the monitor at `socket` (QEMU or qemu-storage-daemon). Waits for the
/// socket to appear (the process creates it as it starts).
pub fn qmp(socket: &Path, command: &str, arguments: Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "QMP {}: {e}", socket.display());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut lines = BufReader::new(stream).lines();
    let mut reply = |message: Value| -> Value {
        writeln!(writer, "{message}").unwrap();
        loop {
            let line = lines.next().expect("QMP closed").expect("QMP read");
            let value: Value = serde_json::from_str(&line).unwrap();
            if let Some(error) = value.get("error") {
                panic!("QMP {command}: {error}");
            }
            if let Some(ret) = value.get("return") {
                return ret.clone();
            }
        }
    };
    reply(json!({"execute": "qmp_capabilities"}));
    reply(json!({"execute": command, "arguments": arguments}))
}

/// Migration figures QEMU reports (milliseconds), and the guest pages whose bytes differed
/// between source and destination at the switchover.
#[derive(Debug, Clone)]
pub struct Migrated {
    pub downtime_ms: u64,
    pub total_ms: u64,
    pub differing_pages: Vec<String>,
}

impl Migrated {
    /// Panics unless source and destination RAM were the same, byte for byte (the first
    /// differing pages' bytes are printed on stderr).
    pub fn assert_same_memory(&self) {
        assert!(
            self.differing_pages.is_empty(),
            "{} guest page(s) differ between source and destination after the migration \
             (first: {:?})",
            self.differing_pages.len(),
            &self.differing_pages[..self.differing_pages.len().min(16)]
        );
    }
}

/// Migrates `source` to `dest`, listening on unix socket `to`; waits until QEMU says it
/// completed (panics if it failed). Both guests are paused then: their memory is compared
/// byte for byte (a page the backend wrote without logging it would differ; the caller
/// checks [`Migrated::assert_same_memory`]) before the destination runs on.
pub fn migrate(source: &mut Qemu, dest: &Qemu, to: &Path) -> Migrated {
    source.qmp("migrate", json!({"uri": format!("unix:{}", to.display())}));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = source.exit_status() {
            panic!("the source QEMU ended mid-migration: {status}");
        }
        let info = source.qmp("query-migrate", json!({}));
        match info["status"].as_str() {
            Some("completed") => {
                let differing_pages = differing_pages(&source.memory, &dest.memory);
                dest.qmp("cont", json!({}));
                return Migrated {
                    downtime_ms: info["downtime"].as_u64().unwrap_or(0),
                    total_ms: info["total-time"].as_u64().unwrap_or(0),
                    differing_pages,
                };
            }
            Some("failed") | Some("cancelled") => panic!("migration ended: {info}"),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "migration did not finish: {info}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pages (guest addresses) whose bytes differ between the two guest RAM files; the first
/// few are shown on stderr.
fn differing_pages(a: &Path, b: &Path) -> Vec<String> {
    use std::io::Read;
    let mut a = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(a).unwrap());
    let mut b = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(b).unwrap());
    let (mut pa, mut pb) = (vec![0u8; 4096], vec![0u8; 4096]);
    let mut differ = Vec::new();
    for page in 0u64.. {
        let got = a.read(&mut pa).unwrap();
        if got == 0 {
            break;
        }
        a.read_exact(&mut pa[got..]).unwrap();
        b.read_exact(&mut pb).unwrap();
        if pa != pb {
            differ.push(format!("{:#x}", page * 4096));
            if differ.len() <= 4 {
                let at = pa.iter().zip(&pb).position(|(x, y)| x != y).unwrap_or(0);
                let end = (at + 48).min(4096);
                let changed = pa.iter().zip(&pb).filter(|(x, y)| x != y).count();
                eprintln!(
                    "page {:#x}: {changed} byte(s) differ, first at +{at:#x}\n  source {:02x?}\n  dest   {:02x?}",
                    page * 4096,
                    &pa[at..end],
                    &pb[at..end]
                );
            }
        }
    }
    differ
}
