//! Landlock (through the `landlock` crate): with configured filesystem roots
//! (`--fs-root DIR`, repeatable) the daemon can reach files only beneath them — images, tiers,
//! sockets, the state directory — plus what it needs of the system: `/dev/net/tun` (taps),
//! `/dev/null`, read-only `/proc/self` (its own fds) and `/sys` (network interfaces). The kernel
//! checks every later open, so a symlink inside a root that points outside it leads nowhere,
//! whatever path a control client names. Applied at start, before any thread exists (a
//! Landlock domain covers the calling thread and the threads it creates later).

use std::path::PathBuf;

use landlock::{
    path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};

use super::SandboxError;

/// The newest ABI we ask for; older kernels get what they support (best effort, reported).
const ABI_WANTED: ABI = ABI::V5;

/// System paths the daemon needs read-write, beneath no root.
const SYSTEM_RW: [&str; 2] = ["/dev/net/tun", "/dev/null"];
/// System paths the daemon needs read-only.
const SYSTEM_RO: [&str; 2] = ["/proc/self", "/sys"];

/// Limits the calling thread (and every thread it starts afterwards) to `roots`.
pub fn restrict(roots: &[PathBuf]) -> Result<RulesetStatus, SandboxError> {
    let err = |e: landlock::RulesetError| SandboxError::Landlock(e.to_string());
    for root in roots {
        if !root.is_dir() {
            return Err(SandboxError::Landlock(format!(
                "--fs-root {}: not a directory",
                root.display()
            )));
        }
    }
    let all = AccessFs::from_all(ABI_WANTED);
    let status = Ruleset::default()
        .handle_access(all)
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(roots, all))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            SYSTEM_RW,
            AccessFs::from_file(ABI_WANTED),
        ))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            SYSTEM_RO,
            AccessFs::from_read(ABI_WANTED),
        ))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(status.ruleset)
}
