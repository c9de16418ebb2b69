#!/usr/bin/env bash
# Side by side on one Ceph cluster: novacrond's rbd engine vs qemu-storage-daemon's rbd driver,
# the same libblkio load generator (scripts/blkload.rs, interrupt-driven, one queue) against
# both, 4 KiB random reads and writes at QD 1 and 32 on the same 1 GiB image (written in full
# first, so reads reach real objects). The cluster is the single-node one of
# scripts/ceph-cluster.sh (its OSD shares this machine: absolute numbers are this machine's,
# the ratios are the point). The daemon under test is pinned to CPU 1, the client to CPU 0;
# runs are interleaved (A B B A ...), ROUNDS of each, SECONDS long. The table shows medians,
# novacrond/qsd IOPS ratios (>1: novacrond faster) and the CPU time each daemon spent per
# request (its own threads and librbd's, from /proc/PID/stat), so a win bought with CPU shows.
#
# Usage: scripts/compare-rbd.sh [ROUNDS=3] [SECONDS=5]
# (LOADS="randread", DEPTHS="32" pick rows; NOVACROND_OPTS=",poll=off" adds device options.)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
secs="${2:-5}"
command -v qemu-storage-daemon >/dev/null || { echo "install qemu-system-x86 (scripts/install-deps.sh)" >&2; exit 1; }
[ -e /usr/lib/x86_64-linux-gnu/qemu/block-rbd.so ] || { echo "install qemu-block-extra (scripts/install-deps.sh)" >&2; exit 1; }
novacrond="$(realpath "${NOVACROND:-./target/release/novacrond}")"
cargo build --release --locked --bin novacrond --example blkload >/dev/null 2>&1
work="$PWD/target/compare-rbd"
rm -rf "$work"
mkdir -p "$work"
cluster="/tmp/nc-compare-rbd-$$"
conf="$cluster/ceph.conf"
keyring="$cluster/ceph.client.novacron.keyring"

daemon_pid=""
stop_daemon() {
    if [ -n "$daemon_pid" ]; then
        kill "$daemon_pid" 2>/dev/null || true
        # qemu-storage-daemon with its rbd driver has been seen to hang on SIGTERM here.
        for _ in $(seq 100); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.05; done
        if kill -9 "$daemon_pid" 2>/dev/null; then
            echo "  (killed with SIGKILL after 5 s: it did not exit on SIGTERM)" >&2
        fi
        wait "$daemon_pid" 2>/dev/null || true
        daemon_pid=""
        # The next run must not wait for this one's exclusive lock: a killed client's watch
        # lingers until the OSD times it out (30 s).
        for _ in $(seq 90); do
            rbd -c "$conf" --id novacron status rbd/bench 2>/dev/null | grep "Watchers: none" >/dev/null && return 0
            sleep 0.5
        done
        echo "  the image still has watchers" >&2
    fi
}
cleanup() {
    stop_daemon
    bash scripts/ceph-cluster.sh stop "$cluster" >/dev/null 2>&1 || true
}
trap cleanup EXIT

bash scripts/ceph-cluster.sh start "$cluster" --owner $$ >/dev/null
rbd -c "$conf" --id novacron create rbd/bench --size 1G
rbd -c "$conf" --id novacron bench --io-type write --io-size 4M --io-pattern seq \
    --io-total 1G rbd/bench >/dev/null

start_daemon() { # which
    local which="$1" sock="$work/$1.sock"
    rm -f "$sock"
    if [ "$which" = novacrond ]; then
        taskset -c 1 "$novacrond" --log-level warn --control none --blk \
            "socket=$sock,path=rbd:rbd/bench,ceph-conf=$conf,ceph-id=novacron,ceph-keyring=$keyring,queues=1${NOVACROND_OPTS:-}" \
            2>>"$work/novacrond.log" &
    else
        taskset -c 1 qemu-storage-daemon \
            --blockdev "driver=rbd,node-name=n0,pool=rbd,image=bench,conf=$conf,user=novacron" \
            --object iothread,id=io0 \
            --export "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$sock,writable=on,num-queues=1,iothread=io0" \
            2>>"$work/qsd.log" &
    fi
    daemon_pid=$!
    for _ in $(seq 200); do [ -S "$sock" ] && return 0; sleep 0.05; done
    echo "$which did not create $sock" >&2
    exit 1
}

cpu_ticks() { # utime + stime of the daemon, in clock ticks
    awk '{print $14 + $15}' "/proc/$daemon_pid/stat"
}

results="$work/results.txt"
: > "$results"
for rw in ${LOADS:-randread randwrite}; do
    for qd in ${DEPTHS:-1 32}; do
        for round in $(seq "$rounds"); do
            order="novacrond qsd"
            [ $((round % 2)) -eq 0 ] && order="qsd novacrond"
            for which in $order; do
                start_daemon "$which"
                before="$(cpu_ticks)"
                out="$(taskset -c 0 ./target/release/examples/blkload --socket "$work/$which.sock" \
                    --rw "$rw" --bs 4096 --qd "$qd" --seconds "$secs" --poll off)"
                after="$(cpu_ticks)"
                stop_daemon
                echo "$rw $qd $which $((after - before)) $out" >> "$results"
                echo "  $rw qd=$qd $which: cpu_ticks=$((after - before)) $out" >&2
            done
        done
    done
done

python3 - "$results" "$secs" "$(getconf CLK_TCK)" <<'PY'
import json, statistics, sys
secs, hz = float(sys.argv[2]), float(sys.argv[3])
rows = {}
for line in open(sys.argv[1]):
    rw, qd, which, ticks, js = line.split(' ', 4)
    run = json.loads(js)
    run['cpu_us_per_req'] = int(ticks) / hz * 1e6 / max(run['iops'] * secs, 1)
    rows.setdefault((rw, int(qd)), {}).setdefault(which, []).append(run)
med = lambda runs, k: statistics.median(r[k] for r in runs)
spread = lambda runs: f"{min(r['iops'] for r in runs):,.0f}-{max(r['iops'] for r in runs):,.0f}"
print(f"{'load':11}{'qd':>4} | {'novacrond IOPS':>15}{'qsd IOPS':>11}{'ratio':>7} | "
      f"{'p50 us n/q':>16} | {'CPU us/req n/q':>16} | spread n / q")
for (rw, qd), r in sorted(rows.items()):
    n, q = r['novacrond'], r['qsd']
    ni, qi = med(n, 'iops'), med(q, 'iops')
    print(f"{rw:11}{qd:>4} | {ni:>15,.0f}{qi:>11,.0f}{ni/qi:>7.2f} | "
          f"{med(n,'p50_us'):>7.0f}/{med(q,'p50_us'):<8.0f} | "
          f"{med(n,'cpu_us_per_req'):>7.1f}/{med(q,'cpu_us_per_req'):<8.1f} | {spread(n)} / {spread(q)}")
PY
