//! Starting and stopping the daemon binary under test.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// A running `novacrond` whose log lines the test can wait for.
pub struct Daemon {
    child: Option<Child>,
    lines: Receiver<String>,
    seen: Vec<String>,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts the daemon with `args`; `{dir}` in an argument is replaced with a fresh temp dir.
    /// Returns once it logged that it is ready.
    pub fn start(args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, args)
    }

    /// Like [`Daemon::start`] in a given directory (to restart over the same files).
    pub fn start_in(dir: tempfile::TempDir, args: &[&str]) -> Daemon {
        Self::spawn(dir, args, None, &[])
    }

    /// Like [`Daemon::start_in`] with extra environment variables (test-only failpoints).
    pub fn start_in_with_env(
        dir: tempfile::TempDir,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        Self::spawn(dir, args, None, env)
    }

    /// Like [`Daemon::start`], inside network namespace `netns` (its taps are created there;
    /// its sockets are still files in the temp dir).
    pub fn start_in_netns(netns: &str, args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::spawn(dir, args, Some(netns), &[])
    }

    /// Like [`Daemon::start_in_netns`] in a given directory.
    pub fn start_in_dir_and_netns(dir: tempfile::TempDir, netns: &str, args: &[&str]) -> Daemon {
        Self::spawn(dir, args, Some(netns), &[])
    }

    /// Like [`Daemon::start_in_with_env`], handing the daemon open fds the way a service
    /// manager does: each `(fd, target)` is duplicated to number `target` in the child, and
    /// `LISTEN_PID` is set to the daemon's own pid when `listen_pid` (systemd socket
    /// activation; `LISTEN_FDS` comes with `env`).
    pub fn start_with_fds(
        dir: tempfile::TempDir,
        args: &[&str],
        env: &[(&str, &str)],
        fds: &[(std::os::fd::RawFd, std::os::fd::RawFd)],
        listen_pid: bool,
    ) -> Daemon {
        Self::spawn_launch(dir, args, None, env, fds, listen_pid)
    }

    fn spawn(
        dir: tempfile::TempDir,
        args: &[&str],
        netns: Option<&str>,
        env: &[(&str, &str)],
    ) -> Daemon {
        Self::spawn_launch(dir, args, netns, env, &[], false)
    }

    fn spawn_launch(
        dir: tempfile::TempDir,
        args: &[&str],
        netns: Option<&str>,
        env: &[(&str, &str)],
        fds: &[(std::os::fd::RawFd, std::os::fd::RawFd)],
        listen_pid: bool,
    ) -> Daemon {
        let mut args: Vec<String> = args
            .iter()
            .map(|a| a.replace("{dir}", &dir.path().display().to_string()))
            .collect();
        if !args.iter().any(|a| a == "--control") {
            // Never the shared default path: tests run in parallel.
            args.push("--control".into());
            args.push(dir.path().join("control.sock").display().to_string());
        }
        let mut command = match (netns, listen_pid) {
            // `ip netns exec` enters the namespace and execs the daemon (same pid).
            (Some(ns), _) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_novacrond")]);
                c
            }
            // The shell's pid is the daemon's after `exec`: what systemd puts in LISTEN_PID.
            (None, true) => {
                let mut c = Command::new("sh");
                c.args([
                    "-c",
                    "LISTEN_PID=$$ exec \"$0\" \"$@\"",
                    env!("CARGO_BIN_EXE_novacrond"),
                ]);
                c
            }
            (None, false) => Command::new(env!("CARGO_BIN_EXE_novacrond")),
        };
        command.envs(env.iter().copied());
        if !fds.is_empty() {
            use std::os::unix::process::CommandExt;
            let fds = fds.to_vec();
            // SAFETY: the closure runs in the forked child before exec and only calls fcntl
            // and dup2 (async-signal-safe) on fds the test owns. Each source is first copied
            // above 100 (a source may already sit on another's target number, or on its own,
            // where dup2 would do nothing and leave close-on-exec set); dup2 clears
            // close-on-exec on the final copies.
            unsafe {
                command.pre_exec(move || {
                    let mut high = Vec::with_capacity(fds.len());
                    for &(fd, _) in &fds {
                        let copy = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                        if copy < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        high.push(copy);
                    }
                    for (&copy, &(_, target)) in high.iter().zip(&fds) {
                        if libc::dup2(copy, target) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let mut child = command
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("NOVACRON_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn novacrond");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[novacrond] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut daemon = Daemon {
            child: Some(child),
            lines,
            seen: Vec::new(),
            dir,
        };
        daemon.wait_for_log("novacrond ready");
        daemon
    }

    /// Asserts the daemon is idle: it spends under 200 ms of CPU over a 500 ms window (a worker
    /// spinning on a broken ring would use all of it). There is no event for "doing nothing",
    /// so this one sleep is the measurement window, not synchronization.
    pub fn assert_idle(&self) {
        let before = self.cpu_time();
        std::thread::sleep(std::time::Duration::from_millis(500));
        let spent = self.cpu_time() - before;
        assert!(
            spent < std::time::Duration::from_millis(200),
            "daemon busy while it should be idle: {spent:?} of CPU in 500 ms"
        );
    }

    /// The daemon's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().expect("child").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }

    /// Open file descriptors of the daemon.
    pub fn fd_count(&self) -> usize {
        let pid = self.child.as_ref().expect("child").id();
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("proc fd")
            .count()
    }

    /// Each thread's name and `/proc/PID/task/TID/status`.
    pub fn thread_status(&self) -> Vec<(String, String)> {
        let pid = self.child.as_ref().expect("child").id();
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("proc task")
            .filter_map(Result::ok)
            .filter_map(|task| {
                let status = std::fs::read_to_string(task.path().join("status")).ok()?;
                let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
                Some((name.trim().to_string(), status))
            })
            .collect()
    }

    /// Threads of the daemon.
    pub fn thread_count(&self) -> usize {
        let pid = self.child.as_ref().expect("child").id();
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("proc task")
            .count()
    }

    /// The names of the daemon's threads.
    pub fn thread_names(&self) -> Vec<String> {
        let pid = self.child.as_ref().expect("child").id();
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("proc task")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|name| name.trim().to_string())
            .collect()
    }

    /// User + system CPU time the daemon has used.
    pub fn cpu_time(&self) -> std::time::Duration {
        let pid = self.child.as_ref().expect("child").id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
        // Fields after the command name (which is in parentheses): utime is 14th, stime 15th.
        let after = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        std::time::Duration::from_millis(ticks * 1000 / hz)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// The most virtual memory the daemon has had mapped at once, in bytes (`VmPeak`).
    pub fn peak_virtual_memory(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read the daemon's status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmPeak:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmPeak in /proc/PID/status");
        kib * 1024
    }

    /// Path inside the daemon's temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Blocks until a log line containing `needle` appears (10 s at most); a line seen
    /// earlier counts.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        self.wait_for_next_log(needle)
    }

    /// Blocks until a log line containing `needle` arrives that no earlier wait consumed
    /// (10 s at most): for events that happen repeatedly.
    pub fn wait_for_next_log(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("no new log line with `{needle}` in 10 s"),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("daemon exited before logging `{needle}`")
                }
            }
        }
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: libc::c_int) {
        signal(self.child.as_ref().expect("child"), sig);
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> (ExitStatus, tempfile::TempDir) {
        let mut child = self.child.take().expect("child");
        signal(&child, libc::SIGTERM);
        let status = child.wait().expect("wait");
        let dir = tempfile::tempdir().expect("tempdir");
        (status, std::mem::replace(&mut self.dir, dir))
    }

    /// Waits for the daemon to exit by itself (e.g. after `daemon.shutdown`).
    pub fn wait_exit(mut self) -> (ExitStatus, tempfile::TempDir) {
        let mut child = self.child.take().expect("child");
        let status = child.wait().expect("wait");
        let dir = tempfile::tempdir().expect("tempdir");
        (status, std::mem::replace(&mut self.dir, dir))
    }

    /// Waits until the daemon dies by itself (a failpoint abort); returns the directory.
    pub fn wait_crash(mut self) -> tempfile::TempDir {
        let mut child = self.child.take().expect("child");
        let status = child.wait().expect("wait");
        assert!(
            !status.success(),
            "daemon exited cleanly instead of crashing"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, dir)
    }

    /// Sends SIGKILL (a crash) and reaps the process.
    pub fn kill(mut self) -> tempfile::TempDir {
        let mut child = self.child.take().expect("child");
        let _ = child.kill();
        let _ = child.wait();
        let dir = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, dir)
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: kill only sends a signal to our own child process.
    unsafe { libc::kill(pid, sig) };
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the daemon with `args` expecting it to fail at start; returns its stderr.
pub fn start_failure(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_novacrond"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run novacrond");
    assert!(!output.status.success(), "daemon accepted {args:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `novactl --control <daemon's socket> args...`; returns (success, stdout, stderr).
pub fn novactl(daemon: &Daemon, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_novactl"))
        .arg("--control")
        .arg(daemon.path("control.sock"))
        .args(args)
        .output()
        .expect("run novactl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
