//! libvirt for real: Debian's libvirtd (started by `scripts/libvirt-up.sh`, no systemd) runs
//! a TCG domain whose disk is `<disk type='vhostuser'>` and whose NIC is
//! `<interface type='vhostuser'>`, both served by novacrond (the XML is
//! `packaging/libvirt/novacron-domain.xml`, shown in the README). The guest writes and
//! reads back its disk and pings a peer across the NIC; a second disk, added to the daemon
//! at run time, is hot-plugged with `virsh attach-device`, used, and unplugged with
//! `virsh detach-device`; then `virsh destroy` + `virsh start`: the daemon sees QEMU vanish
//! and come back, and the second boot reads back the first boot's data and pings again.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::control::Control;
use crate::common::daemon::Daemon;
use crate::common::guest::guest_image;
use crate::common::netns::NetNs;

fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .arg("-c")
        .arg("qemu:///system")
        .args(args)
        .output()
        .expect("run virsh");
    assert!(
        out.status.success(),
        "virsh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A defined domain, undefined (and destroyed) when dropped.
struct Domain(String);

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-c", "qemu:///system", "destroy", &self.0])
            .output();
        let _ = Command::new("virsh")
            .args(["-c", "qemu:///system", "undefine", &self.0])
            .output();
    }
}

fn template(name: &str, fill: &[(&str, String)]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging/libvirt")
        .join(name);
    let mut xml = std::fs::read_to_string(path).unwrap();
    for (key, value) in fill {
        xml = xml.replace(key, value);
    }
    let unfilled =
        xml.split('@').skip(1).step_by(2).any(|word| {
            !word.is_empty() && word.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        });
    assert!(!unfilled, "unfilled placeholder in {name}");
    xml
}

/// Waits until the console file contains `needle` after byte `from` (TCG boots are slow:
/// 180 s at most; the console is a file libvirt's QEMU writes, polled: there is no event).
fn console_until(console: &Path, from: usize, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let text = std::fs::read(console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let fresh = text.get(from..).unwrap_or("");
        if fresh.contains(needle) {
            return text;
        }
        // Any exit status but 0 (NOVATEST-EXIT=127 included) or a panic ends the wait.
        let failed = fresh
            .match_indices("NOVATEST-EXIT=")
            .any(|(at, m)| !fresh[at + m.len()..].starts_with('0'));
        assert!(
            !failed && !fresh.contains("Kernel panic"),
            "guest failed:\n{text}"
        );
        assert!(
            Instant::now() < deadline,
            "no `{needle}` on the console in 180 s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn the_readme_shows_the_domain_the_test_uses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let domain =
        std::fs::read_to_string(root.join("packaging/libvirt/novacron-domain.xml")).unwrap();
    let key = [
        "vhostuser",
        "memfd",
        "access mode",
        "reconnect",
        "<acpi/>",
        "model type='virtio'",
    ];
    let lines: Vec<&str> = domain
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('<') && !l.starts_with("<!--"))
        .filter(|l| key.iter().any(|k| l.contains(k)))
        .collect();
    assert!(lines.len() >= 7, "{lines:?}");
    for line in lines {
        assert!(
            readme.contains(line),
            "README's libvirt section lacks `{line}`"
        );
    }
}

fn domain_state(name: &str) -> String {
    virsh(&["domstate", name]).trim().to_string()
}

#[test]
fn a_libvirt_domain_uses_novacrond_disks_and_nics_hotplug_and_reconnect() {
    let status = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/libvirt-up.sh"))
        .status()
        .expect("run scripts/libvirt-up.sh");
    assert!(status.success(), "libvirt-up.sh failed");
    let image = guest_image();
    let ns = NetNs::new("nc-libvirt");
    let daemon = Daemon::start_in_netns(
        &ns.name,
        &[
            "--blk",
            "socket={dir}/d0.sock,path={dir}/d0.img,size=64M",
            "--net",
            "socket={dir}/n0.sock,tap=nclvtap0,mac=52:54:00:aa:00:01",
        ],
    );
    ns.ip(&["addr", "add", "10.78.0.1/24", "dev", "nclvtap0"]);
    ns.ip(&["link", "set", "nclvtap0", "up"]);
    let name = format!("novacron-test-{}", std::process::id());
    let console = daemon.path("console.log");
    let xml = template(
        "novacron-domain.xml",
        &[
            ("@NAME@", name.clone()),
            ("@KERNEL@", image.join("vmlinuz").display().to_string()),
            ("@INITRD@", image.join("initramfs.gz").display().to_string()),
            (
                "@CMDLINE@",
                "console=ttyS0 quiet panic=-1 novatest=libvirt novaip=10.78.0.2 novapeer=10.78.0.1"
                    .to_string(),
            ),
            (
                "@DISK_SOCKET@",
                daemon.path("d0.sock").display().to_string(),
            ),
            ("@NET_SOCKET@", daemon.path("n0.sock").display().to_string()),
            ("@MAC@", "52:54:00:aa:00:01".to_string()),
            ("@CONSOLE@", console.display().to_string()),
        ],
    );
    let xml_path = daemon.path("domain.xml");
    std::fs::write(&xml_path, xml).unwrap();
    virsh(&["define", xml_path.to_str().unwrap()]);
    let domain = Domain(name.clone());
    virsh(&["start", &name]);
    let text = console_until(&console, 0, "READY-FOR-HOTPLUG");
    assert!(text.contains("boot=1 pattern"), "{text}");
    assert!(text.contains("ping ok"), "{text}");

    // A disk added to the daemon at run time, hot-plugged into the running guest.
    let mut control = Control::connect(&daemon.path("control.sock"));
    control
        .call(
            "device.add",
            serde_json::json!({
                "type": "blk",
                "socket": daemon.path("d1.sock").display().to_string(),
                "path": daemon.path("d1.img").display().to_string(),
                "size": "16M",
            }),
        )
        .unwrap();
    let hotplug = template(
        "novacron-hotplug-disk.xml",
        &[(
            "@DISK_SOCKET@",
            daemon.path("d1.sock").display().to_string(),
        )],
    );
    let hotplug_path = daemon.path("hotplug.xml");
    std::fs::write(&hotplug_path, hotplug).unwrap();
    virsh(&[
        "attach-device",
        &name,
        hotplug_path.to_str().unwrap(),
        "--live",
    ]);
    console_until(&console, 0, "hotplug ok");
    console_until(&console, 0, "READY-FOR-UNPLUG");
    virsh(&[
        "detach-device",
        &name,
        hotplug_path.to_str().unwrap(),
        "--live",
    ]);
    let text = console_until(&console, 0, "WAITING-FOR-DESTROY");
    assert!(text.contains("unplug ok"), "{text}");
    let stats = control
        .call("device.stats", serde_json::json!({"id": "d1"}))
        .unwrap();
    assert!(
        stats.to_string().contains("\"write\""),
        "the hot-plugged disk saw no writes: {stats}"
    );

    // Destroy (QEMU killed under the daemon) and start again: the daemon serves the new QEMU.
    virsh(&["destroy", &name]);
    assert_eq!(domain_state(&name), "shut off");
    // libvirt truncates the console file on start: keep the first boot's apart.
    std::fs::rename(&console, daemon.path("console-boot1.log")).unwrap();
    virsh(&["start", &name]);
    let second = console_until(&console, 0, "NOVATEST-EXIT=0");
    assert!(second.contains("boot=2 pattern"), "{second}");
    assert!(second.contains("ping ok"), "{second}");
    drop(domain);
    drop(daemon);
}
