#!/usr/bin/env python3
"""The control experiment for issue 12 (NIC live migration): the same scenario as
tests/it/guest_migrate.rs's switch transfer, with QEMU's own virtio-net instead of novacrond.

Two guests (QEMU TCG) on taps in a bridge inside a network namespace the script makes
(`ncexp`; nothing leaves it): a server serving 16 MiB over HTTP and a client
downloading it at 2 MB/s (tc on its tap). A sixteenth in, the client migrates to a third
QEMU (`-incoming ... -S`, RAM in files); with both paused, the script compares the guests'
RAM page by page, prints the differing pages' first bytes, then lets the destination run and
reports whether its test passed. No novacrond and no vhost-user anywhere: pages that differ
here are QEMU's own.

Usage (root; needs target/guest from scripts/build-guest.sh target/guest, and tc):
    [QEMU=path/to/qemu-system-x86_64] scripts/qemu-migration-control.py [RUNS=1]
Run it beside a busy loop (`sh -c 'while :; do :; done' &`) to reproduce the loaded case.
Measured 2026-11-30: quiet, 1 run, 0 pages differ; with one busy loop, 3 of 10 runs ended with
3-5 differing kernel pages and 2 of those destinations crashed. QEMU 10.0.2
(QEMU=target/qemu-migration/usr/bin/qemu-system-x86_64, from scripts/migration-qemu.sh), with
one busy loop: 0 pages differ in 10 of 10 runs, every destination passes."""
import json, os, socket, subprocess, sys, time
G = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "guest")
NS = "ncexp"
D = "/tmp/qemu-migration-control"
TRANSFER = 16 << 20
QEMU = os.environ.get("QEMU", "qemu-system-x86_64")
def sh(*a, check=True):
    return subprocess.run(a, check=check, capture_output=True, text=True)
def ns(*a, check=True):
    return sh("ip", "netns", "exec", NS, *a, check=check)
def qemu(name, params, tap, mac, tag, incoming=None):
    mem = f"{D}/{tag}.ram"
    cmd = ["ip", "netns", "exec", NS, QEMU, "-accel", "tcg", "-machine", "q35",
           "-cpu", "max", "-smp", "2", "-m", "512M", "-nographic", "-no-reboot", "-nodefaults",
           "-object", f"memory-backend-file,id=mem,size=512M,share=on,mem-path={mem}",
           "-numa", "node,memdev=mem", "-kernel", f"{G}/vmlinuz", "-initrd", f"{G}/initramfs.gz",
           "-append", f"console=ttyS0 quiet panic=-1 novatest={name} {params}",
           "-serial", f"file:{D}/{tag}.console", "-qmp", f"unix:{D}/{tag}.qmp,server=on,wait=off",
           "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
           "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]
    if incoming:
        cmd += ["-incoming", f"unix:{incoming}", "-S"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
def qmp(tag, cmd, args=None):
    for _ in range(200):
        try:
            s = socket.socket(socket.AF_UNIX); s.connect(f"{D}/{tag}.qmp"); break
        except OSError:
            time.sleep(0.05)
    f = s.makefile("rw")
    f.readline(); f.write(json.dumps({"execute": "qmp_capabilities"}) + "\n"); f.flush(); f.readline()
    f.write(json.dumps({"execute": cmd, "arguments": args or {}}) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r:
            s.close(); return r
def tap_tx(tap):
    return int(ns("cat", f"/sys/class/net/{tap}/statistics/tx_bytes").stdout)
def run(i):
    sh("rm", "-rf", D); os.makedirs(D)
    sh("ip", "netns", "del", NS, check=False)
    sh("ip", "netns", "add", NS)
    ns("ip", "link", "add", "br0", "type", "bridge"); ns("ip", "link", "set", "br0", "up")
    ns("ip", "link", "set", "lo", "up")
    for t in ["tap-a", "tap-b", "tap-b2"]:
        ns("ip", "tuntap", "add", t, "mode", "tap"); ns("ip", "link", "set", t, "master", "br0")
        ns("ip", "link", "set", t, "up")
        if t != "tap-a":
            # 2 MB/s towards the client, as the novacrond test limits its port: the download
            # outlasts the migration.
            ns("tc", "qdisc", "add", "dev", t, "root", "tbf", "rate", "16mbit", "burst", "64kb", "latency", "500ms")
    srv = qemu("net-switch", f"novarole=server novaip=10.81.0.1 novapeer=10.81.0.2 novasize={TRANSFER}",
               "tap-a", "52:54:00:00:02:0a", "server")
    params = f"novaip=10.81.0.2 novapeer=10.81.0.1 novasize={TRANSFER}"
    cli = qemu("net-restart", params, "tap-b", "52:54:00:00:02:0b", "source")
    dst = qemu("net-restart", params, "tap-b2", "52:54:00:00:02:0b", "dest", incoming=f"{D}/mig.sock")
    t0 = time.time()
    while tap_tx("tap-b") < TRANSFER // 16:
        if time.time() - t0 > 240: print("no transfer"); return
        time.sleep(0.01)
    qmp("source", "migrate", {"uri": f"unix:{D}/mig.sock"})
    while True:
        st = qmp("source", "query-migrate")["return"]
        if st.get("status") in ("completed", "failed"): break
        time.sleep(0.05)
    # Both paused now: compare RAM page by page.
    a = open(f"{D}/source.ram", "rb").read(); b = open(f"{D}/dest.ram", "rb").read()
    diff = [o for o in range(0, len(a), 4096) if a[o:o+4096] != b[o:o+4096]]
    for o in diff[:4]:
        pa, pb = a[o:o+4096], b[o:o+4096]
        nd = sum(1 for x, y in zip(pa, pb) if x != y)
        first = next(k for k in range(4096) if pa[k] != pb[k])
        print(f"  page {hex(o)}: {nd} bytes differ, first at +{hex(first)}: src {pa[first:first+16].hex()} dst {pb[first:first+16].hex()}")
    print(f"run {i}: status={st.get('status')} downtime={st.get('downtime')} differing pages={len(diff)} {[hex(o) for o in diff[:8]]}", flush=True)
    qmp("source", "quit")
    qmp("dest", "cont")
    t0 = time.time()
    while time.time() - t0 < 120:
        c = open(f"{D}/dest.console", errors="replace").read()
        if "NOVATEST-EXIT" in c or dst.poll() is not None: break
        time.sleep(0.5)
    c = open(f"{D}/dest.console", errors="replace").read()
    print("  dest:", "EXIT=0" if "NOVATEST-EXIT=0" in c else ("crash/other: " + c[-600:]), flush=True)
    for p in (srv, cli, dst):
        p.kill(); p.wait()
    sh("ip", "netns", "del", NS, check=False)
for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 1):
    run(i)
