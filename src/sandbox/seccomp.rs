//! The seccomp filters (through `seccompiler`, as Firecracker and cloud-hypervisor do): an
//! allow-list per thread kind; anything else fails with `EPERM` (the call is refused, the
//! daemon and every other tenant keep running; a kill would turn one missed syscall into an
//! outage for all of them).
//!
//! - [`ThreadKind::Daemon`]: every thread (installed with TSYNC on all threads at start, and
//!   inherited by every thread created later): files, sockets, io_uring, taps, timers.
//!   `socket` only for `AF_UNIX` (vhost-user, control), `AF_INET`/`AF_INET6` (the metrics
//!   endpoint). Never: `execve`, `ptrace`, `mount`, module loading, `bpf`, `perf_event_open`,
//!   `keyctl`, `userfaultfd`, `unshare`/`setns`, `kexec`, `reboot`, raw sockets.
//! - [`ThreadKind::Worker`]: added on each queue worker thread (guest-facing: what a guest
//!   exploit would run as), on top of the daemon filter: no sockets at all (no `socket`,
//!   `bind`, `listen`, `accept`, `connect`), no new io_uring rings or registrations (a fresh
//!   ring would run opcodes seccomp never sees), no directories made or removed, no
//!   permission or owner changes, no memfds, no further seccomp. Workers still open files
//!   (`/dev/net/tun` when a tap comes back) and create, rename and remove them: a tiered
//!   disk's journal compaction runs on the I/O path today (moving it to the policy thread
//!   would let workers lose those too).
//! - [`ThreadKind::Relay`]: the vhost-user relay threads (they parse what front-ends send):
//!   the worker filter, plus `memfd_create` for the inflight regions they hand out.
//! - Everywhere: `kill`/`tgkill` only to our own process (a root daemon could otherwise
//!   signal any process on the host).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::SandboxError;

/// Which filter a thread gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Every thread of the daemon.
    Daemon,
    /// A queue worker thread (in addition to the daemon filter).
    Worker,
    /// A vhost-user relay thread: the worker filter, but memfds allowed (the inflight region
    /// it creates for `GET_INFLIGHT_FD`).
    Relay,
}

/// Syscalls every thread may make, besides `socket` (conditional, below).
const DAEMON: &[i64] = &[
    // I/O on fds.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_ioctl,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    // Files.
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
    libc::SYS_mkdirat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_umask,
    libc::SYS_truncate,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync_file_range,
    libc::SYS_fadvise64,
    libc::SYS_copy_file_range,
    libc::SYS_memfd_create,
    // Memory.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_msync,
    libc::SYS_mincore,
    // Events and timers.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_ppoll,
    libc::SYS_pselect6,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    // io_uring: our rings are restricted to their opcodes when created
    // (`storage::uring`); workers cannot create or register rings (below).
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    // Sockets (creation is conditional, below).
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    libc::SYS_shutdown,
    // Threads, signals, process.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_setaffinity,
    libc::SYS_getrandom,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sigaltstack,
    libc::SYS_tkill,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_prctl,
    // Only ever adds filters (they cannot be removed): workers narrow their own.
    libc::SYS_seccomp,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_getrlimit,
    libc::SYS_prlimit64,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The x86_64-only forms of calls listed above (other architectures have only the `*at`
/// forms), allowed for every thread.
#[cfg(target_arch = "x86_64")]
const LEGACY: &[i64] = &[
    libc::SYS_open,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_readlink,
    libc::SYS_poll,
    libc::SYS_select,
    libc::SYS_epoll_wait,
    // librados' messenger (an `rbd:` disk's cluster connection) still uses the old form.
    libc::SYS_epoll_create,
    libc::SYS_dup2,
    libc::SYS_arch_prctl,
];
#[cfg(not(target_arch = "x86_64"))]
const LEGACY: &[i64] = &[];

/// The x86_64-only forms of calls taken away from workers.
#[cfg(target_arch = "x86_64")]
const LEGACY_NOT_FOR_WORKERS: &[i64] = &[libc::SYS_mkdir, libc::SYS_rmdir, libc::SYS_chmod];

/// x86_64-only forms workers keep (see the module doc: journal compaction).
#[cfg(target_arch = "x86_64")]
const LEGACY_FOR_ALL: &[i64] = &[libc::SYS_unlink, libc::SYS_rename];
#[cfg(not(target_arch = "x86_64"))]
const LEGACY_FOR_ALL: &[i64] = &[];
#[cfg(not(target_arch = "x86_64"))]
const LEGACY_NOT_FOR_WORKERS: &[i64] = &[];

/// Taken away from worker threads (on top of the daemon filter).
const NOT_FOR_WORKERS: &[i64] = &[
    libc::SYS_seccomp,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_register,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_mkdirat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_truncate,
    libc::SYS_memfd_create,
];

/// The socket families the daemon creates.
const FAMILIES: [i32; 3] = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6];

/// The compiled filter for `kind`.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SandboxError> {
    let compile = |e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DAEMON
        .iter()
        .chain(LEGACY)
        .chain(LEGACY_FOR_ALL)
        .chain(if kind == ThreadKind::Daemon {
            LEGACY_NOT_FOR_WORKERS
        } else {
            &[]
        })
        .filter(|s| {
            kind == ThreadKind::Daemon
                || !NOT_FOR_WORKERS.contains(s)
                || (kind == ThreadKind::Relay && **s == libc::SYS_memfd_create)
        })
        .map(|&s| (s, Vec::new()))
        .collect();
    // kill(pid, sig) and tgkill(tgid, tid, sig) only with our own pid as the first argument.
    let own = u64::from(std::process::id());
    for call in [libc::SYS_kill, libc::SYS_tgkill] {
        let rule = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, own)
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(compile)?;
        rules.insert(call, vec![rule]);
    }
    if kind == ThreadKind::Daemon {
        let families = FAMILIES
            .iter()
            .map(|&family| {
                SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    u64::from(family.unsigned_abs()),
                )
                .and_then(|c| SeccompRule::new(vec![c]))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(compile)?;
        rules.insert(libc::SYS_socket, families);
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    let filter = SeccompFilter::new(
        rules,
        // Anything not listed: refused with EPERM.
        SeccompAction::Errno(libc::EPERM.unsigned_abs()),
        SeccompAction::Allow,
        arch,
    )
    .map_err(compile)?;
    BpfProgram::try_from(filter).map_err(compile)
}
