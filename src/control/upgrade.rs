//! The client side of a live upgrade (`novactl daemon upgrade [--binary PATH]`).
//!
//! The daemon never executes anything itself (its seccomp filter refuses `execve`), so the
//! operator's tool does it:
//! 1. `daemon.handover`: the running daemon sends copies of its listening sockets (every
//!    device's and the control socket) and of its stderr, with its command line and the
//!    environment the successor needs; from then on it does not remove those socket paths.
//! 2. The new binary (by default the one the daemon runs, read from `/proc/PID/exe`, so a
//!    package upgrade that replaced the file is picked up) starts in a session of its own with
//!    the same command line plus `--takeover`, the sockets as systemd-style inherited fds
//!    (`LISTEN_FDS`), and the old stderr. It waits for the images, taps and metrics port the
//!    old process still holds.
//! 3. `daemon.shutdown` with `successor`: the old daemon tells the service manager (if any)
//!    that the new pid is the service now, finishes its in-flight I/O and exits, closing its
//!    front-end connections; the new one takes the images and serves. Front-ends reconnect
//!    to the same socket paths (QEMU's `reconnect=`), where connections wait in the listen
//!    backlog meanwhile; nothing is refused. Requests in flight at the switch are finished by
//!    the old process or, had it died, resubmitted by the new one from the inflight regions.
//! 4. The tool waits until the control socket answers from the new pid.
//!
//! What the successor gets back: command-line devices from the command line, devices added
//! at run time from `--state-dir` (without one they are not carried over).

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// How long the new process may take to serve.
const SERVE_TIMEOUT: Duration = Duration::from_secs(90);
/// Most descriptors a hand-over carries.
const MAX_FDS: usize = 250;

/// Why an upgrade failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Talking to a daemon failed.
    #[error("{0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    /// The daemon answered with an error or something unexpected.
    #[error("the daemon refused: {0}")]
    Refused(String),
    /// The new process ended or did not serve in time.
    #[error("the new daemon {0}")]
    Successor(String),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> UpgradeError {
    move |e| UpgradeError::Io(what, e)
}

/// The outcome.
#[derive(Debug, Clone)]
pub struct Upgraded {
    /// The process that served before.
    pub old_pid: u32,
    /// The process that serves now.
    pub new_pid: u32,
    /// The binary it runs.
    pub binary: PathBuf,
    /// From the hand-over until the new process answered.
    pub took: Duration,
    /// Something the operator should know (the new process outside the service's cgroup).
    pub note: Option<String>,
}

/// Sends one request line; reads one answer line with the descriptors that came with it.
fn request(
    stream: &mut UnixStream,
    method: &str,
    params: Value,
) -> Result<(Value, Vec<OwnedFd>), UpgradeError> {
    let line = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let mut bytes = serde_json::to_vec(&line).map_err(|e| UpgradeError::Refused(e.to_string()))?;
    bytes.push(b'\n');
    stream.write_all(&bytes).map_err(io("send the request"))?;
    let mut answer = Vec::new();
    let mut files = Vec::new();
    let mut fds = [-1 as RawFd; MAX_FDS];
    while !answer.contains(&b'\n') {
        let mut chunk = [0u8; 8192];
        let mut iov = [libc::iovec {
            iov_base: chunk.as_mut_ptr().cast(),
            iov_len: chunk.len(),
        }];
        // SAFETY: the iovec points to `chunk`, a live local buffer of `iov_len` bytes.
        let (got, count) = unsafe { stream.recv_with_fds(&mut iov, &mut fds) }.map_err(|e| {
            UpgradeError::Io(
                "read the answer",
                std::io::Error::from_raw_os_error(e.errno()),
            )
        })?;
        // SAFETY: recvmsg just created these descriptors for us; nothing else owns them.
        files.extend(
            fds.iter()
                .take(count)
                .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }),
        );
        if got == 0 {
            return Err(UpgradeError::Refused(
                "the daemon closed the connection".into(),
            ));
        }
        answer.extend_from_slice(chunk.get(..got).unwrap_or_default());
    }
    let end = answer
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(answer.len());
    let reply: Value = serde_json::from_slice(answer.get(..end).unwrap_or_default())
        .map_err(|e| UpgradeError::Refused(format!("bad answer: {e}")))?;
    match reply.get("result") {
        Some(result) => Ok((result.clone(), files)),
        None => Err(UpgradeError::Refused(reply["error"].to_string())),
    }
}

/// The binary process `pid` runs (a replaced file shows as `PATH (deleted)`: the new file
/// at PATH is the upgrade).
fn running_binary(pid: u64) -> Result<PathBuf, UpgradeError> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map_err(io("find the binary"))?;
    let text = exe.to_string_lossy();
    Ok(PathBuf::from(
        text.strip_suffix(" (deleted)").unwrap_or(&text).to_string(),
    ))
}

