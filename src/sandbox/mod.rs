//! The daemon's sandbox, on by default (`--sandbox off` for debugging): `PR_SET_NO_NEW_PRIVS`
//! and seccomp filters per thread kind ([`seccomp`]), installed once at start on every thread
//! (TSYNC; later threads inherit them) and, on top, by each queue worker thread the first time
//! it runs ([`enter_worker`]); a forbidden call gets `EPERM`. With configured filesystem roots
//! (`--fs-root`), Landlock limits every file the daemon can reach to them ([`landlock`]).
//!
//! Capabilities the daemon never needs are dropped at start, and `--user` runs it as an
//! unprivileged user ([`privileges`]). The disks' io_uring rings are restricted where they are
//! created (`storage::uring`). See README "Sandbox".

pub mod landlock;
pub mod privileges;
pub mod seccomp;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

use seccomp::ThreadKind;

/// Why the sandbox could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A filter could not be built or installed.
    #[error("seccomp: {0}")]
    Seccomp(String),
    /// The Landlock ruleset could not be built or applied.
    #[error("landlock: {0}")]
    Landlock(String),
    /// Capabilities or the user could not be changed.
    #[error("privileges: {0}")]
    Privileges(String),
}

/// Whether workers install their filter (set once at start).
static ENABLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread already runs under the worker filter.
    static WORKER_FILTERED: Cell<bool> = const { Cell::new(false) };
}

/// Limits the daemon to the filesystem roots `roots` (Landlock). Call before any thread is
/// started. Returns whether the kernel enforces it fully.
pub fn enter_roots(roots: &[std::path::PathBuf]) -> Result<(), SandboxError> {
    match landlock::restrict(roots)? {
        ::landlock::RulesetStatus::FullyEnforced => {
            log::info!("sandbox: files reachable only beneath {roots:?} (landlock)");
        }
        ::landlock::RulesetStatus::PartiallyEnforced => {
            log::warn!("sandbox: landlock only partly enforced by this kernel (older ABI)");
        }
        ::landlock::RulesetStatus::NotEnforced => {
            return Err(SandboxError::Landlock(
                "this kernel does not enforce Landlock; --fs-root cannot be honoured".into(),
            ));
        }
    }
    Ok(())
}

/// Installs the daemon filter on every thread of the process (and so on every later one).
pub fn enter_daemon() -> Result<(), SandboxError> {
    let program = seccomp::filter(ThreadKind::Daemon)?;
    seccompiler::apply_filter_all_threads(&program)
        .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    ENABLED.store(true, Ordering::Release);
    log::info!("sandbox: no_new_privs, seccomp on every thread (worker threads narrower)");
    Ok(())
}

/// Called on a queue worker thread before it serves anything: narrows its filter, once.
/// A failure is logged and the thread goes on under the daemon filter.
pub fn enter_worker() {
    // Compiled once for all worker threads.
    static PROGRAM: std::sync::OnceLock<Result<seccompiler::BpfProgram, String>> =
        std::sync::OnceLock::new();
    narrow(ThreadKind::Worker, &PROGRAM);
}

/// Whether this thread runs under a worker (or relay) filter: a thread it starts inherits
/// that filter ([`inherit_worker`]).
pub fn worker_filtered() -> bool {
    WORKER_FILTERED.with(Cell::get)
}

/// Called first on a thread started by one that ran under the worker filter (seccomp filters
/// are inherited): it runs under it already, and may not install another (`seccomp` is not
/// on the worker list), so it only records that.
pub fn inherit_worker() {
    WORKER_FILTERED.with(|f| f.set(true));
}

/// Called on a vhost-user relay thread before it reads anything: the worker filter, with
/// memfds allowed (`seccomp::ThreadKind::Relay`).
pub fn enter_relay() {
    static PROGRAM: std::sync::OnceLock<Result<seccompiler::BpfProgram, String>> =
        std::sync::OnceLock::new();
    narrow(ThreadKind::Relay, &PROGRAM);
}

