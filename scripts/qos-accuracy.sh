#!/usr/bin/env bash
# QoS accuracy: configured vs achieved rate over 10 s windows, IOPS limits from 100 to 200,000
# and byte limits from 1 MiB/s to 2 GiB/s, against the null device (so only the limiter
# limits). The libblkio load generator keeps QD 32 busy; daemon on CPU 1, client on CPU 0.
#
# Usage: scripts/qos-accuracy.sh [SECONDS=10]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
cargo build --release --locked --bin novacrond --example blkload >/dev/null 2>&1
work="$PWD/target/qos-accuracy"
mkdir -p "$work"
printf '%-10s %14s %14s %8s\n' limit configured achieved error
run() { # key value bs
    local key="$1" value="$2" bs="$3" sock="$work/q.sock"
    rm -f "$sock"
    taskset -c 1 ./target/release/novacrond --log-level warn --control none \
        --blk "socket=$sock,path=null,size=8G,$key=$value" &
    local pid=$!
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
    local out
    out="$(taskset -c 0 ./target/release/examples/blkload --socket "$sock" --rw randread \
        --bs "$bs" --qd 32 --seconds "$secs")"
    kill "$pid"; wait "$pid" 2>/dev/null || true
    python3 - "$key" "$value" "$bs" "$out" <<'PY'
import json, sys
key, value, bs, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
achieved = out["iops"] * (bs if key == "bps" else 1)
unit = "B/s" if key == "bps" else "IOPS"
print(f"{key:10} {value:>14,} {achieved:>14,.0f} {100*(achieved-value)/value:>+7.2f}%  ({unit})")
PY
}
for iops in 100 1000 10000 100000 200000; do run iops "$iops" 4096; done
for bps in 1048576 104857600 1073741824 2147483648; do run bps "$bps" 65536; done
