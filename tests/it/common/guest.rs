//! Booting a real Linux guest under QEMU (TCG) against the daemon.
//!
//! The guest image (kernel + busybox initramfs with tests/guest/*.sh) comes from
//! `scripts/build-guest.sh`, which this module runs when the image is missing or older than
//! the guest scripts. A missing QEMU or busybox is a test failure, never a skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where the guest image lives.
fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest")
}

/// Builds the guest image once per test process.
pub fn guest_image() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let status = Command::new("bash")
                .arg(root.join("scripts/build-guest.sh"))
                .arg(guest_dir())
                .stdout(Stdio::null())
                .status()
                .expect("run scripts/build-guest.sh");
            assert!(status.success(), "scripts/build-guest.sh failed");
            guest_dir()
        })
        .clone()
}

/// The QEMU that live-migration tests run: QEMU 10 from `scripts/migration-qemu.sh` (run
/// once per test process), with its own firmware ahead of the system's. Debian 12's QEMU 7.2
/// leaves guest pages stale at a switchover under TCG on a loaded host (see the script), and
/// those tests compare guest RAM byte for byte.
pub fn migration_qemu() -> Command {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("target/qemu-migration");
        let status = Command::new("bash")
            .arg(root.join("scripts/migration-qemu.sh"))
            .arg(&dir)
            .status()
            .expect("run scripts/migration-qemu.sh");
        assert!(status.success(), "scripts/migration-qemu.sh failed");
        dir
    });
    let mut cmd = Command::new(dir.join("usr/bin/qemu-system-x86_64"));
    let modules = dir.join("usr/lib/x86_64-linux-gnu/qemu");
    if modules.is_dir() {
        cmd.env("QEMU_MODULE_DIR", modules);
    }
    let firmware = dir.join("usr/share/qemu");
    if firmware.is_dir() {
        cmd.arg("-L").arg(firmware).args(["-L", "/usr/share/qemu"]);
    }
    cmd
}

/// What a guest run printed.
pub struct GuestRun {
    pub console: String,
    pub elapsed: Duration,
}

impl GuestRun {
    /// What follows `prefix` on the console line that starts with it (a value the guest
    /// printed, such as `serve md5=`); panics if no line does.
    pub fn value_of(&self, prefix: &str) -> String {
        self.console
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .unwrap_or_else(|| panic!("the guest printed no `{prefix}`"))
            .to_string()
    }

    /// Both guests passed, and this client downloaded exactly what `server` served (the md5
    /// each printed); `what` names the transfer in the failure.
    pub fn assert_downloaded_from(&self, server: &GuestRun, what: &str) {
        server.assert_passed();
        self.assert_passed();
        let served = server.value_of("serve md5=");
        assert!(
            self.console.contains(&format!("download md5={served}")),
            "{what}: the download is not the served file"
        );
    }

    /// Panics with the console unless the guest test exited 0.
    pub fn assert_passed(&self) {
        assert!(
            self.console.contains("NOVATEST-EXIT=0"),
            "guest test failed; console:\n{}",
            self.console
        );
    }
}

/// Boots the guest with `devices` (QEMU `-chardev/-device` arguments) running test `name`.
pub fn boot(name: &str, devices: &[String]) -> GuestRun {
    boot_with(name, devices, "")
}

/// The QEMU command for a guest running test `name` with kernel parameters `params`
/// (devices and I/O left to the caller); guest RAM is a memfd, or the file `memory` (to look
/// at it from outside).
pub fn qemu_command(name: &str, params: &str, memory: Option<&Path>) -> Command {
    guest_command(Command::new("qemu-system-x86_64"), name, params, memory)
}

/// [`qemu_command`] on the QEMU `cmd` starts.
pub fn guest_command(mut cmd: Command, name: &str, params: &str, memory: Option<&Path>) -> Command {
    let image = guest_image();
    let backend = match memory {
        Some(path) => format!(
            "memory-backend-file,id=mem,size=512M,share=on,mem-path={}",
            path.display()
        ),
        None => "memory-backend-memfd,id=mem,size=512M,share=on".to_string(),
    };
    cmd.args([
        "-accel", "tcg", "-machine", "q35", "-cpu", "max", "-smp", "2", "-m", "512M",
    ])
    .args(["-nographic", "-no-reboot", "-nodefaults"])
    .args(["-object", &backend, "-numa", "node,memdev=mem"])
    .arg("-kernel")
    .arg(image.join("vmlinuz"))
    .arg("-initrd")
    .arg(image.join("initramfs.gz"))
    .args([
        "-append",
        &format!("console=ttyS0 quiet panic=-1 novatest={name} {params}"),
    ])
    .stdin(Stdio::null());
    cmd
}

/// Like [`boot`], with `key=value` words added to the kernel command line for the test.
pub fn boot_with(name: &str, devices: &[String], params: &str) -> GuestRun {
    let qemu = qemu_command(name, params, None);
    let mut cmd = Command::new("timeout");
    cmd.args(["--kill-after=5", "180"])
        .arg(qemu.get_program())
        .args(qemu.get_args())
        .args(["-serial", "stdio"])
        .args(devices)
        .stdin(Stdio::null());
    let start = Instant::now();
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-system-x86_64: {e} (install qemu-system-x86)"));
    let console = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    eprintln!("--- guest console ({name}) ---\n{console}\n--- end ---");
    GuestRun {
        console,
        elapsed: start.elapsed(),
    }
}

/// QEMU arguments attaching a vhost-user-blk device on `socket`.
pub fn vhost_user_blk(id: &str, socket: &Path, queues: u16) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id={id},path={}", socket.display()),
        "-device".into(),
        format!("vhost-user-blk-pci,chardev={id},num-queues={queues}"),
    ]
}

/// Like [`vhost_user_blk`], with QEMU reconnecting (every second) when the daemon goes away.
pub fn vhost_user_blk_reconnect(id: &str, socket: &Path, queues: u16) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id={id},path={},reconnect=1", socket.display()),
        "-device".into(),
        format!("vhost-user-blk-pci,chardev={id},num-queues={queues}"),
    ]
}

/// QEMU arguments attaching a vhost-user-net device on `socket` with `pairs` queue pairs.
/// `vectors=0`: QEMU 7.2 crashes setting up MSI-X for vhost-user-net under TCG.
pub fn vhost_user_net(id: &str, socket: &Path, pairs: u16, mac: &str) -> Vec<String> {
    vhost_user_net_with(id, socket, pairs, mac, "")
}

/// Like [`vhost_user_net`], with extra chardev options (`,reconnect=1`).
pub fn vhost_user_net_with(
    id: &str,
    socket: &Path,
    pairs: u16,
    mac: &str,
    chardev: &str,
) -> Vec<String> {
    let mq = if pairs > 1 { ",mq=on" } else { "" };
    vec![
        "-chardev".into(),
        format!("socket,id={id},path={}{chardev}", socket.display()),
        "-netdev".into(),
        format!("vhost-user,id={id}net,chardev={id},queues={pairs}"),
        "-device".into(),
        format!("virtio-net-pci,netdev={id}net,mac={mac},vectors=0{mq}"),
    ]
}