/// Upgrades the daemon serving `control` to `binary` (default: the file it runs).
pub fn upgrade(control: &Path, binary: Option<&Path>) -> Result<Upgraded, UpgradeError> {
    let started = Instant::now();
    let mut old = UnixStream::connect(control).map_err(io("connect to the daemon"))?;
    old.set_read_timeout(Some(SERVE_TIMEOUT))
        .map_err(io("set a timeout"))?;
    let (handover, mut fds) = request(&mut old, "daemon.handover", json!({}))?;
    let old_pid = handover["pid"]
        .as_u64()
        .ok_or_else(|| UpgradeError::Refused("no pid".into()))?;
    let sockets = handover["sockets"].as_array().map_or(0, Vec::len);
    if fds.len() != sockets.saturating_add(1) {
        return Err(UpgradeError::Refused(format!(
            "{} descriptors for {sockets} sockets and stderr",
            fds.len()
        )));
    }
    let stderr = fds.pop();
    let binary = match binary {
        Some(path) => path.to_path_buf(),
        None => running_binary(old_pid)?,
    };
    let args: Vec<String> = handover["argv"]
        .as_array()
        .map(|argv| {
            argv.iter()
                .skip(1)
                .filter_map(Value::as_str)
                .filter(|a| *a != "--takeover")
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let mut command = Command::new("sh");
    // `sh -c SCRIPT BINARY ARGS..`: the shell's pid is the daemon's after `exec`, which is
    // what LISTEN_PID must say.
    command
        .arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(&binary)
        .args(&args)
        .arg("--takeover")
        .env("LISTEN_FDS", fds.len().to_string())
        .env_remove("LISTEN_FDNAMES")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr.map_or_else(Stdio::null, Stdio::from));
    if let Some(env) = handover["env"].as_object() {
        for (key, value) in env {
            if let Some(value) = value.as_str() {
                command.env(key, value);
            }
        }
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let count = libc::c_int::try_from(raw.len()).unwrap_or(libc::c_int::MAX);
    // Allocated here: the child may not allocate between fork and exec.
    let mut high: Vec<libc::c_int> = Vec::with_capacity(raw.len());
    // SAFETY: the closure runs in the forked child before exec and only calls setsid, fcntl,
    // dup2 and close_range (async-signal-safe) on descriptors this process owns, into `high`,
    // whose capacity was reserved before the fork (no allocation): each is first copied above
    // the target range (a source may sit on another's target number), then moved to 3, 4, ...
    // (dup2 clears close-on-exec there); everything above is marked close-on-exec, so no
    // other descriptor of ours (the received ones, a control connection) reaches the daemon.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let base = 3 + count + 100;
            high.clear();
            for &fd in &raw {
                let copy = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, base);
                if copy < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high.push(copy);
            }
            for (i, &copy) in high.iter().enumerate() {
                if libc::dup2(copy, 3 + i as libc::c_int) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let first = libc::c_uint::try_from(3 + count).unwrap_or(libc::c_uint::MAX);
            if libc::close_range(
                first,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
            ) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(io("start the new binary"))?;
    let new_pid = child.id();
    let note = join_cgroup_of(old_pid, new_pid);
    drop(fds);
    // The old process hands the service over, finishes its I/O and exits.
    request(&mut old, "daemon.shutdown", json!({"successor": new_pid}))?;
    drop(old);
    let deadline = Instant::now() + SERVE_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(UpgradeError::Successor(format!("exited: {status}")));
        }
        if answers_as(control, new_pid) {
            return Ok(Upgraded {
                old_pid: u32::try_from(old_pid).unwrap_or(0),
                new_pid,
                binary,
                took: started.elapsed(),
                note,
            });
        }
        if Instant::now() > deadline {
            return Err(UpgradeError::Successor(format!(
                "pid {new_pid} did not serve within {SERVE_TIMEOUT:?}"
            )));
        }
        // The control socket has no "new owner" event to wait on: ask again shortly.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Moves process `new` into process `old`'s cgroup (v2): under systemd, the service's, so the
/// unit's limits apply to it and systemd accepts it as the service's main process.
/// Returns why it could not, if it could not.
fn join_cgroup_of(old: u64, new: u32) -> Option<String> {
    let cgroups = std::fs::read_to_string(format!("/proc/{old}/cgroup")).ok()?;
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let procs = format!("/sys/fs/cgroup{path}/cgroup.procs");
    std::fs::write(&procs, new.to_string())
        .err()
        .map(|e| format!("pid {new} stays outside the daemon's cgroup ({procs}: {e})"))
}

/// Whether the daemon answering on `control` is process `pid`.
fn answers_as(control: &Path, pid: u32) -> bool {
    super::client::Client::connect(control, Some(Duration::from_secs(2)))
        .and_then(|mut client| client.call("daemon.info", json!({})))
        .is_ok_and(|info| info["pid"].as_u64() == Some(u64::from(pid)))
}
