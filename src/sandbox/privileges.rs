//! Dropping root's power: the capabilities the data plane never needs go at start, and with
//! `--user` the daemon runs as an unprivileged user.
//!
//! What the daemon does at run time needs two capabilities when it runs as root:
//! `CAP_NET_ADMIN` to create and configure taps (`TUNSETIFF`, interface flags) and
//! `CAP_DAC_OVERRIDE` to open images, tiers and sockets that belong to other users (QEMU's
//! images are often owned by `libvirt-qemu`). Everything else (`CAP_SYS_ADMIN`, `CAP_SETUID`,
//! `CAP_SYS_PTRACE`, `CAP_SYS_MODULE`, `CAP_CHOWN`, ...) leaves the permitted, effective and
//! bounding sets, so a compromised daemon cannot load modules, mount, trace other processes
//! or become any other user.
//!
//! With `--user NAME`, the daemon switches to that user and its primary group and keeps only
//! `CAP_NET_ADMIN` (for taps): files are then reached with that user's permissions, so the
//! images, tiers, sockets' directories and state directory must be accessible to it.
//!
//! Capabilities are per thread; this runs on the main thread before any other thread exists,
//! so every later thread inherits the reduced sets.

use caps::{CapSet, Capability, CapsHashSet};

use super::SandboxError;

/// Capabilities kept when the daemon stays root.
pub const KEPT_AS_ROOT: [Capability; 2] = [Capability::CAP_NET_ADMIN, Capability::CAP_DAC_OVERRIDE];
/// Capabilities kept after switching to `--user`.
pub const KEPT_AS_USER: [Capability; 1] = [Capability::CAP_NET_ADMIN];

/// A user to run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

impl User {
    /// Looks `name` up in the user database (or takes `UID:GID` as numbers).
    pub fn lookup(name: &str) -> Result<Self, SandboxError> {
        if let Some((uid, gid)) = name.split_once(':') {
            if let (Ok(uid), Ok(gid)) = (uid.parse(), gid.parse()) {
                return Ok(Self { uid, gid });
            }
        }
        let c_name = std::ffi::CString::new(name)
            .map_err(|_| SandboxError::Privileges(format!("bad user name {name:?}")))?;
        // SAFETY: getpwnam takes a NUL-terminated name and returns a pointer into static
        // storage or null; we copy the two ids out at once, before any other thread exists.
        let entry = unsafe { libc::getpwnam(c_name.as_ptr()) };
        if entry.is_null() {
            return Err(SandboxError::Privileges(format!("no user {name:?}")));
        }
        // SAFETY: non-null, as checked; valid until the next getpwnam call.
        let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
        Ok(Self { uid, gid })
    }
}

/// Drops every capability but those the daemon needs, switching to `user` first when given.
/// A daemon started without privileges has nothing to drop and is left as it is.
pub fn drop_privileges(user: Option<User>) -> Result<(), SandboxError> {
    let err = |what: &str| {
        let what = what.to_string();
        move |e: caps::errors::CapsError| SandboxError::Privileges(format!("{what}: {e}"))
    };
    let permitted = caps::read(None, CapSet::Permitted).map_err(err("cannot read capabilities"))?;
    if permitted.is_empty() {
        if user.is_some() {
            return Err(SandboxError::Privileges(
                "--user needs a daemon started as root".into(),
            ));
        }
        log::info!("sandbox: no capabilities to drop");
        return Ok(());
    }
    let keep: CapsHashSet = match user {
        Some(_) => KEPT_AS_USER.into_iter().collect(),
        None => KEPT_AS_ROOT.into_iter().collect(),
    };
    // The bounding set first (it needs CAP_SETPCAP, which goes with the rest below); only
    // what is still in it (a service manager may have bounded it already, and dropping even
    // an absent capability needs CAP_SETPCAP).
    let bounding =
        caps::read(None, CapSet::Bounding).map_err(err("cannot read the bounding set"))?;
    for cap in bounding.difference(&keep) {
        caps::drop(None, CapSet::Bounding, *cap)
            .map_err(err("cannot drop from the bounding set"))?;
    }
    if let Some(user) = user {
        switch_user(user)?;
    }
    let kept: CapsHashSet = keep.intersection(&permitted).copied().collect();
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(err("inheritable"))?;
    caps::clear(None, CapSet::Ambient).map_err(err("ambient"))?;
    // Effective first: it must stay a subset of permitted at every step.
    caps::set(None, CapSet::Effective, &kept).map_err(err("effective"))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(err("permitted"))?;
    let mut names: Vec<String> = kept.iter().map(ToString::to_string).collect();
    names.sort();
    match user {
        Some(user) => log::info!(
            "sandbox: running as uid {} gid {} with {names:?} only",
            user.uid,
            user.gid
        ),
        None => log::info!("sandbox: capabilities reduced to {names:?}"),
    }
    Ok(())
}

/// Switches uid and gid (all three of each, and the supplementary groups) keeping the
/// permitted capabilities across the uid change.
fn switch_user(user: User) -> Result<(), SandboxError> {
    let fail = |what: &str| {
        SandboxError::Privileges(format!("{what}: {}", std::io::Error::last_os_error()))
    };
    // SAFETY: plain system calls on this (the only) thread's credentials; each result is
    // checked. PR_SET_KEEPCAPS keeps the permitted set across setresuid; it is reset after.
    unsafe {
        if libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
            return Err(fail("PR_SET_KEEPCAPS"));
        }
        let groups = [user.gid];
        if libc::setgroups(1, groups.as_ptr()) != 0 {
            return Err(fail("setgroups"));
        }
        if libc::setresgid(user.gid, user.gid, user.gid) != 0 {
            return Err(fail("setresgid"));
        }
        if libc::setresuid(user.uid, user.uid, user.uid) != 0 {
            return Err(fail("setresuid"));
        }
        if libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) != 0 {
            return Err(fail("PR_SET_KEEPCAPS"));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn users_are_looked_up_by_name_or_number() {
        assert_eq!(User::lookup("root").unwrap(), User { uid: 0, gid: 0 });
        assert_eq!(
            User::lookup("1234:5678").unwrap(),
            User {
                uid: 1234,
                gid: 5678
            }
        );
        assert!(User::lookup("no-such-user-novacron").is_err());
        assert!(User::lookup("nul\0byte").is_err());
    }

    #[test]
    fn on_a_thread_of_its_own_only_the_kept_capabilities_remain() {
        // Capabilities are per thread: this thread's drop leaves the test runner alone.
        std::thread::spawn(|| {
            let before = caps::read(None, CapSet::Permitted).unwrap();
            drop_privileges(None).unwrap();
            let after = caps::read(None, CapSet::Effective).unwrap();
            if before.is_empty() {
                assert!(after.is_empty());
                return;
            }
            let want: CapsHashSet = KEPT_AS_ROOT.into_iter().collect();
            assert_eq!(after, want);
            assert_eq!(caps::read(None, CapSet::Permitted).unwrap(), want);
            assert!(!caps::has_cap(None, CapSet::Bounding, Capability::CAP_SYS_ADMIN).unwrap());
            // What was dropped cannot come back.
            assert!(caps::raise(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).is_err());
        })
        .join()
        .unwrap();
    }
}
