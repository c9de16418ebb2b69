//! Live migration of real guests (QEMU TCG, two QEMU processes on this host) whose disks and
//! NICs novacrond serves: dirty-page logging, the switchover, the image handed from the source
//! device to the destination device in a second daemon process, and a cancelled migration.
//!
//! The disk workload is the guest's `blk-crash` test: four writers write 256 KiB of fresh data
//! with O_DIRECT and read it back, round after round, on both sides of the migration; any lost
//! or stale write shows as a mismatch. Downtime and total time are reported next to
//! qemu-storage-daemon's on the same workload (two exports of one image, as FIELD-NOTES
//! describes).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::control::nic_bytes;
use crate::common::daemon::{start_failure, Daemon};
use crate::common::guest::vhost_user_blk;
use crate::common::qemu::{migrate, qmp, Migrated, Qemu};
use crate::common::writers::{completed_on, stop_writers_in};

const SIZE: u64 = 64 << 20;
/// Where the host writes data the guest never touches, and how much.
const UNTOUCHED: (u64, usize) = (32 << 20, 1 << 20);

/// One side's disk server.
pub(crate) enum Server {
    Novacron(Daemon),
    Qsd { child: Child, socket: PathBuf },
}

impl Server {
    fn socket(&self) -> PathBuf {
        match self {
            Server::Novacron(daemon) => daemon.path("c.sock"),
            Server::Qsd { socket, .. } => socket.clone(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Server::Qsd { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Which server the scenario runs against.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Peer {
    Novacron,
    /// novacrond with the image as a tiered disk's hot file (cold file beside it).
    NovacronTiered,
    Qsd,
}

/// Starts `peer`'s server for `image` in `dir` (`incoming`: the migration's destination).
fn serve(peer: Peer, image: &Path, dir: &Path, incoming: bool) -> Server {
    match peer {
        Peer::Novacron | Peer::NovacronTiered => {
            let disk = if peer == Peer::NovacronTiered {
                format!(
                    "tier-hot={},tier-cold={}.cold,extent=64K",
                    image.display(),
                    image.display()
                )
            } else {
                format!("path={}", image.display())
            };
            let spec = format!(
                "socket={{dir}}/c.sock,{disk},size={SIZE},queues=2,id=c{}",
                if incoming { ",incoming=on" } else { "" }
            );
            let dir = tempfile::tempdir_in(dir).unwrap();
            Server::Novacron(Daemon::start_in(dir, &["--blk", &spec]))
        }
        Peer::Qsd => {
            let tag = if incoming { "dst" } else { "src" };
            let socket = dir.join(format!("qsd-{tag}.sock"));
            let monitor = dir.join(format!("qsd-{tag}.qmp"));
            let child = Command::new("qemu-storage-daemon")
                .args([
                    "--blockdev",
                    &format!(
                        "driver=file,node-name=n0,filename={},aio=io_uring,locking=off",
                        image.display()
                    ),
                    "--object",
                    "iothread,id=io0",
                    "--export",
                    &format!(
                        "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={},\
                         writable=on,num-queues=2,iothread=io0",
                        socket.display()
                    ),
                    "--chardev",
                    &format!("socket,id=m,path={},server=on,wait=off", monitor.display()),
                    "--monitor",
                    "chardev=m",
                ])
                .stdin(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run qemu-storage-daemon: {e}"));
            // The export listens once the monitor answers.
            qmp(&monitor, "query-block-exports", json!({}));
            Server::Qsd { child, socket }
        }
    }
}

/// Calls tier method `method` with `params` (plus the disk's id) on a novacrond server.
fn tier_call(server: &Server, method: &str, mut params: serde_json::Value) -> serde_json::Value {
    let Server::Novacron(daemon) = server else {
        panic!("{method}: not a novacrond server")
    };
    params["id"] = json!("c");
    let mut ctl = crate::common::control::Control::connect(&daemon.path("control.sock"));
    ctl.call(method, params)
        .unwrap_or_else(|e| panic!("{method}: {e}"))
}

/// Both sides are novacrond: the source served before the switchover (`at_switchover`
/// requests) and nothing after it, while the destination served.
fn assert_handed_over(source: &Server, dest: &Server, at_switchover: Option<u64>) {
    let (Server::Novacron(source), Server::Novacron(dest)) = (source, dest) else {
        panic!("both sides are novacrond")
    };
    assert!(completed_on(dest, "c").0 > 0, "the destination served");
    assert!(at_switchover > Some(0), "the source served before");
    assert_eq!(Some(completed_on(source, "c").0), at_switchover);
}

/// [`assert_handed_over`] as `migrate_disk`'s check.
fn assert_handed_over_with(source: &Server, dest: &Server, _: &Path, at_switchover: Option<u64>) {
    assert_handed_over(source, dest, at_switchover);
}

/// A device of a third, unrelated user on `image` is refused (the image is in use).
fn assert_refused(image: &Path) {
    let socket = image.with_extension("unrelated.sock");
    let err = start_failure(&[
        "--control",
        "none",
        "--blk",
        &format!("socket={},path={}", socket.display(), image.display()),
    ]);
    assert!(err.contains("in use"), "{err}");
}

/// Waits until the guest's console shows `count` more progress lines than `from` had.
pub(crate) fn wait_progress(guest: &mut Qemu, count: usize, what: &str) {
    let progress = |c: &str| c.matches(": round ").count();
    let start = progress(&guest.console());
    guest.wait_console(what, Duration::from_secs(180), |console| {
        assert!(
            !console.contains("MISMATCH") && !console.contains("failed"),
            "{what}: the guest failed:\n{console}"
        );
        progress(console) >= start + count
    });
}

/// A guest writing its disk on `source` (once it is under way), and a QEMU waiting for it on
/// `dest`, listening on the returned migration socket in `dir`.
pub(crate) fn writing_guest_and_destination(
    source: &Server,
    dest: &Server,
    dir: &Path,
) -> (Qemu, Qemu, PathBuf) {
    let mut guest = Qemu::spawn(
        "blk-crash",
        "",
        &vhost_user_blk("c", &source.socket(), 2),
        dir,
        "source",
        None,
    );
    wait_progress(&mut guest, 4, "before the migration");
    let channel = dir.join("migrate.sock");
    let arrived = Qemu::spawn(
        "blk-crash",
        "",
        &vhost_user_blk("c", &dest.socket(), 2),
        dir,
        "dest",
        Some(&channel),
    );
    (guest, arrived, channel)
}

/// The disk scenario: a guest under write+verify load migrates from a QEMU on `peer`'s source
/// server to a QEMU on its destination server, goes on writing there, and finishes clean.
/// `checks` runs once the destination serves (with the two servers).
/// `checks` gets the two servers, the image and how many requests the source had served when
/// the migration completed (novacrond only).
fn migrate_disk(peer: Peer, checks: impl FnOnce(&Server, &Server, &Path, Option<u64>)) -> Migrated {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("c.img");
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(SIZE).unwrap();
    // Data the guest never touches (its writers use the first 4 MiB): on a tiered disk it
    // goes cold before the migration and must read back after it.
    let untouched = crate::common::blk::pattern(7, UNTOUCHED.1);
    std::os::unix::fs::FileExt::write_all_at(&file, &untouched, UNTOUCHED.0).unwrap();
    drop(file);
    let source = serve(peer, &image, dir.path(), false);
    let dest = serve(peer, &image, dir.path(), true);
    let (mut guest, mut arrived, channel) =
        writing_guest_and_destination(&source, &dest, dir.path());
    if peer == Peer::NovacronTiered {
        // Everything cold (the writers promote what they touch again), then a demotion of
        // everything left running into the migration: moves race the switchover.
        tier_call(&source, "tier.demote", json!({"all": true, "wait": true}));
        tier_call(&source, "tier.demote", json!({"all": true}));
    }
    let migrated = migrate(&mut guest, &arrived, &channel);
    migrated.assert_same_memory();
    let source_served = match &source {
        Server::Novacron(daemon) => Some(completed_on(daemon, "c").0),
        Server::Qsd { .. } => None,
    };
    // The destination goes on where the source stopped.
    wait_progress(&mut arrived, 4, "after the migration");
    guest.quit();
    checks(&source, &dest, &image, source_served);
    if peer == Peer::NovacronTiered {
        // The destination took the source's map: the untouched data is cold there, and comes
        // back intact (the stop marker goes into the hot file, so everything comes back).
        let moved = tier_call(&dest, "tier.promote", json!({"all": true, "wait": true}));
        let extents = UNTOUCHED.1 as u64 / (64 << 10);
        assert!(
            moved["moved"].as_u64() >= Some(extents),
            "the destination did not see the cold extents: {moved}"
        );
        let mut back = vec![0u8; UNTOUCHED.1];
        let hot = std::fs::File::open(&image).unwrap();
        std::os::unix::fs::FileExt::read_exact_at(&hot, &mut back, UNTOUCHED.0).unwrap();
        assert!(back == untouched, "cold data changed across the migration");
    }
    stop_writers_in(&image, SIZE);
    let run = arrived.wait(Duration::from_secs(120));
    run.assert_passed();
    assert!(run.console.contains("crash-writers ok"), "{}", run.console);
    assert!(!run.console.contains("I/O error"), "{}", run.console);
    migrated
}

#[test]
fn a_guest_writing_its_disk_migrates_to_a_second_daemon_on_the_same_image() {
    let ours = migrate_disk(Peer::Novacron, |source, dest, image, at_switchover| {
        assert_handed_over(source, dest, at_switchover);
        // The destination holds the image now: an unrelated device is refused.
        assert_refused(image);
    });
    let theirs = migrate_disk(Peer::Qsd, |_, _, _, _| {});
    eprintln!(
        "migration under 4-writer O_DIRECT load (TCG, 512 MiB guest):\n\
         peer                   downtime ms   total ms\n\
         novacrond              {:>11}   {:>8}\n\
         qemu-storage-daemon    {:>11}   {:>8}",
        ours.downtime_ms, ours.total_ms, theirs.downtime_ms, theirs.total_ms
    );
}

#[test]
fn a_guest_writing_its_tiered_disk_migrates_to_a_second_daemon() {
    let migrated = migrate_disk(Peer::NovacronTiered, assert_handed_over_with);
    eprintln!(
        "tiered disk migration: downtime {} ms, total {} ms",
        migrated.downtime_ms, migrated.total_ms
    );
}

#[test]
fn a_cancelled_migration_leaves_the_source_running_and_correct() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("c.img");
    let source = serve(Peer::Novacron, &image, dir.path(), false);
    let dest = serve(Peer::Novacron, &image, dir.path(), true);
    let (mut guest, arrived, channel) = writing_guest_and_destination(&source, &dest, dir.path());
    // Slow enough to be cancelled midway: 512 MiB at 8 MiB/s.
    guest.qmp("migrate-set-parameters", json!({"max-bandwidth": 8 << 20}));
    guest.qmp(
        "migrate",
        json!({"uri": format!("unix:{}", channel.display())}),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = guest.qmp("query-migrate", json!({}));
        if info["status"] == "active" && info["ram"]["transferred"].as_u64() > Some(16 << 20) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "migration never got going: {info}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    guest.qmp("migrate_cancel", json!({}));
    loop {
        let info = guest.qmp("query-migrate", json!({}));
        if info["status"] == "cancelled" {
            break;
        }
        assert!(Instant::now() < deadline, "migration not cancelled: {info}");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(arrived);
    // The source goes on, and still owns its image.
    wait_progress(&mut guest, 8, "after the cancel");
    assert_refused(&image);
    if let Server::Novacron(dest) = &dest {
        assert_eq!(completed_on(dest, "c").0, 0, "the destination never served");
    }
    stop_writers_in(&image, SIZE);
    let run = guest.wait(Duration::from_secs(120));
    run.assert_passed();
    assert!(run.console.contains("crash-writers ok"), "{}", run.console);
}

#[test]
fn a_guest_downloading_from_another_over_the_switch_migrates_mid_transfer() {
    migrate_switch_transfer(Phase::Download);
}

#[test]
fn a_guest_uploading_to_another_over_the_switch_migrates_mid_transfer() {
    migrate_switch_transfer(Phase::Upload);
}

/// When the switch-transfer scenario migrates the client.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// A sixteenth into its download.
    Download,
    /// Once its download is in (its 4 MiB upload, at 1 MB/s, follows).
    Upload,
}

fn migrate_switch_transfer(phase: Phase) {
    use crate::common::guest::{boot_with, vhost_user_net};
    const TRANSFER: usize = 16 << 20;
    const CLIENT_MAC: &str = "52:54:00:00:02:0b";
    // The client's port, and its migration destination's port with the same MAC. Both
    // receive at most 2 MB/s and send at most 1 MB/s, so the download (8 s) and the upload
    // (4 s) each outlast the migration (about one) whatever the machine's speed.
    let args = [
        "--net",
        "socket={dir}/a.sock,switch=m1,mac=52:54:00:00:02:0a,id=a",
        "--net",
        "socket={dir}/b.sock,switch=m1,mac=52:54:00:00:02:0b,id=b,rx-bps=2M,tx-bps=1M",
        "--net",
        "socket={dir}/b2.sock,switch=m1,mac=52:54:00:00:02:0b,id=b2,incoming=on,rx-bps=2M,\
         tx-bps=1M",
    ];
    let daemon = Daemon::start(&args);
    let server = vhost_user_net("a", &daemon.path("a.sock"), 1, "52:54:00:00:02:0a");
    let server = std::thread::spawn(move || {
        boot_with(
            "net-switch",
            &server,
            &format!("novarole=server novaip=10.81.0.1 novapeer=10.81.0.2 novasize={TRANSFER}"),
        )
    });
    let params = format!("novaip=10.81.0.2 novapeer=10.81.0.1 novasize={TRANSFER}");
    let dir = tempfile::tempdir().unwrap();
    let mut client = Qemu::spawn(
        "net-restart",
        &params,
        &vhost_user_net("b", &daemon.path("b.sock"), 1, CLIENT_MAC),
        dir.path(),
        "source",
        None,
    );
    let channel = dir.path().join("migrate.sock");
    let arrived = Qemu::spawn(
        "net-restart",
        &params,
        &vhost_user_net("b2", &daemon.path("b2.sock"), 1, CLIENT_MAC),
        dir.path(),
        "dest",
        Some(&channel),
    );
    // Migrate once a sixteenth of the file has crossed the switch, or all of it (the
    // destination QEMU is up first: the transfer takes seconds).
    let deadline = Instant::now() + Duration::from_secs(170);
    let at = match phase {
        Phase::Download => TRANSFER / 16,
        Phase::Upload => TRANSFER,
    };
    while nic_bytes(&daemon, "b", "rx_bytes") < at as u64 {
        assert!(
            !client.exited(),
            "the client stopped:\n{}",
            client.console()
        );
        assert!(Instant::now() < deadline, "the transfer never got going");
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = nic_bytes(&daemon, "b", "rx_bytes");
    let migrated = migrate(&mut client, &arrived, &channel);
    migrated.assert_same_memory();
    let before_switch = client.quit();
    eprintln!("--- source console ---\n{before_switch}\n--- end ---");
    let mut run = arrived.wait(Duration::from_secs(170));
    let server = server.join().unwrap();
    // The transfer straddled the switchover: the phase ended on the destination, whose port
    // carried a good part of it.
    let ended_there = match phase {
        Phase::Download => "download md5=",
        Phase::Upload => "upload want=",
    };
    assert!(
        run.console.contains(ended_there),
        "the {phase:?} ended before the switchover ({} ms); source console:\n{before_switch}",
        migrated.total_ms
    );
    let after = nic_bytes(&daemon, "b2", "rx_bytes");
    let carried = match phase {
        Phase::Download => after,
        Phase::Upload => nic_bytes(&daemon, "b2", "tx_bytes"),
    };
    assert!(
        carried >= 1 << 20,
        "the destination port carried only {carried} bytes of the {phase:?}"
    );
    // The guest's whole story: what it printed before the switchover, then after.
    run.console = before_switch + &run.console;
    // The guest took VIRTIO_NET_F_GUEST_ANNOUNCE (bit 21): QEMU had it announce itself at
    // the destination (gratuitous ARP from its own addresses) rather than send a RARP for it.
    let features = run.value_of("features=");
    assert_eq!(
        features.as_bytes().get(21),
        Some(&b'1'),
        "GUEST_ANNOUNCE not negotiated: {features}"
    );
    run.assert_downloaded_from(&server, "the transfer across the migration");
    let pings = server.value_of("ping: ");
    assert!(pings.contains("packet loss"), "{pings}");
    eprintln!(
        "switch transfer migrated ({phase:?}) after {before} bytes: downtime {} ms, total {} \
         ms; the destination port received {after} bytes; the peer's pings (10/s) throughout: \
         {pings}",
        migrated.downtime_ms, migrated.total_ms
    );
}
