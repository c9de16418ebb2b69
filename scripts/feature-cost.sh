#!/usr/bin/env bash
# What scaling out and switching features on cost, measured in one run (issue "Line-rate data
# path", item 6); every row is a ratio of two configurations of novacrond run interleaved
# (A B B A ...), ROUNDS of each, SECONDS long, medians:
#
#  blk-queues  aggregate IOPS with 2 queues vs 1 (libblkio `blkload --queues N`, QD 32 on
#              each queue, interrupt-driven client, null device and a page-cached file).
#              Daemon and client share both CPUs here: with one CPU for the daemon, a
#              second queue has no core to run on.
#  blk-qos     a QoS limit that never binds (iops=100M, bps=1T) vs none: null device, QD 32,
#              polling and interrupt-driven client; daemon on CPU 1, client on CPU 0; both
#              devices in one daemon, the load alternating between them every 50 ms
#              (`blkload --alternate`): the medians of the paired ratios with the limit on
#              one device, then on the other, and their geometric mean (the cost).
#  net-pairs   packets/s with 2 queue pairs vs 1: dpdk-testpmd mac-forwarding through two
#              switch ports (as in compare-dpdk.sh), --rxq/--txq 2, 64-byte frames; element on
#              CPU 1, testpmd on CPU 0 (tests/it/dpdk_frontend.rs checks both directions of
#              both pairs keep flowing).
#  net-qos     tx limits that never bind (100M pps, 1T bytes/s) vs none: a testpmd `txonly`
#              front-end into two ports of one daemon, 64-byte frames, novacrond's own tx
#              counters over the same seconds; the limit on one port, then on the other, and
#              the geometric mean of the two ratios (as blk-qos).
#
# A tiered disk's hot extents against a plain disk: scripts/tier-bench.sh.
#
# Usage: scripts/feature-cost.sh [ROUNDS=3] [SECONDS=4]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
secs="${2:-4}"
command -v dpdk-testpmd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dpdk-dev >/dev/null
cargo build --release --locked --bin novacrond --bin novactl --example blkload >/dev/null 2>&1
novacrond="$(realpath ./target/release/novacrond)"
work="$PWD/target/feature-cost"
rm -rf "$work"
mkdir -p "$work"
img="$work/file.img"
dd if=/dev/urandom of="$img" bs=1M count=1024 status=none
cat "$img" > /dev/null
if [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 1024 ]; then echo 1024 > /proc/sys/vm/nr_hugepages; fi
mkdir -p /dev/hugepages
mountpoint -q /dev/hugepages || mount -t hugetlbfs nodev /dev/hugepages

