//! The test run's Ceph cluster: one single-node cluster (`scripts/ceph-cluster.sh`: a
//! monitor, a manager and one OSD on a file, loopback only) started by the first test that
//! asks and stopped by the script's watcher when this test binary exits.
//!
//! Tests that only use the cluster take [`Cluster::shared`]; the one that stops the OSD
//! takes [`Cluster::exclusive`], so no other test sees its fault.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The running cluster.
pub struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
    faults: RwLock<()>,
}

/// Runs `scripts/ceph-cluster.sh ACTION DIR EXTRA...`; panics with its stderr on failure.
fn script(action: &str, dir: &Path, extra: &[&str]) {
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ceph-cluster.sh"))
        .arg(action)
        .arg(dir)
        .args(extra)
        .output()
        .expect("run scripts/ceph-cluster.sh");
    assert!(
        out.status.success(),
        "ceph-cluster.sh {action} (scripts/install-deps.sh installs Ceph):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The cluster, started on first use (a missing Ceph fails loudly: CI installs it).
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let dir = PathBuf::from(format!("/tmp/nc-ceph-{}", std::process::id()));
        let started = std::time::Instant::now();
        script("start", &dir, &["--owner", &std::process::id().to_string()]);
        eprintln!("ceph cluster up in {:?}", started.elapsed());
        Cluster {
            conf: dir.join("ceph.conf"),
            dir,
            faults: RwLock::new(()),
        }
    })
}

impl Cluster {
    /// For a test that needs the cluster healthy throughout.
    pub fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.faults
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// For the test that injects a fault.
    pub fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.faults
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The `--blk` options reaching `image` in pool `rbd` as the unprivileged client.
    pub fn disk(&self, image: &str) -> String {
        format!("path=rbd:rbd/{image},{}", self.client_options())
    }

    /// Runs Ceph's CLI `program` (`rbd`, `rados`) as client.novacron with `args`; panics on
    /// failure; returns its stdout.
    fn cli(&self, program: &str, args: &[&str]) -> Vec<u8> {
        let out = Command::new(program)
            .arg("-c")
            .arg(&self.conf)
            .args(["--id", "novacron"])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Runs the `rbd` CLI (as client.novacron); panics on failure; returns its stdout.
    pub fn rbd(&self, args: &[&str]) -> Vec<u8> {
        self.cli("rbd", args)
    }

    /// Runs the `rados` CLI on pool `rbd` (as client.novacron); panics on failure.
    pub fn rados(&self, args: &[&str]) -> Vec<u8> {
        self.cli("rados", &[&["-p", "rbd"], args].concat())
    }

    /// The connection options of client.novacron (`ceph-conf`, `ceph-id`, `ceph-keyring`).
    fn client_options(&self) -> String {
        format!(
            "ceph-conf={},ceph-id=novacron,ceph-keyring={}",
            self.conf.display(),
            self.dir.join("ceph.client.novacron.keyring").display()
        )
    }

    /// A new, empty image of `size_mib` MiB with a unique name.
    pub fn new_image(&self, tag: &str, size_mib: u64) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("{tag}-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        self.rbd(&[
            "create",
            &format!("rbd/{name}"),
            "--size",
            &format!("{size_mib}M"),
        ]);
        name
    }

    /// The image's bytes, read by another client (`rbd export`).
    pub fn export(&self, image: &str) -> Vec<u8> {
        self.rbd(&["export", &format!("rbd/{image}"), "-"])
    }

    /// The image's size in bytes as the cluster reports it.
    pub fn size(&self, image: &str) -> u64 {
        let info: serde_json::Value = serde_json::from_slice(&self.rbd(&[
            "info",
            "--format",
            "json",
            &format!("rbd/{image}"),
        ]))
        .expect("rbd info json");
        info["size"].as_u64().expect("size")
    }

    /// Stops the OSD (I/O blocks) or starts it again (returns once PGs are clean).
    pub fn osd(&self, up: bool) {
        script(if up { "osd-start" } else { "osd-stop" }, &self.dir, &[]);
    }
}

impl Cluster {
    /// Writes `data` at `offset` of `image` and flushes, as a separate client (our own engine
    /// in this process; librbd hands the image's exclusive lock over and back).
    pub fn write_at(&self, image: &str, offset: u64, data: &[u8]) {
        use novacron::storage::rbd::{engine::RbdEngine, image::RbdImage, RbdSpec};
        use novacron::storage::{Engine, IoOp, OpKind};
        let mut spec = RbdSpec::parse(&format!("rbd:rbd/{image}")).unwrap();
        spec.client = novacron::storage::rbd::CephClient {
            conf: Some(self.conf.clone()),
            id: Some("novacron".into()),
            keyring: Some(self.dir.join("ceph.client.novacron.keyring")),
        };
        let opened = std::sync::Arc::new(RbdImage::open(&spec, false).expect("open the image"));
        let mut engine = RbdEngine::new(opened).unwrap();
        let mut buffer = data.to_vec();
        let iov = libc::iovec {
            iov_base: buffer.as_mut_ptr().cast(),
            iov_len: buffer.len(),
        };
        let mut done = Vec::new();
        for (tag, kind) in [(1, OpKind::Write { offset }), (2, OpKind::Flush)] {
            let iovecs = if tag == 1 { vec![iov] } else { Vec::new() };
            // SAFETY: `buffer` outlives the drain below and is not touched meanwhile.
            unsafe {
                engine.push(IoOp {
                    kind,
                    iovecs: iovecs.into(),
                    tag,
                })
            };
            engine.drain(&mut done);
        }
        assert!(
            done.iter().all(|c| c.result.is_ok()),
            "writing {image}: {done:?}"
        );
    }
}

impl Cluster {
    /// `tier-cold=` and connection options for a cold tier of RADOS objects named `prefix.*`
    /// in pool `rbd`.
    pub fn cold_tier(&self, prefix: &str) -> String {
        format!("tier-cold=rados:rbd/{prefix},{}", self.client_options())
    }

    /// The record objects (`prefix.<16 hex digits>`) in pool `rbd`.
    pub fn records(&self, prefix: &str) -> usize {
        let out = self.rados(&["ls"]);
        String::from_utf8_lossy(&out)
            .lines()
            .filter(|name| {
                name.strip_prefix(prefix)
                    .and_then(|rest| rest.strip_prefix('.'))
                    .is_some_and(|hex| hex.len() == 16)
            })
            .count()
    }

    /// A fresh object-name prefix.
    pub fn new_prefix(&self, tag: &str) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        format!(
            "{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }
}
