#!/usr/bin/env bash
# NIC QoS accuracy and cost: configured vs achieved guest-tx rate over SECONDS-long windows
# (packet limits from 100 to 500,000 frames/s with 64-byte frames, byte limits from 1 MiB/s
# to 1 GiB/s with 1518-byte frames), then the cost of the QoS path when a limit is set but
# never binds. Load: dpdk-testpmd `txonly` through a virtio_user port into a novacrond switch
# port (a frame with no other port to go to is counted and dropped by the switch: only the
# limiter limits). Achieved rates come from novacrond's own counters. Daemon on CPU 1,
# testpmd on CPU 0.
#
# Usage: scripts/qos-accuracy-net.sh [SECONDS=10]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
command -v dpdk-testpmd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dpdk-dev >/dev/null
cargo build --release --locked --bin novacrond --bin novactl >/dev/null 2>&1
work="$PWD/target/qos-accuracy-net"
rm -rf "$work"; mkdir -p "$work"
if [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 1024 ]; then echo 1024 > /proc/sys/vm/nr_hugepages; fi
mkdir -p /dev/hugepages
mountpoint -q /dev/hugepages || mount -t hugetlbfs nodev /dev/hugepages
trap 'pkill -f "file-prefix=nc-qos" 2>/dev/null || true; rm -f /dev/hugepages/nc-qos*' EXIT

counter() { # field -> value from novactl
    ./target/release/novactl --control "$work/c.sock" --json device stats q \
        | awk -v f="\"$1\"" '$1 == f":" { gsub(/,/, "", $2); print $2; exit }'
}

measure() { # limit-option frame-size -> achieved "frames/s bytes/s"
    rm -f "$work"/*.sock
    local opt=""; [ -n "$1" ] && opt=",$1"
    # A log that runs away must never fill the disk: cap it at 100 MB.
    (ulimit -f 200000; exec taskset -c 1 ./target/release/novacrond --log-level warn --control "$work/c.sock" \
        --net "socket=$work/q.sock,switch=q,mac=02:00:00:00:00:01$opt" 2>>"$work/novacrond.log") &
    local pid=$!
    for _ in $(seq 100); do [ -S "$work/q.sock" ] && break; sleep 0.05; done
    timeout $((secs + 6)) dpdk-testpmd --lcores '0@0,1@0' --no-pci --single-file-segments --file-prefix=nc-qos \
        --vdev "net_virtio_user0,path=$work/q.sock,queues=1,mac=02:00:00:00:00:01" \
        -- --forward-mode=txonly --txpkts="$2" --auto-start --nb-cores=1 --stats-period=3600 >/dev/null 2>&1 &
    local load=$!
    sleep 2 # warm-up: buckets drained, rates steady
    local f0 b0 f1 b1
    f0=$(counter tx_frames); b0=$(counter tx_bytes)
    sleep "$secs"
    f1=$(counter tx_frames); b1=$(counter tx_bytes)
    kill "$load" 2>/dev/null || true; wait "$load" 2>/dev/null || true
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "$(( (f1 - f0) / secs )) $(( (b1 - b0) / secs ))"
}

printf '%-8s %14s %14s %8s\n' limit configured achieved error
for pps in 100 1000 10000 100000 500000; do
    read -r frames _ < <(measure "tx-pps=$pps" 64)
    printf '%-8s %14s %14s %+7.2f%%\n' tx-pps "$pps" "$frames" "$(awk -v a="$frames" -v c="$pps" 'BEGIN { print 100 * (a - c) / c }')"
done
for bps in 1048576 104857600 1073741824; do
    read -r _ bytes < <(measure "tx-bps=$bps" 1518)
    printf '%-8s %14s %14s %+7.2f%%\n' tx-bps "$bps" "$bytes" "$(awk -v a="$bytes" -v c="$bps" 'BEGIN { print 100 * (a - c) / c }')"
done
echo
echo "cost of a limit that never binds (64-byte frames/s, 3 alternating runs each):"
for r in 1 2 3; do
    read -r none _ < <(measure "" 64)
    read -r loose _ < <(measure "tx-pps=100000000" 64)
    printf 'run %d: no limit %10s   tx-pps=100M %10s   ratio %.3f\n' "$r" "$none" "$loose" "$(awk -v a="$loose" -v b="$none" 'BEGIN { print a / b }')"
done