pid=""
stop() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    pid=""
    rm -f /dev/hugepages/nc-fc-* 2>/dev/null || true
}
trap stop EXIT
wait_socket() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }
start() { # cpus, then novacrond arguments
    local cpus="$1"; shift
    rm -f "$work"/*.sock
    # A log that runs away must never fill the disk: cap it at 100 MB.
    (ulimit -f 200000; exec taskset -c "$cpus" "$novacrond" --log-level warn --control "$work/c.sock" "$@" 2>>"$work/novacrond.log") &
    pid=$!
    wait_socket "$work/c.sock"
}
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ratio() { awk -v n="$1" -v d="$2" 'BEGIN { if (d > 0) printf "%.3f", n / d; else print "-" }'; }
# paired_row NAME ON_B ON_A NOTE: a paired cost row: B/A with the limit on B, B/A with it on A,
# and their geometric mean sqrt(on_b / on_a) (the cost, the devices' own difference cancelled).
paired_header() { printf "%-34s %14s %14s %8s\n" "paired row" "B/A limit on B" "on A" "cost"; }
paired_row() {
    local cost
    cost=$(awk -v b="$2" -v a="$3" 'BEGIN { if (a > 0 && b > 0) printf "%.3f", sqrt(b / a); else print "-" }')
    printf "%-34s %14s %14s %8s  (%s)\n" "$1" "$2" "$3" "$cost" "$4"
}
field() { python3 -c "import json, sys; print(json.load(sys.stdin)[sys.argv[1]])" "$1"; }
total() { python3 -c "import json, sys; print(json.load(sys.stdin)['total'][sys.argv[1]])" "$1"; }
stats() { ./target/release/novactl --control "$work/c.sock" --json device stats "$1"; }

# row NAME A-LABEL B-LABEL: prints the medians of $work/NAME.a and .b and their ratio b/a.
row() {
    local a b
    a=$(median < "$work/$1.a"); b=$(median < "$work/$1.b")
    printf "%-34s %14s %14s %8s  (%s -> %s)\n" "$1" "$a" "$b" "$(ratio "$b" "$a")" "$2" "$3"
}
# interleave NAME A-LABEL B-LABEL A-COMMAND B-COMMAND: ROUNDS runs of each command (A B, then
# B A, ...), each printing one number, then the row.
interleave() {
    local name="$1" r which order
    : > "$work/$name.a"; : > "$work/$name.b"
    for r in $(seq "$rounds"); do
        order="a b"; [ $((r % 2)) -eq 0 ] && order="b a"
        for which in $order; do
            if [ "$which" = a ]; then eval "$4" >> "$work/$name.a"; else eval "$5" >> "$work/$name.b"; fi
        done
    done
    row "$name" "$2" "$3"
}
printf "%-34s %14s %14s %8s\n" "row" "A" "B" "B/A"

# --- blk: 2 queues vs 1 -----------------------------------------------------------------------
blk_queues() { # backing queues -> IOPS
    local spec="path=null,size=8G"; [ "$1" = file ] && spec="path=$img"
    start 0,1 --blk "socket=$work/d.sock,$spec,queues=2"
    taskset -c 0,1 ./target/release/examples/blkload --socket "$work/d.sock" --rw randread \
        --bs 4096 --qd 32 --seconds "$secs" --queues "$2" | field iops
    stop
}
for backing in null file; do
    interleave "blk-queues-$backing" "1 queue" "2 queues" "blk_queues $backing 1" "blk_queues $backing 2"
done

# --- blk: a QoS limit that never binds ------------------------------------------------------
# Paired, in one daemon: `blkload --alternate` moves the load between two devices every 50 ms
# and compares each slice of the second with the slices of the first around it, so the VM's
# speed, which shifts for seconds at a time, cancels out. The two devices are not quite alike
# (a run may favour one of them by a few percent, differently each run), so the limit is put
# on each in turn, and the cost is the geometric mean of the two readings:
# sqrt((limited/plain) / (plain/limited as measured the other way round)).
alternate() { # client A-options B-options -> median B/A
    start 1 --blk "socket=$work/a.sock,path=null,size=8G$2" --blk "socket=$work/b.sock,path=null,size=8G$3"
    wait_socket "$work/a.sock"; wait_socket "$work/b.sock"
    local poll=off; [ "$1" = poll ] && poll=on
    taskset -c 0 ./target/release/examples/blkload --socket "$work/a.sock" --alternate "$work/b.sock" \
        --rw randread --bs 4096 --qd 32 --poll "$poll" --seconds $((rounds * secs)) | field ratio_median
    stop
}
paired_header
limit=",iops=100000000,bps=1000000000000"
for client in poll irq; do
    on_b=$(alternate "$client" "" "$limit")
    on_a=$(alternate "$client" "$limit" "")
    paired_row "blk-qos-$client" "$on_b" "$on_a" "no limit -> iops=100M,bps=1T"
done

# --- net: 2 queue pairs vs 1 ----------------------------------------------------------------
net_pairs() { # poll pairs -> packets/s summed over both ports
    start 1 --net "socket=$work/a.sock,switch=fc,mac=02:00:00:00:00:01,queues=2,poll=$1" \
        --net "socket=$work/b.sock,switch=fc,mac=02:00:00:00:00:02,queues=2,poll=$1"
    wait_socket "$work/a.sock"; wait_socket "$work/b.sock"
    timeout $((secs + 4)) dpdk-testpmd --lcores '0@0,1@0' --no-pci --single-file-segments --file-prefix=nc-fc-fe \
        --vdev "net_virtio_user0,path=$work/a.sock,queues=$2,mac=02:00:00:00:00:01" \
        --vdev "net_virtio_user1,path=$work/b.sock,queues=$2,mac=02:00:00:00:00:02" \
        -- --forward-mode=mac --eth-peer=0,02:00:00:00:00:02 --eth-peer=1,02:00:00:00:00:01 \
        --rxq="$2" --txq="$2" --auto-start --tx-first --txpkts=64 --stats-period=1 --nb-cores=1 2>&1 \
        | awk '/Rx-pps:/ { v[n++] = $2 } END { s = 0; c = 0; for (i = n - 2 * 3; i < n; i++) if (i >= 4) { s += v[i]; c++ } if (c) printf "%d\n", 2 * s / c; else print 0 }' || true
    stop
}
for poll in adaptive busy; do
    interleave "net-pairs-$poll" "1 pair" "2 pairs" "net_pairs $poll 1" "net_pairs $poll 2"
done

# --- net: a QoS limit that never binds ------------------------------------------------------
# Paired, like blk-qos: two ports of one daemon on CPU 1 (each alone on its own switch, so the
# frames go nowhere), one testpmd `txonly` front-end on CPU 0 filling both tx rings. Each
# port's worker is a thread of its own in the default (adaptive) mode, always busy, and the
# scheduler gives both the same share of the CPU: each port's frames/s is that share over its
# cost per frame, and B/A over one window compares the two costs in the same seconds. (In
# busy mode one thread serves both ports a pass each in turn, which would equalise the
# counts: not this row.) The limit goes on each port in turn; the cost is the geometric mean.
net_qos_pair() { # A-options B-options -> frames/s of B over A
    start 1 --net "socket=$work/a.sock,switch=fqa,mac=02:00:00:00:00:01$1" \
        --net "socket=$work/b.sock,switch=fqb,mac=02:00:00:00:00:02$2"
    wait_socket "$work/a.sock"; wait_socket "$work/b.sock"
    timeout $((rounds * secs + 6)) dpdk-testpmd --lcores '0@0,1@0' --no-pci --single-file-segments --file-prefix=nc-fc-fe \
        --vdev "net_virtio_user0,path=$work/a.sock,queues=1,mac=02:00:00:00:00:01" \
        --vdev "net_virtio_user1,path=$work/b.sock,queues=1,mac=02:00:00:00:00:02" \
        -- --forward-mode=txonly --txpkts=64 --auto-start --nb-cores=1 --stats-period=3600 >/dev/null 2>&1 &
    local load=$!
    sleep 2 # warm-up (a rate, not a synchronization: the counters are read over a window)
    local a0 b0 a1 b1
    a0=$(stats a | total tx_frames); b0=$(stats b | total tx_frames)
    sleep $((rounds * secs))
    a1=$(stats a | total tx_frames); b1=$(stats b | total tx_frames)
    kill "$load" 2>/dev/null || true; wait "$load" 2>/dev/null || true
    stop
    ratio $((b1 - b0)) $((a1 - a0))
}
paired_header
limit=",tx-pps=100000000,tx-bps=1000000000000"
on_b=$(net_qos_pair "" "$limit")
on_a=$(net_qos_pair "$limit" "")
same=$(net_qos_pair "" "")
paired_row net-qos "$on_b" "$on_a" "no limit -> tx-pps=100M,tx-bps=1T; no limit on either: $same"