fn narrow(
    kind: ThreadKind,
    compiled: &'static std::sync::OnceLock<Result<seccompiler::BpfProgram, String>>,
) {
    if !ENABLED.load(Ordering::Acquire) || WORKER_FILTERED.with(Cell::get) {
        return;
    }
    WORKER_FILTERED.with(|f| f.set(true));
    let program = compiled.get_or_init(|| seccomp::filter(kind).map_err(|e| e.to_string()));
    let applied = program
        .as_ref()
        .map_err(|e| SandboxError::Seccomp(e.clone()))
        .and_then(|program| {
            seccompiler::apply_filter(program).map_err(|e| SandboxError::Seccomp(e.to_string()))
        });
    if let Err(e) = applied {
        log::error!("sandbox: worker filter not installed: {e}");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    fn errno_of(rc: libc::c_long) -> i32 {
        if rc < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        }
    }

    /// On a thread of its own (filters stay with it), so the test process is not filtered.
    fn on_filtered_thread<R: Send + 'static>(kind: ThreadKind, f: fn() -> R) -> R {
        std::thread::spawn(move || {
            let program = seccomp::filter(kind).unwrap();
            seccompiler::apply_filter(&program).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn forbidden_calls_are_refused_and_allowed_ones_work() {
        let (packet, exec, unix, inet, file) = on_filtered_thread(ThreadKind::Daemon, || {
            // SAFETY: plain syscalls with valid arguments; results checked below.
            let packet =
                unsafe { libc::syscall(libc::SYS_socket, libc::AF_PACKET, libc::SOCK_RAW, 0) };
            let packet = errno_of(packet);
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            // SAFETY: a valid path and a null-terminated argv; refused before anything runs.
            let exec = unsafe {
                libc::syscall(
                    libc::SYS_execve,
                    path.as_ptr(),
                    argv.as_ptr(),
                    std::ptr::null::<*const libc::c_char>(),
                )
            };
            let exec = errno_of(exec);
            let unix = std::os::unix::net::UnixDatagram::unbound().is_ok();
            let inet = std::net::UdpSocket::bind("127.0.0.1:0").is_ok();
            let file = std::fs::read("/proc/thread-self/status").unwrap();
            let seccomp_line = String::from_utf8_lossy(&file)
                .lines()
                .find(|l| l.starts_with("Seccomp:"))
                .map(str::to_string);
            (packet, exec, unix, inet, seccomp_line)
        });
        assert_eq!(packet, libc::EPERM, "raw packet sockets are refused");
        assert_eq!(exec, libc::EPERM, "execve is refused");
        assert!(unix && inet, "unix and inet sockets still work");
        assert_eq!(file.as_deref(), Some("Seccomp:\t2"));
    }

    #[test]
    fn workers_cannot_make_sockets_rings_or_directories() {
        let (socket, ring, mkdir, read) = on_filtered_thread(ThreadKind::Worker, || {
            let socket = std::os::unix::net::UnixDatagram::unbound()
                .err()
                .and_then(|e| e.raw_os_error());
            let ring = io_uring::IoUring::new(2)
                .err()
                .and_then(|e| e.raw_os_error());
            let mkdir = std::fs::create_dir("/nonexistent/x")
                .err()
                .and_then(|e| e.raw_os_error());
            let read = std::fs::read("/proc/self/status").is_ok();
            (socket, ring, mkdir, read)
        });
        assert_eq!(socket, Some(libc::EPERM));
        assert_eq!(
            ring,
            Some(libc::EPERM),
            "a fresh io_uring would bypass the filter"
        );
        assert_eq!(
            mkdir,
            Some(libc::EPERM),
            "refused before the path is looked up"
        );
        assert!(read, "workers still read files");
    }

    #[test]
    fn signals_reach_only_our_own_process() {
        let (other, own) = on_filtered_thread(ThreadKind::Daemon, || {
            // SAFETY: signal 0 only checks permission; pid 1 exists on every system.
            let other = errno_of(unsafe { libc::syscall(libc::SYS_kill, 1, 0) });
            // SAFETY: as above, to ourselves.
            let own = errno_of(unsafe { libc::syscall(libc::SYS_kill, libc::getpid(), 0) });
            (other, own)
        });
        assert_eq!(other, libc::EPERM, "kill of another process is refused");
        assert_eq!(own, 0);
    }
}
