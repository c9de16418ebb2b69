#!/usr/bin/env bash
# Side by side: novacrond vs qemu-storage-daemon, the same libblkio load generator
# (scripts/blkload.rs) against both, 4 KiB random reads and writes at QD 1 and 32 on one
# queue, for a null device and a page-cached file on this machine's disk, with an
# interrupt-driven client (`irq`, what a guest driver does) and a busy-polling client (`poll`,
# which takes the client's wake-up cost out so the backend's own cost decides). The daemon is
# pinned to CPU 1 and the load generator to CPU 0; runs are interleaved (A B B A ...), ROUNDS
# of each, SECONDS long; the table shows medians and novacrond/qsd ratios (>1 means novacrond
# is faster for IOPS, lower is better for latency), the CPU each daemon used (cores, all its
# threads, from /proc/PID/stat), requests per CPU-second, and the spread of the runs.
#
# Usage: scripts/compare-qsd.sh [ROUNDS=3] [SECONDS=5]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
secs="${2:-5}"
command -v qemu-storage-daemon >/dev/null || { echo "install qemu-system-x86 (scripts/install-deps.sh)" >&2; exit 1; }
# NOVACROND=PATH runs another build of the daemon (an A/B against an older commit).
novacrond="$(realpath "${NOVACROND:-./target/release/novacrond}")"
cargo build --release --locked --bin novacrond --example blkload >/dev/null 2>&1
work="$PWD/target/compare"
rm -rf "$work"
mkdir -p "$work"
img="$work/file.img"
# A 1 GiB file, fully written so reads are served from the page cache, not holes.
dd if=/dev/urandom of="$img" bs=1M count=1024 status=none
cat "$img" > /dev/null

daemon_pid=""
stop_daemon() {
    if [ -n "$daemon_pid" ]; then
        kill "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
        daemon_pid=""
    fi
}
trap stop_daemon EXIT

start_daemon() { # which backing
    local which="$1" backing="$2" sock="$work/$1.sock"
    rm -f "$sock"
    if [ "$which" = novacrond ]; then
        if [ "$backing" = null ]; then spec="path=null,size=8G"; else spec="path=$img"; fi
        taskset -c 1 "$novacrond" --log-level warn --control none --blk "socket=$sock,$spec,queues=1" 2>>"$work/novacrond.log" &
    else
        if [ "$backing" = null ]; then
            dev="driver=null-co,node-name=n0,size=8589934592,read-zeroes=on"
        else
            dev="driver=file,node-name=n0,filename=$img,aio=io_uring,cache.direct=off"
        fi
        taskset -c 1 qemu-storage-daemon --blockdev "$dev" --object iothread,id=io0 \
            --export "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$sock,writable=on,num-queues=1,iothread=io0" 2>>"$work/qsd.log" &
    fi
    daemon_pid=$!
    for _ in $(seq 100); do [ -S "$sock" ] && return 0; sleep 0.05; done
    echo "$which did not create $sock" >&2
    exit 1
}

cpu_ticks() { # utime + stime of the daemon (all its threads), in clock ticks
    awk '{print $14 + $15}' "/proc/$daemon_pid/stat"
}

results="$work/results.txt"
: > "$results"
for backing in null file; do
    for rw in randread randwrite; do
        for qd in 1 32; do
          for client in irq poll; do
            for round in $(seq "$rounds"); do
                order="novacrond qsd"
                [ $((round % 2)) -eq 0 ] && order="qsd novacrond"
                for which in $order; do
                    start_daemon "$which" "$backing"
                    poll=off
                    [ "$client" = poll ] && poll=on
                    before="$(cpu_ticks)"; t0=$(date +%s.%N)
                    out="$(taskset -c 0 ./target/release/examples/blkload --socket "$work/$which.sock" \
                        --rw "$rw" --bs 4096 --qd "$qd" --seconds "$secs" --poll "$poll")"
                    after="$(cpu_ticks)"; t1=$(date +%s.%N)
                    stop_daemon
                    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
                    echo "$backing $rw $qd $client $which $((after - before)) $wall $out" >> "$results"
                    echo "  $backing $rw qd=$qd $client $which: $out" >&2
                done
            done
          done
        done
    done
done

python3 - "$results" "$(getconf CLK_TCK)" <<'PY'
import json, statistics, sys
hz = float(sys.argv[2])
rows = {}
for line in open(sys.argv[1]):
    backing, rw, qd, client, which, ticks, wall, js = line.split(' ', 7)
    run = json.loads(js)
    # The daemon's CPU, in cores, over the client's whole run (connect, warm-up and the
    # measured seconds; a busy backend shows as a full core whatever it serves).
    run['cpu'] = int(ticks) / hz / float(wall)
    run['kreq_cpu_s'] = run['iops'] / max(run['cpu'], 1e-3) / 1e3
    rows.setdefault((backing, rw, int(qd), client), {}).setdefault(which, []).append(run)
med = lambda runs, k: statistics.median(r[k] for r in runs)
spread = lambda runs: f"{min(r['iops'] for r in runs) / 1e3:,.0f}-{max(r['iops'] for r in runs) / 1e3:,.0f}k"
print(f"{'backing':8}{'load':11}{'qd':>4} {'client':>6} | {'novacrond IOPS':>15}{'qsd IOPS':>11}{'ratio':>7} | "
      f"{'p50 us n/q':>14}{'p99 us n/q':>16} | {'cpu n/q':>10} {'kreq/cpu-s n/q':>15} | spread n / q")
for (backing, rw, qd, client), r in sorted(rows.items()):
    n, q = r['novacrond'], r['qsd']
    ni, qi = med(n, 'iops'), med(q, 'iops')
    print(f"{backing:8}{rw:11}{qd:>4} {client:>6} | {ni:>15,.0f}{qi:>11,.0f}{ni/qi:>7.2f} | "
          f"{med(n,'p50_us'):>6.1f}/{med(q,'p50_us'):<7.1f}{med(n,'p99_us'):>7.1f}/{med(q,'p99_us'):<8.1f} | "
          f"{med(n,'cpu'):>4.2f}/{med(q,'cpu'):<5.2f} {med(n,'kreq_cpu_s'):>7,.0f}/{med(q,'kreq_cpu_s'):<7,.0f} | "
          f"{spread(n)} / {spread(q)}")
PY
